"""IF Arnoldi: the projected inverse against numpy's eigendecomposition of the dense Hessian, its
convergence to explicit IF as the rank grows, and its refusals."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from rlattr.core.methods import InfluenceFunction
from rlattr.core.methods.arnoldi import ArnoldiSolver
from rlattr.core.methods.hessian import CurvatureSpec, ObjectiveHessian
from rlattr.errors import RlattrError
from rlattr.testing.supervised import ce_of_logits, per_record_logits
from tests.core._tda import Problem, logreg_problem, mlp_problem


@pytest.fixture(scope="module")
def mlp() -> Problem:
    return mlp_problem()


def test_full_rank_arnoldi_is_the_exact_inverse() -> None:
    lr = logreg_problem()
    h = ObjectiveHessian(lr.task, lr.train, shift=lr.l2).dense().numpy()
    b = np.random.default_rng(0).normal(size=(h.shape[0], 3))
    spec = CurvatureSpec(lr.task, lr.train, shift=lr.l2)
    d = h.shape[0]
    got = ArnoldiSolver.from_spec(spec, rank=d, iterations=d).solve(torch.tensor(b))
    np.testing.assert_allclose(got.numpy(), np.linalg.solve(h, b), rtol=1e-6, atol=1e-8)


def test_ritz_pairs_are_the_top_eigenpairs_by_magnitude(mlp: Problem) -> None:
    h = ObjectiveHessian(mlp.task, mlp.train, shift=mlp.l2).dense().numpy()
    lam, vec = np.linalg.eigh(h)
    order = np.argsort(-np.abs(lam))[:5]
    solver = ArnoldiSolver.from_spec(CurvatureSpec(mlp.task, mlp.train, shift=mlp.l2), rank=5, iterations=40)
    np.testing.assert_allclose(solver.eigenvalues.numpy(), lam[order], rtol=1e-6)
    # the subspaces agree: |<u_j, v_j>| = 1 up to sign
    overlap = np.abs(np.sum(solver.eigenvectors.numpy() * vec[:, order], axis=0))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-5)
    # and the solve is the spectral formula on those pairs, by a for-loop over them
    b = np.random.default_rng(1).normal(size=h.shape[0])
    want = sum(vec[:, j] * (vec[:, j] @ b) / lam[j] for j in order)
    got = solver.solve(torch.tensor(b)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_arnoldi_approaches_explicit_if_as_rank_grows(mlp: Problem) -> None:
    curv: dict[str, Any] = {"output": per_record_logits(mlp.model), "output_loss": ce_of_logits}
    exact = InfluenceFunction(mlp.task, l2=mlp.l2, **curv).cache(mlp.train).attribute(mlp.query)
    d = ObjectiveHessian(mlp.task, mlp.train).dim
    errors = []
    for rank in (2, 8, 32, d):
        approx = InfluenceFunction(mlp.task, strategy="arnoldi", l2=mlp.l2, rank=rank, iterations=d, **curv)
        scores = approx.cache(mlp.train).attribute(mlp.query)
        errors.append(float((scores - exact).norm() / exact.norm()))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 0.05 and errors[-1] < 1e-6, errors


def test_arnoldi_refuses_bad_options_and_a_singular_hessian() -> None:
    lr = logreg_problem()
    spec = CurvatureSpec(lr.task, lr.train, shift=lr.l2)
    d = ObjectiveHessian(lr.task, lr.train).dim
    with pytest.raises(RlattrError, match=rf"rank: got 0; supported: an integer in \[1, {d}\]"):
        ArnoldiSolver.from_spec(spec, rank=0)
    with pytest.raises(RlattrError, match=r"iterations: got 3; supported: an integer in \[rank=5, "):
        ArnoldiSolver.from_spec(spec, rank=5, iterations=3)
    # without l2 the softmax Hessian is singular (the logits' sum is free): full rank must refuse
    with pytest.raises(RlattrError, match=r"damping: the Hessian plus l2 \+ damping \(0\) has a Ritz value"):
        ArnoldiSolver.from_spec(CurvatureSpec(lr.task, lr.train), rank=d, iterations=d)
