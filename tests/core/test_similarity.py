"""Grad-Dot and Grad-Cos against brute-force dot products of autograd gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from rlattr.core import RandomProjection
from rlattr.core.methods import GradCos, GradDot
from rlattr.errors import RlattrError
from rlattr.testing.supervised import classification_task


def _setup() -> tuple[nn.Module, dict, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    train = {"x": torch.randn(10, 4, dtype=torch.float64), "y": torch.randint(0, 3, (10,))}
    query = {"x": torch.randn(3, 4, dtype=torch.float64), "y": torch.randint(0, 3, (3,))}
    return model, train, query


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    nn.functional.cross_entropy(model(x[None]), y[None]).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def test_grad_dot_and_cos_equal_brute_force() -> None:
    model, train, query = _setup()
    gi = torch.stack([_grad(model, train["x"][i], train["y"][i]) for i in range(10)])
    gq = torch.stack([_grad(model, query["x"][j], query["y"][j]) for j in range(3)])
    task = classification_task(model)
    dot = GradDot(task).cache(train).attribute(query)
    torch.testing.assert_close(dot, gq @ gi.T, rtol=0, atol=1e-10)
    cos = GradCos(task).cache(train).attribute(query)
    ref = (gq / gq.norm(dim=1, keepdim=True)) @ (gi / gi.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(cos, ref, rtol=0, atol=1e-10)


def test_projected_grad_dot_approximates_exact() -> None:
    model, train, query = _setup()
    task = classification_task(model)
    exact = GradDot(task).cache(train).attribute(query)
    proj = RandomProjection(task.num_params, 4096, "rademacher", seed=0)
    approx = GradDot(task, projector=proj).cache(train).attribute(query)
    assert torch.corrcoef(torch.stack([exact.flatten(), approx.flatten()]))[0, 1] > 0.97


def test_attribute_before_cache_and_bad_projector_fail_clearly() -> None:
    model, _, query = _setup()
    task = classification_task(model)
    with pytest.raises(RuntimeError, match="call cache"):
        GradDot(task).attribute(query)
    with pytest.raises(ValueError, match="projector: dim_in is 5"):
        GradDot(task, projector=RandomProjection(5, 2))


def test_query_is_checked_against_the_training_records() -> None:
    model, train, query = _setup()
    dot = GradDot(classification_task(model)).cache(train)
    wide = {"x": torch.randn(3, 5, dtype=torch.float64), "y": query["y"]}
    with pytest.raises(
        RlattrError,
        match=r"query: got per-record shape \(5,\) in leaf 0; supported: the training records' \(4,\)",
    ):
        dot.attribute(wide)
    with pytest.raises(RlattrError, match="query: got a batch structured as"):
        dot.attribute({"x": query["x"]})
    with pytest.raises(RlattrError, match="query: got a batch structured as"):
        GradCos(classification_task(model)).cache(train).attribute_by_group({"x": query["x"]})


def test_a_target_query_is_checked_against_the_target_not_the_training_records() -> None:
    model, train, _ = _setup()
    ce = nn.functional.cross_entropy

    def target(params: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return ce(functional_call(model, params, (b["obs"],)), b["label"])

    task = classification_task(model, target=target)
    heldout = {"obs": torch.randn(7, 4, dtype=torch.float64), "label": torch.randint(0, 3, (7,))}
    got = GradDot(task).cache(train).attribute(heldout)  # structured unlike the training records
    gi = torch.stack([_grad(model, train["x"][i], train["y"][i]) for i in range(10)])
    model.zero_grad()
    ce(model(heldout["obs"]), heldout["label"]).backward()
    gq = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(got, (gq @ gi.T)[None], rtol=0, atol=1e-10)

    dot = GradDot(task).cache(train)
    with pytest.raises(RlattrError, match=r"query: the Task's target fails on it \(KeyError: 'obs'\)"):
        dot.attribute(train)
    with pytest.raises(RlattrError, match="query: got dict holding no tensor"):
        dot.attribute({"obs": [1.0, 2.0]})
    matrix = classification_task(model, target=lambda p, b: torch.stack([target(p, b)] * 4).reshape(2, 2))
    with pytest.raises(RlattrError, match=r"query: the Task's target returns \(2, 2\) on it"):
        GradDot(matrix).cache(train).attribute(heldout)
