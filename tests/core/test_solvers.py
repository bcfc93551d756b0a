"""The Solver strategy table: every strategy against a numpy inverse of the closed-form logistic
Hessian, the options each takes, refused options, and conjugate gradient on an indefinite Hessian."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from rlattr.core.methods import STRATEGIES, InfluenceFunction
from rlattr.core.methods.hessian import CurvatureSpec, ObjectiveHessian
from rlattr.core.methods.solvers import build_solver, strategy_options
from rlattr.errors import RlattrError
from rlattr.testing.supervised import ce_of_logits, classification_task, per_record_logits
from tests.core._tda import Problem, logreg_closed_form, logreg_problem

SHIFT = 0.5  # damping large enough that LiSSA converges in a few hundred steps


@pytest.fixture(scope="module")
def lr() -> Problem:
    return logreg_problem()


def test_table_names_and_options() -> None:
    assert sorted(STRATEGIES) == ["arnoldi", "cg", "ekfac", "explicit", "lissa"]
    assert strategy_options("explicit") == ["block", "rtol"]
    assert strategy_options("cg") == ["max_iter", "tol", "precondition"]
    assert strategy_options("lissa") == ["depth", "scale", "batch_size", "repeats", "seed"]
    assert strategy_options("ekfac") == ["fisher_loss"]  # chunk_size comes from the spec
    assert strategy_options("arnoldi") == ["rank", "iterations", "seed", "rtol"]
    assert [s for s, c in STRATEGIES.items() if c.gauss_newton] == ["explicit", "cg", "lissa", "arnoldi"]


@pytest.mark.parametrize(
    ("strategy", "options", "rtol"),
    [
        ("explicit", {}, 1e-9),
        ("cg", {"max_iter": 300, "tol": 1e-12}, 1e-8),
        ("lissa", {"depth": 400}, 1e-6),
    ],
)
def test_hessian_strategies_invert_the_closed_form_hessian(
    lr: Problem, strategy: str, options: dict[str, float], rtol: float
) -> None:
    _, h = logreg_closed_form(lr, lr.train["x"], lr.train["y"])
    hess = h.mean(0) + (lr.l2 + SHIFT) * np.eye(h.shape[1])
    if strategy == "lissa":
        options = {**options, "scale": 1.2 * float(np.linalg.eigvalsh(hess)[-1])}
    b = np.random.default_rng(0).normal(size=(h.shape[1], 3))
    spec = CurvatureSpec(lr.task, lr.train, shift=lr.l2 + SHIFT)
    got = build_solver(spec, strategy, **options).solve(torch.tensor(b))
    np.testing.assert_allclose(got.numpy(), np.linalg.solve(hess, b), rtol=rtol, atol=rtol * 1e-2)


def test_ekfac_refuses_a_gauss_newton_curvature_it_would_ignore(lr: Problem) -> None:
    curv: dict[str, Any] = {"output": per_record_logits(lr.model), "output_loss": ce_of_logits}
    with pytest.raises(
        RlattrError, match=r"output, output_loss: strategy 'ekfac' ignores a Gauss-Newton curvature; "
    ):
        InfluenceFunction(lr.task, strategy="ekfac", l2=lr.l2, **curv)
    with pytest.raises(RlattrError, match="output, output_loss: got a Gauss-Newton curvature"):
        STRATEGIES["ekfac"].from_spec(CurvatureSpec(lr.task, lr.train, shift=lr.l2, **curv))


def test_unknown_strategy_and_options_are_refused_at_construction(lr: Problem) -> None:
    with pytest.raises(RlattrError, match=r"strategy: got 'newton'; supported: \['arnoldi', 'cg', 'ekfac'"):
        InfluenceFunction(lr.task, strategy="newton")
    with pytest.raises(
        RlattrError, match=r"options: got \['depth'\] for strategy 'cg'; supported: \['max_iter'"
    ):
        InfluenceFunction(lr.task, strategy="cg", depth=3)
    with pytest.raises(RlattrError, match=r"options: got \['chunk_size'\] for strategy 'ekfac'"):
        build_solver(CurvatureSpec(lr.task, lr.train, shift=lr.l2), "ekfac", chunk_size=8)
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(RlattrError, match=r"damping: got .*; supported: a finite number >= 0"):
            InfluenceFunction(lr.task, damping=bad)


def _indefinite() -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An untrained tanh MLP: its cross-entropy Hessian has negative eigenvalues."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    train = {"x": 2 * torch.randn(30, 4, dtype=torch.float64), "y": torch.randint(0, 3, (30,))}
    query = {"x": torch.randn(2, 4, dtype=torch.float64), "y": torch.randint(0, 3, (2,))}
    return model, train, query


def test_cg_on_an_indefinite_hessian_names_the_curvature_and_the_remedies() -> None:
    model, train, query = _indefinite()
    task = classification_task(model)
    low = float(torch.linalg.eigvalsh(ObjectiveHessian(task, train).dense())[0])
    assert low < -1e-3  # the premise: H is indefinite, so l2=1e-3 cannot make it positive definite
    with pytest.raises(RlattrError, match="non-positive curvature") as err:
        InfluenceFunction(task, strategy="cg", l2=1e-3).cache(train).attribute(query)
    message = str(err.value)
    assert "Gauss-Newton" in message and message.startswith("damping: ")
    rayleigh = float(re.search(r"p\^T p = (-?[\d.e+-]+) along", message).group(1))  # type: ignore[union-attr]
    assert low + 1e-3 - 1e-9 <= rayleigh <= 0  # a Rayleigh quotient of H + 1e-3 I: at least its lowest eig
    bound = float(re.search(r"puts above (-?[\d.e+-]+);", message).group(1))  # type: ignore[union-attr]
    assert bound == pytest.approx(1e-3 - rayleigh, rel=1e-2)
    assert 1e-3 <= bound <= -low + 1e-9  # a true lower bound on the l2 + damping CG needs

    # remedy 1: damping above |lambda_min| gives the solve of the damped system
    damping = -low + 0.1
    cg = InfluenceFunction(task, strategy="cg", l2=1e-3, damping=damping, max_iter=500, tol=1e-12)
    explicit = InfluenceFunction(task, strategy="explicit", l2=1e-3, damping=damping)
    torch.testing.assert_close(
        cg.cache(train).attribute(query), explicit.cache(train).attribute(query), rtol=1e-7, atol=1e-9
    )
    # remedy 2: the Gauss-Newton matrix is positive semi-definite, so CG runs with a small l2
    curv: dict[str, Any] = {"output": per_record_logits(model), "output_loss": ce_of_logits}
    ggn_cg = InfluenceFunction(task, strategy="cg", l2=1e-3, max_iter=500, tol=1e-12, **curv)
    ggn_explicit = InfluenceFunction(task, strategy="explicit", l2=1e-3, **curv)
    torch.testing.assert_close(
        ggn_cg.cache(train).attribute(query), ggn_explicit.cache(train).attribute(query), rtol=1e-6, atol=1e-8
    )


def test_factored_gauss_newton_equals_the_autograd_products() -> None:
    """The per-record factors (J, A) give the same products as the vmap'd autograd path."""
    model, train, _ = _indefinite()
    task = classification_task(model)
    curv: dict[str, Any] = {"output": per_record_logits(model), "output_loss": ce_of_logits}
    fast = ObjectiveHessian(task, train, shift=0.1, **curv)
    slow = ObjectiveHessian(task, train, shift=0.1, factor_bytes=0, dense_dim=0, **curv)
    assert fast.factors() is not None and slow.factors() is None
    assert ObjectiveHessian(task, train, dense_dim=fast.dim - 1, **curv).factors() is None  # too big
    v = torch.randn(fast.dim, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fast._product(v, None), slow.matvec(v), rtol=1e-10, atol=1e-12)
    options: list[dict[str, Any]] = [{"factor_bytes": 0}, {}]
    for kw in options:  # products through H built once, with and without factors
        built = ObjectiveHessian(task, train, shift=0.1, **kw, **curv)
        torch.testing.assert_close(built.matvec(v), slow.matvec(v), rtol=1e-10, atol=1e-12)
        assert built._dense is not None
    idx = torch.tensor([1, 4, 9])
    torch.testing.assert_close(fast.matvec(v, idx), slow.matvec(v, idx), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.dense(), slow.dense(), rtol=1e-10, atol=1e-12)
    # and both are the dense J^T A J by a for-loop over records
    jac, a = fast.factors()  # type: ignore[misc]
    want = sum(jac[i].T @ a[i] @ jac[i] for i in range(jac.shape[0])) / jac.shape[0]
    torch.testing.assert_close(fast.dense(), want + 0.1 * torch.eye(fast.dim, dtype=torch.float64))
    # above dense_dim, the dense matrix still comes from factors: chunks of 7 records (J per chunk
    # within factor_bytes), upper blocks only, and is the same matrix
    per_record = jac.shape[1] * fast.dim * 8
    chunked = ObjectiveHessian(task, train, shift=0.1, dense_dim=0, factor_bytes=7 * per_record, **curv)
    assert chunked.factors() is None and chunked._gram_chunk() == 7
    torch.testing.assert_close(chunked.dense(), slow.dense(), rtol=1e-10, atol=1e-12)
    assert torch.equal(chunked.dense(), chunked.dense().T)  # mirrored blocks: exactly symmetric


def test_per_record_jacobians_equal_an_autograd_loop() -> None:
    """record_curvature_factors: J_i row by row from autograd.grad, A_i from torch.func.hessian."""
    from torch.func import hessian

    from rlattr.core.methods.ggn import record_curvature_factors

    model, train, _ = _indefinite()
    task = classification_task(model)
    jac, a = record_curvature_factors(task, per_record_logits(model), ce_of_logits, train)
    params = list(model.parameters())
    for i in (0, 17):
        z = model(train["x"][i : i + 1])[0]
        grads = [torch.autograd.grad(z[c], params, retain_graph=True) for c in range(3)]
        rows = [torch.cat([g.reshape(-1) for g in row]) for row in grads]
        torch.testing.assert_close(jac[i], torch.stack(rows), rtol=1e-12, atol=1e-14)
        label = {"y": train["y"][i : i + 1]}
        want_a = hessian(lambda u, label=label: ce_of_logits(u[None], label)[0])(z.detach())
        torch.testing.assert_close(a[i], want_a, rtol=1e-12, atol=1e-14)


def test_explicit_on_an_indefinite_hessian_with_l2_does_not_ask_for_l2() -> None:
    model, train, _ = _indefinite()
    task = classification_task(model)
    low = float(torch.linalg.eigvalsh(ObjectiveHessian(task, train).dense())[0])
    with pytest.raises(RlattrError, match=r"l2 \+ damping must exceed ([\d.e+-]+) \(the Hessian") as err:
        InfluenceFunction(task, l2=1e-3).cache(train)
    assert "pass l2=" not in str(err.value) and "Gauss-Newton" in str(err.value)
    need = float(re.search(r"must exceed ([\d.e+-]+) ", str(err.value)).group(1))  # type: ignore[union-attr]
    assert need == pytest.approx(-low, rel=1e-2)  # minus the undamped Hessian's smallest eigenvalue
    with pytest.raises(RlattrError, match=r"\(0\) is singular .*; pass l2= \(the objective's L2\)"):
        InfluenceFunction(task).cache(train)


@pytest.mark.parametrize("strategy", ["explicit", "cg", "arnoldi"])
def test_by_group_scores_come_from_one_batched_solve_and_match_the_per_group_loop(strategy: str) -> None:
    from rlattr.core.methods.base import Attributor

    lr = logreg_problem(n=40, groups="tensor")
    by_strategy: dict[str, dict[str, Any]] = {"cg": {"max_iter": 300, "tol": 1e-12}, "arnoldi": {"rank": 10}}
    options = by_strategy.get(strategy, {})
    attr = InfluenceFunction(lr.task, strategy=strategy, l2=lr.l2, **options).cache(lr.train)
    calls: list[int] = []
    solve = attr.solver.solve
    attr._solver.solve = lambda b: calls.append(b.shape[1]) or solve(b)  # type: ignore[union-attr,method-assign,func-returns-value]
    fast = attr.attribute_by_group(lr.query)
    assert calls == [2 * lr.query["y"].shape[0]]  # one solve: 2 groups (weight, bias) x m queries
    loop = Attributor.attribute_by_group(attr, lr.query)  # one score_vectors (solve) per group
    torch.testing.assert_close(fast, loop, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(fast.sum(-1), attr.attribute(lr.query), rtol=1e-8, atol=1e-10)
