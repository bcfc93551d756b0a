"""TRAK: the unprojected score equals its formula (primal and dual forms), a large projection
approaches it, the ensemble is the mean of its members; TracIn against a plain autograd loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlattr.core.methods import TRAK, TracIn
from rlattr.testing.supervised import margin_weight, per_record_margin
from tests.core._tda import logreg_closed_form, logreg_problem


@pytest.fixture(scope="module")
def lr():
    return logreg_problem(n=60, m=4)


def _trak_formula(g: np.ndarray, gq: np.ndarray, damping: float) -> np.ndarray:
    lam = damping * np.mean((g * g).sum(1))
    return gq @ np.linalg.solve(g.T @ g + lam * np.eye(g.shape[1]), g.T)


@pytest.mark.parametrize("n", [60, 20])  # d = 27: primal (k <= n) and dual (k > n) forms
def test_unprojected_equals_formula(lr, n):
    train = {k: v[:n] for k, v in lr.train.items()}
    g, _ = logreg_closed_form(lr, train["x"], train["y"])
    gq, _ = logreg_closed_form(lr, lr.query["x"], lr.query["y"])
    got = TRAK(lr.task, proj_dim=None, damping=0.01).cache(train).attribute(lr.query)
    np.testing.assert_allclose(got.numpy(), _trak_formula(g, gq, 0.01), rtol=1e-7, atol=1e-12)


def test_large_projection_approaches_unprojected(lr):
    exact = TRAK(lr.task, proj_dim=None, damping=0.01).cache(lr.train).attribute(lr.query)
    errors = []
    for k in (64, 20000):
        proj = TRAK(lr.task, proj_dim=k, damping=0.01, seed=1).cache(lr.train).attribute(lr.query)
        errors.append(float((proj - exact).abs().max() / exact.abs().max()))
    assert errors[1] < 0.05
    assert errors[1] < errors[0]


def test_margin_output_and_ensemble_mean(lr):
    kw = {"proj_dim": 16, "output": per_record_margin(lr.model), "output_weight": margin_weight(lr.model)}
    params = lr.task.tracked_params()
    shifted = {k: v + 0.05 for k, v in params.items()}
    both = TRAK(lr.task, [params, shifted], seed=5, **kw).cache(lr.train).attribute(lr.query)
    first = TRAK(lr.task, [params], seed=5, **kw).cache(lr.train).attribute(lr.query)
    second = TRAK(lr.task, [shifted], seed=6, **kw).cache(lr.train).attribute(lr.query)
    np.testing.assert_allclose(both.numpy(), ((first + second) / 2).numpy(), rtol=1e-9)
    # margin form, unprojected: u_i = -(1 - p_i) grad m_i, v_q = -grad m_q, kernel of grad m
    plain = TRAK(lr.task, proj_dim=None, damping=0.01, output=kw["output"], output_weight=kw["output_weight"])
    got = plain.cache(lr.train).attribute(lr.query).numpy()
    with torch.no_grad():
        prob = torch.softmax(lr.model(lr.train["x"]), 1).gather(1, lr.train["y"][:, None])[:, 0].numpy()
    g, _ = logreg_closed_form(lr, lr.train["x"], lr.train["y"])
    gq, _ = logreg_closed_form(lr, lr.query["x"], lr.query["y"])
    with torch.no_grad():
        pq = torch.softmax(lr.model(lr.query["x"]), 1).gather(1, lr.query["y"][:, None])[:, 0].numpy()
    grad_m, grad_mq = -g / (1 - prob)[:, None], -gq / (1 - pq)[:, None]  # CE gradient = -(1 - p) grad margin
    lam = 0.01 * np.mean((grad_m**2).sum(1))
    kern = np.linalg.solve(grad_m.T @ grad_m + lam * np.eye(g.shape[1]), (-(1 - prob)[:, None] * grad_m).T)
    np.testing.assert_allclose(got, -grad_mq @ kern, rtol=1e-6)


def test_tracin_equals_loop(lr):
    params = {k: v.clone() for k, v in lr.task.tracked_params().items()}
    ckpts = [params, {k: 0.5 * v for k, v in params.items()}]
    lrs = [0.1, 0.3]
    got = TracIn(lr.task, ckpts, lrs).cache(lr.train).attribute(lr.query)
    expected = torch.zeros(4, 60, dtype=torch.float64)
    for c, rate in zip(ckpts, lrs, strict=True):
        model = lr.model
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(c[name])
        g, _ = logreg_closed_form(lr, lr.train["x"], lr.train["y"])
        gq, _ = logreg_closed_form(lr, lr.query["x"], lr.query["y"])
        expected += rate * torch.tensor(gq @ g.T)
    with torch.no_grad():
        for name, p in lr.model.named_parameters():
            p.copy_(params[name])
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-9)


def test_bad_arguments(lr):
    with pytest.raises(ValueError, match="lrs"):
        TracIn(lr.task, [lr.task.tracked_params()], [0.1, 0.2])
    with pytest.raises(ValueError, match="checkpoints"):
        TracIn(lr.task, [{"0.weight": torch.zeros(2, 2)}])
    with pytest.raises(ValueError, match="proj_dim"):
        TRAK(lr.task, proj_dim=0)
    with pytest.raises(ValueError, match="output_weight"):
        TRAK(lr.task, output_weight=margin_weight(lr.model))
    trak = TRAK(lr.task, proj_dim=8).cache(lr.train)
    with pytest.raises(ValueError, match="query"):
        trak.attribute({"x": lr.query["x"]})
