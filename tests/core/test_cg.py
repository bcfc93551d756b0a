"""Conjugate gradient with the Nyström preconditioner: the same solution as a numpy solve, fewer
iterations, the preconditioner's defining properties, when "auto" builds it, and its refusals."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from rlattr.core.methods import InfluenceFunction
from rlattr.core.methods.cg import CGSolver, NystromPreconditioner
from rlattr.core.methods.hessian import ObjectiveHessian
from rlattr.errors import RlattrError
from rlattr.testing.supervised import ce_of_logits, per_record_logits
from tests.core._tda import Problem, logreg_closed_form, logreg_problem, mlp_problem

L2 = 1e-3  # small, as in the benchmark: an ill-conditioned H that CG needs many iterations for


@pytest.fixture(scope="module")
def lr() -> Problem:
    return logreg_problem(n=60, l2=L2)


def _rhs(d: int, k: int) -> torch.Tensor:
    return torch.randn(d, k, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_preconditioned_cg_solves_the_closed_form_system_in_fewer_iterations(lr: Problem) -> None:
    _, h = logreg_closed_form(lr, lr.train["x"], lr.train["y"])
    hess = h.mean(0) + L2 * np.eye(h.shape[1])
    b = _rhs(h.shape[1], 5)
    want = np.linalg.solve(hess, b.numpy())
    iterations = {}
    for rank in (0, 20, h.shape[1]):
        solver = CGSolver(
            ObjectiveHessian(lr.task, lr.train, shift=L2), max_iter=500, tol=1e-12, precondition=rank
        )
        np.testing.assert_allclose(solver.solve(b).numpy(), want, rtol=1e-7, atol=1e-9)
        iterations[rank] = solver.iterations
    assert iterations[20] < iterations[0]  # 14 against 22: H has 18 eigenvalues above l2
    assert iterations[h.shape[1]] <= 2  # a full-rank sketch: P^-1 H = lam_min I, one step


def test_nystrom_preconditioner_is_spd_and_flattens_the_top_spectrum(lr: Problem) -> None:
    hessian = ObjectiveHessian(lr.task, lr.train, shift=L2)
    dense = hessian.dense()
    d = dense.shape[0]
    pre = NystromPreconditioner(hessian, rank=d)
    inv = pre.apply(torch.eye(d, dtype=torch.float64))  # P^-1 as a matrix
    torch.testing.assert_close(inv, inv.T, rtol=1e-10, atol=1e-12)
    # with the whole spectrum sketched, P^-1 = lam_min H^-1: P^-1 H has one eigenvalue, lam_min(H)
    lam = torch.linalg.eigvalsh(dense)
    spectrum = torch.linalg.eigvals(inv @ dense).real
    torch.testing.assert_close(spectrum, torch.full_like(spectrum, float(lam[0])), rtol=1e-6, atol=0.0)
    # a partial sketch keeps P^-1 positive definite and shrinks the condition number
    small = NystromPreconditioner(hessian, rank=6).apply(torch.eye(d, dtype=torch.float64))
    assert float(torch.linalg.eigvalsh(0.5 * (small + small.T))[0]) > 0
    pre_spec = torch.linalg.eigvals(small @ dense).real
    assert float(pre_spec.max() / pre_spec.min()) < float(lam[-1] / lam[0])


def test_auto_preconditions_wide_solves_only(lr: Problem) -> None:
    d = lr.task.num_params
    solver = CGSolver(ObjectiveHessian(lr.task, lr.train, shift=L2), max_iter=500, tol=1e-10)
    solver.solve(_rhs(d, 3))
    assert solver.preconditioner is None  # 3 columns: the sketch would cost more than it saves
    solver.solve(_rhs(d, 40))
    assert solver.preconditioner is not None and solver.preconditioner.u.shape == (d, min(2 * 40, d))


def test_influence_cg_with_the_preconditioner_equals_explicit_on_an_mlp() -> None:
    mlp = mlp_problem(n=40)
    curv: dict[str, Any] = {"output": per_record_logits(mlp.model), "output_loss": ce_of_logits}
    explicit = InfluenceFunction(mlp.task, l2=L2, **curv).cache(mlp.train).attribute(mlp.query)
    for rank in (0, 10):
        cg = InfluenceFunction(
            mlp.task, strategy="cg", l2=L2, max_iter=1000, tol=1e-12, precondition=rank, **curv
        )
        torch.testing.assert_close(cg.cache(mlp.train).attribute(mlp.query), explicit, rtol=1e-6, atol=1e-8)


def test_an_indefinite_hessian_is_still_refused_with_a_preconditioner() -> None:
    mlp = mlp_problem(n=40, l2=L2)
    low = float(torch.linalg.eigvalsh(ObjectiveHessian(mlp.task, mlp.train, shift=L2).dense())[0])
    assert low < 0  # the premise: the exact Hessian is indefinite at this l2
    cg = InfluenceFunction(mlp.task, strategy="cg", l2=L2, max_iter=500, precondition=10)
    with pytest.raises(RlattrError, match="non-positive curvature"):
        cg.cache(mlp.train).attribute(mlp.query)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "100"])
def test_bad_precondition_is_named(lr: Problem, bad: object) -> None:
    with pytest.raises(
        RlattrError, match=r"precondition: got .*; supported: None \(auto\) or an integer >= 0"
    ):
        InfluenceFunction(lr.task, strategy="cg", l2=L2, precondition=bad).cache(lr.train)
