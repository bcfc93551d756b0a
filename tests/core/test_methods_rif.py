"""RescaledInfluence and NewtonStep: RIF equals the exact single-point Newton step on logistic
regression (multinomial and binary), and the Newton step tracks actual retraining better than IF."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from rlattr.core.methods import InfluenceFunction, NewtonStep, RescaledInfluence
from rlattr.core.methods.hessian import ParamLayout
from rlattr.testing.supervised import ce_of_logits, per_record_logits, train_classifier
from tests.core._tda import logreg_closed_form, logreg_problem


@pytest.fixture(scope="module")
def lr():
    return logreg_problem(n=40, l2=0.05)


@pytest.fixture(scope="module")
def newton(lr):
    return NewtonStep(lr.task, l2=lr.l2).cache(lr.train)


def _rif(lr, exact: bool = True):
    curv: dict[str, Any] = (
        {"output": per_record_logits(lr.model), "output_loss": ce_of_logits} if exact else {}
    )
    return RescaledInfluence(lr.task, l2=lr.l2, **curv).cache(lr.train)


def test_rif_equals_exact_newton_step(lr, newton):
    rif = _rif(lr).attribute(lr.query)
    ns = newton.attribute(lr.query)
    np.testing.assert_allclose(rif.numpy(), ns.numpy(), rtol=1e-8, atol=1e-10)


def test_newton_step_by_hand(lr, newton):
    g, h = logreg_closed_form(lr, lr.train["x"], lr.train["y"])
    n, d = g.shape
    hess = h.sum(0) + n * lr.l2 * np.eye(d)  # sum-form objective, regulariser kept
    for i in (0, 7):
        expected = np.linalg.solve(hess - h[i], g[i])
        np.testing.assert_allclose(newton.param_change([i]).numpy(), expected, rtol=1e-8)
    both = np.linalg.solve(hess - h[2] - h[5], g[2] + g[5])
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[2, 5]] = True
    np.testing.assert_allclose(newton.param_change(mask).numpy(), both, rtol=1e-8)


def test_newton_step_tracks_retraining_better_than_if(lr, newton):
    n = lr.train["x"].shape[0]
    layout = ParamLayout(lr.task.tracked_params(), lr.task.tracked_names)
    theta = layout.flatten(lr.task.tracked_params())
    influence = InfluenceFunction(lr.task, l2=lr.l2).cache(lr.train)
    for i in (0, 11, 23):
        w = torch.ones(n, dtype=torch.float64)
        w[i] = 0.0
        model = train_classifier(
            copy.deepcopy(lr.model), lr.train["x"], lr.train["y"], weights=w, l2=lr.l2 * n / (n - 1)
        )
        actual = layout.flatten(dict(model.named_parameters())).detach() - theta
        ns_err = (newton.param_change([i]) - actual).norm() / actual.norm()
        if_err = (influence.inverse_hvp(influence._train[i : i + 1])[0] / n - actual).norm() / actual.norm()
        assert float(ns_err) < 0.1
        assert float(ns_err) < float(if_err)


def test_binary_logistic_rif_closed_form():
    gen = torch.Generator().manual_seed(0)
    n, dim, l2 = 50, 4, 0.1
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(dim, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.2, -0.3, 0.1, 0.0]]))

    def loss(params, batch):
        z = torch.func.functional_call(model, params, (batch["x"],))[:, 0]
        return torch.nn.functional.binary_cross_entropy_with_logits(z, batch["y"].double(), reduction="none")

    def logits(params, batch):
        return torch.func.functional_call(model, params, (batch["x"],))

    def out_loss(z, batch):
        return torch.nn.functional.binary_cross_entropy_with_logits(
            z[:, 0], batch["y"].double(), reduction="none"
        )

    from rlattr.core.task import Task

    task = Task(model, loss)
    train = {"x": x, "y": y}
    rif = RescaledInfluence(task, l2=l2, output=logits, output_loss=out_loss).cache(train)
    # RIF_i = H^-1 g_i / (1 - h_i), h_i = alpha_i x_i^T H^-1 x_i / N, alpha = p (1 - p), H of the mean objective
    xs, ys, w = x.numpy(), y.numpy(), model[0].weight.detach().numpy()[0]
    p = 1 / (1 + np.exp(-xs @ w))
    alpha = p * (1 - p)
    hess = (xs * alpha[:, None]).T @ xs / n + l2 * np.eye(dim)
    g = (p - ys)[:, None] * xs
    lev = alpha * np.einsum("nd,nd->n", xs, np.linalg.solve(hess, xs.T).T) / n
    expected = np.linalg.solve(hess, g.T).T / (1 - lev)[:, None]
    # the rows in parameter coordinates (cached whitened: e_j^T row_i through score_vectors)
    rows = rif.score_vectors([torch.eye(dim, dtype=torch.float64)]).T
    np.testing.assert_allclose(rows.numpy(), expected, rtol=1e-8)
    np.testing.assert_allclose(rif.leverage.numpy(), lev, rtol=1e-8)


def test_rank_one_fallback(lr):
    # without output functions, hess l_i ~ g_i g_i^T: score = IF / (1 - g_i^T H^-1 g_i / N)
    g, h = logreg_closed_form(lr, lr.train["x"], lr.train["y"])
    gq, _ = logreg_closed_form(lr, lr.query["x"], lr.query["y"])
    n, d = g.shape
    hinv_g = np.linalg.solve(h.mean(0) + lr.l2 * np.eye(d), g.T)  # [d, n]
    lev = np.einsum("nd,dn->n", g, hinv_g) / n
    expected = (gq @ hinv_g) / (1 - lev)[None, :]
    np.testing.assert_allclose(_rif(lr, exact=False).attribute(lr.query).numpy(), expected, rtol=1e-8)


def test_bad_arguments(lr, newton):
    with pytest.raises(ValueError, match="output"):
        RescaledInfluence(lr.task, l2=lr.l2, output=per_record_logits(lr.model))
    with pytest.raises(ValueError, match="remove"):
        newton.param_change([])
    with pytest.raises(ValueError, match="remove"):
        newton.param_change(torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="query"):
        newton.removal_effect({"x": lr.query["x"][:, :3], "y": lr.query["y"]}, [[0]])
