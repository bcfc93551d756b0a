"""NewtonStep by Woodbury updates: equal to a direct solve with the removed records' Hessians
(exact on logistic regression, the records' Gauss-Newton terms on an MLP), and its refusals."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from rlattr.core.methods import NewtonStep, RescaledInfluence, query_grads
from rlattr.core.methods.hessian import ObjectiveHessian
from rlattr.core.methods.rif import record_curvature_factors, woodbury_removal, woodbury_removal_whitened
from rlattr.errors import RlattrError
from rlattr.testing.supervised import ce_of_logits, per_record_logits
from tests.core._tda import Problem, logreg_closed_form, logreg_problem, mlp_problem


def _curv(p: Problem) -> dict[str, Any]:
    return {"output": per_record_logits(p.model), "output_loss": ce_of_logits}


def test_woodbury_newton_step_equals_a_direct_solve_on_logistic_regression() -> None:
    lr = logreg_problem(n=40)
    g, h = logreg_closed_form(lr, lr.train["x"], lr.train["y"])  # numpy, by hand
    n, d = g.shape
    big_h = h.mean(0) + lr.l2 * np.eye(d)
    fast = NewtonStep(lr.task, l2=lr.l2, **_curv(lr)).cache(lr.train)
    for remove in ([3], [0, 5, 17]):
        want = np.linalg.solve(big_h - h[remove].sum(0) / n, g[remove].sum(0)) / n
        np.testing.assert_allclose(fast.param_change(remove).numpy(), want, rtol=1e-8, atol=1e-12)
    # all single-record steps at once (queries: the first two training records): N g_q^T dtheta_i,
    # by a for-loop of direct solves
    want_scores = np.array(
        [[n * g[j] @ np.linalg.solve(big_h - h[i] / n, g[i]) / n for i in range(n)] for j in range(2)]
    )
    got = fast.attribute({"x": lr.train["x"][:2], "y": lr.train["y"][:2]})
    np.testing.assert_allclose(got.numpy(), want_scores, rtol=1e-8, atol=1e-10)
    exact = NewtonStep(lr.task, l2=lr.l2).cache(lr.train)
    torch.testing.assert_close(got, exact.attribute({"x": lr.train["x"][:2], "y": lr.train["y"][:2]}))


def test_on_an_mlp_it_drops_the_removed_records_output_curvature_only() -> None:
    mlp = mlp_problem(n=30)
    n = 30
    low = float(torch.linalg.eigvalsh(ObjectiveHessian(mlp.task, mlp.train, shift=mlp.l2).dense())[0])
    damping = max(0.0, -low) + 0.05  # the exact Hessian of a small MLP is indefinite
    fast = NewtonStep(mlp.task, l2=mlp.l2, damping=damping, **_curv(mlp)).cache(mlp.train)
    exact = NewtonStep(mlp.task, l2=mlp.l2, damping=damping).cache(mlp.train)
    big_h = ObjectiveHessian(mlp.task, mlp.train, shift=mlp.l2 + damping).dense()  # exact, kept whole
    jac, a = record_curvature_factors(mlp.task, _curv(mlp)["output"], ce_of_logits, mlp.train)
    g = fast._require_cache()
    for i in (0, 11):
        gn_i = jac[i].T @ a[i] @ jac[i]  # the removed record's Gauss-Newton term, densely
        want = torch.linalg.solve(big_h - gn_i / n, g[i]) / n
        torch.testing.assert_close(fast.param_change([i]), want, rtol=1e-8, atol=1e-12)
    got, ref = fast.attribute(mlp.query), exact.attribute(mlp.query)
    assert not torch.allclose(got, ref, rtol=1e-6)  # the dropped term is not zero on an MLP ...
    corr = np.corrcoef(got.reshape(-1).numpy(), ref.reshape(-1).numpy())[0, 1]
    assert corr > 0.99, corr  # ... but small next to the kept one


def test_refusals() -> None:
    lr = logreg_problem(n=20)
    with pytest.raises(RlattrError, match="output, output_loss: pass both"):
        NewtonStep(lr.task, output=per_record_logits(lr.model))
    with pytest.raises(RlattrError, match=r"damping: the Hessian plus l2 \+ damping \(0\) is not positive"):
        NewtonStep(lr.task, **_curv(lr)).cache(lr.train)
    fast = NewtonStep(lr.task, l2=lr.l2, **_curv(lr)).cache(lr.train)
    with pytest.raises(RlattrError, match=r"remove: expected a non-empty set of record indices in \[0, 20\)"):
        fast.param_change([20])
    with pytest.raises(RlattrError, match=r"hessian: got 'fisher'; supported: \('exact', 'gauss_newton'\)"):
        NewtonStep(lr.task, l2=lr.l2, hessian="fisher", **_curv(lr))
    with pytest.raises(RlattrError, match=r"hessian: 'gauss_newton' needs output= and output_loss="):
        NewtonStep(lr.task, l2=lr.l2, hessian="gauss_newton")


def test_whitened_woodbury_equals_the_solve_form() -> None:
    """Rows ``L^T (H - J^T A J)^-1 g`` from forward substitutions only equal the two-solve form."""
    mlp = mlp_problem(n=30)
    h = ObjectiveHessian(mlp.task, mlp.train, shift=mlp.l2, **_curv(mlp)).dense()
    chol = torch.linalg.cholesky(h)
    jac, a = record_curvature_factors(mlp.task, _curv(mlp)["output"], ce_of_logits, mlp.train)
    g = query_grads(mlp.task, mlp.train)  # the records' loss gradients
    rows, lev = woodbury_removal_whitened(chol, g, jac, a / 30)
    want, want_lev = woodbury_removal(lambda b: torch.cholesky_solve(b, chol), g, jac, a / 30)
    torch.testing.assert_close(torch.linalg.solve_triangular(chol.T, rows.T, upper=True).T, want)
    torch.testing.assert_close(lev, want_lev)
    # and each row by a direct dense solve
    for i in (0, 9):
        direct = torch.linalg.solve(h - jac[i].T @ a[i] @ jac[i] / 30, g[i])
        torch.testing.assert_close(want[i], direct, rtol=1e-8, atol=1e-12)


def test_gauss_newton_newton_step_runs_on_an_indefinite_mlp_and_equals_rif() -> None:
    mlp = mlp_problem(n=30, l2=1e-3)
    low = float(torch.linalg.eigvalsh(ObjectiveHessian(mlp.task, mlp.train, shift=1e-3).dense())[0])
    assert low < 0  # the premise: no exact Newton step at this l2
    with pytest.raises(RlattrError, match="not positive definite"):
        NewtonStep(mlp.task, l2=1e-3, **_curv(mlp)).cache(mlp.train)
    step = NewtonStep(mlp.task, l2=1e-3, hessian="gauss_newton", **_curv(mlp)).cache(mlp.train)
    rif = RescaledInfluence(mlp.task, l2=1e-3, **_curv(mlp)).cache(mlp.train)
    torch.testing.assert_close(step.attribute(mlp.query), rif.attribute(mlp.query), rtol=1e-8, atol=1e-10)
    # a removal set: the dense Gauss-Newton H minus the set's terms, solved directly
    ggn = ObjectiveHessian(mlp.task, mlp.train, shift=1e-3, **_curv(mlp)).dense()
    jac, a = record_curvature_factors(mlp.task, _curv(mlp)["output"], ce_of_logits, mlp.train)
    g = step._require_cache()
    removed = sum(jac[i].T @ a[i] @ jac[i] for i in (2, 7)) / 30
    want = torch.linalg.solve(ggn - removed, g[[2, 7]].sum(0)) / 30
    torch.testing.assert_close(step.param_change([2, 7]), want, rtol=1e-8, atol=1e-12)
