"""Ground truth by retraining, on a ridge regression solved in closed form: LOO and subset values
against direct solves, resuming from disk, parallel = sequential, and the final-model gold standard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rlattr.core.store import StoreError
from rlattr.eval.groundtruth import final_model_gold, leave_one_out, subset_masks, subset_retraining

RNG = np.random.default_rng(0)
X, Y = RNG.normal(size=(12, 3)), RNG.normal(size=12)
XQ = RNG.normal(size=(2, 3))
L2 = 0.1


def ridge(weights: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    w = weights.double().numpy()
    a = (X * w[:, None]).T @ X / w.sum() + L2 * np.eye(3)
    return {"theta": torch.tensor(np.linalg.solve(a, (X * w[:, None]).T @ Y / w.sum()))}


def predict(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.tensor(XQ) @ params["theta"]


def test_subset_masks() -> None:
    masks = subset_masks(10, 7, 0.3, seed=4)
    assert masks.shape == (7, 10) and masks.dtype == torch.bool
    assert (masks.sum(1) == 3).all()
    assert torch.equal(masks, subset_masks(10, 7, 0.3, seed=4))
    assert not torch.equal(masks, subset_masks(10, 7, 0.3, seed=5))
    with pytest.raises(ValueError, match="fraction"):
        subset_masks(10, 2, 1.0)


def test_leave_one_out_equals_direct_solves() -> None:
    got = leave_one_out(ridge, predict, 12, [0, 5, 11])
    full = predict(ridge(torch.ones(12), 0))
    for row, i in enumerate([0, 5, 11]):
        keep = np.arange(12) != i
        a = X[keep].T @ X[keep] / 11 + L2 * np.eye(3)
        theta = np.linalg.solve(a, X[keep].T @ Y[keep] / 11)
        np.testing.assert_allclose(got[row].numpy(), XQ @ theta - full.numpy(), rtol=1e-10)
    with pytest.raises(ValueError, match="indices"):
        leave_one_out(ridge, predict, 12, [12])


def test_subsets_resume_and_parallel(tmp_path: Path) -> None:
    masks = subset_masks(12, 6, 0.5, seed=0)
    first = subset_retraining(ridge, predict, masks, out_dir=tmp_path / "a", config={"model": "ridge"})
    for s in range(6):
        np.testing.assert_allclose(first[s].numpy(), predict(ridge(masks[s].double(), s)).numpy())

    def must_not_run(weights: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        raise AssertionError("a finished job was retrained")

    again = subset_retraining(must_not_run, predict, masks, out_dir=tmp_path / "a", config={"model": "ridge"})
    assert torch.equal(first, again)
    (tmp_path / "a" / "job_00003.safetensors").unlink()  # an interrupted run: one job missing
    calls: list[int] = []

    def counting(weights: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        calls.append(seed)
        return ridge(weights, seed)

    resumed = subset_retraining(counting, predict, masks, out_dir=tmp_path / "a", config={"model": "ridge"})
    assert calls == [3] and torch.allclose(resumed, first)
    parallel = subset_retraining(ridge, predict, masks, out_dir=tmp_path / "b", processes=2)
    assert torch.allclose(parallel, first)
    with pytest.raises(ValueError, match="out_dir"):
        subset_retraining(ridge, predict, masks, out_dir=tmp_path / "a", config={"model": "other"})
    (tmp_path / "a" / "job_00001.safetensors").write_bytes(b"garbage")
    with pytest.raises(StoreError):
        subset_retraining(ridge, predict, masks, out_dir=tmp_path / "a", config={"model": "ridge"})


def _grad(i: int, theta: np.ndarray) -> np.ndarray:
    return 2 * (X[i] @ theta - Y[i]) * X[i]


def test_final_model_gold_standard() -> None:
    theta_f = ridge(torch.ones(12), 0)["theta"].numpy()
    lr, steps = 0.05, 6

    def further_train(weights: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        order = np.random.default_rng(seed).integers(0, 12, size=steps)  # same order in both arms
        theta = theta_f.copy()
        for i in order:
            theta = theta - lr * float(weights[i]) * _grad(int(i), theta)
        return {"theta": torch.tensor(theta)}

    got = final_model_gold(further_train, predict, 12, [2, 7], seeds=[0, 1, 2])
    for row, i in enumerate([2, 7]):
        diffs = []
        for seed in (0, 1, 2):
            order = np.random.default_rng(seed).integers(0, 12, size=steps)
            with_i, without = theta_f.copy(), theta_f.copy()
            for j in order:
                with_i = with_i - lr * _grad(int(j), with_i)
                if j != i:
                    without = without - lr * _grad(int(j), without)
            diffs.append(XQ @ without - XQ @ with_i)
        np.testing.assert_allclose(got[row].numpy(), np.mean(diffs, axis=0), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="seeds"):
        final_model_gold(further_train, predict, 12, [2], seeds=[])
