"""A per-parameter l2 (weight decay on weights only): influence against a brute-force Hessian of the
objective with that decay, every strategy that takes it, the mapping and callable forms, and the
refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.func import functional_call, hessian

from rlattr.core.methods import InfluenceFunction
from rlattr.core.methods.base import query_grads
from rlattr.core.methods.hessian import ObjectiveHessian, l2_shift
from rlattr.errors import RlattrError
from rlattr.testing.supervised import ce_of_logits, per_record_logits
from tests.core._tda import Problem, mlp_problem

DECAY = 0.05


def weights_only(name: str) -> float:
    return DECAY if name.endswith("weight") else 0.0


@pytest.fixture(scope="module")
def mlp() -> Problem:
    return mlp_problem(n=40)


def _brute_force_hessian(p: Problem) -> torch.Tensor:
    """Hessian of ``mean CE + sum_p (l2_p / 2) ||theta_p||^2`` in the flat parameter vector."""
    names = p.task.tracked_names
    shapes = [p.task.tracked_params()[n].shape for n in names]
    sizes = [s.numel() for s in shapes]

    def objective(flat: torch.Tensor) -> torch.Tensor:
        parts = dict(
            zip(names, [t.reshape(s) for t, s in zip(flat.split(sizes), shapes, strict=True)], strict=True)
        )
        logits = functional_call(p.model, parts, (p.train["x"],))
        ce = torch.nn.functional.cross_entropy(logits, p.train["y"])
        return ce + sum(0.5 * weights_only(n) * parts[n].pow(2).sum() for n in names)

    theta = torch.cat([p.task.tracked_params()[n].reshape(-1) for n in names])
    return hessian(objective)(theta)


def test_weight_decay_on_weights_only_matches_the_brute_force_hessian(mlp: Problem) -> None:
    h = _brute_force_hessian(mlp)
    low = float(torch.linalg.eigvalsh(h)[0])
    damping = max(0.0, -low) + 0.05  # the exact MLP Hessian may be indefinite; damping is isotropic
    h = h + damping * torch.eye(h.shape[0], dtype=h.dtype)
    g_train = query_grads(mlp.task, mlp.train)
    g_query = query_grads(mlp.task, mlp.query)
    want = g_query @ torch.linalg.solve(h, g_train.T)
    got = InfluenceFunction(mlp.task, l2=weights_only, damping=damping).cache(mlp.train).attribute(mlp.query)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    # the mapping form is the same objective; CG and full-rank Arnoldi solve the same system
    mapping = {n: weights_only(n) for n in mlp.task.tracked_names}
    options: list[tuple[str, dict[str, Any]]] = [
        ("explicit", {}),
        ("cg", {"max_iter": 2000, "tol": 1e-12}),
        ("arnoldi", {"rank": h.shape[0], "iterations": h.shape[0]}),
    ]
    for strategy, opts in options:
        attributor = InfluenceFunction(mlp.task, strategy=strategy, l2=mapping, damping=damping, **opts)
        torch.testing.assert_close(
            attributor.cache(mlp.train).attribute(mlp.query), want, rtol=1e-6, atol=1e-8
        )


def test_the_diagonal_is_per_parameter_in_every_product(mlp: Problem) -> None:
    shift = l2_shift(mlp.task, mlp.task.l2_coefficients(weights_only), 0.01)
    assert isinstance(shift, torch.Tensor)
    # the diagonal by a for-loop over tensors: l2_p + damping on each of its entries
    named = dict(mlp.model.named_parameters())
    want = torch.cat(
        [
            torch.full((named[n].numel(),), weights_only(n) + 0.01, dtype=torch.float64)
            for n in mlp.task.tracked_names
        ]
    )
    torch.testing.assert_close(shift, want.double())
    curv: dict[str, Any] = {"output": per_record_logits(mlp.model), "output_loss": ce_of_logits}
    plain = ObjectiveHessian(mlp.task, mlp.train, **curv).dense()
    paths: list[dict[str, Any]] = [
        {},
        {"factor_bytes": 0},
        {"dense_dim": 0},
        {"dense_dim": 0, "factor_bytes": 0},
    ]
    for kw in paths:  # factors, autograd, chunked factors, autograd products
        h = ObjectiveHessian(mlp.task, mlp.train, shift=shift, **kw, **curv)
        torch.testing.assert_close(h.dense(), plain + torch.diag(want.double()), rtol=1e-10, atol=1e-12)
        v = torch.randn(h.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(
            h.matvec(v), (plain + torch.diag(want.double())) @ v, rtol=1e-10, atol=1e-12
        )


def test_equal_coefficients_collapse_to_one_float(mlp: Problem) -> None:
    assert mlp.task.l2_coefficients(lambda name: 0.1) == 0.1
    assert mlp.task.l2_coefficients({n: 0.1 for n in mlp.task.tracked_names}) == 0.1
    # so EK-FAC takes a uniform mapping, and refuses a per-parameter one by name
    InfluenceFunction(mlp.task, strategy="ekfac", l2={n: 0.1 for n in mlp.task.tracked_names})
    with pytest.raises(
        RlattrError, match=r"l2: got a per-parameter l2 for strategy 'ekfac'.*supported: a float"
    ):
        InfluenceFunction(mlp.task, strategy="ekfac", l2=weights_only)


@pytest.mark.parametrize(
    ("l2", "match"),
    [
        (-0.1, r"l2: got -0.1; supported: a finite number >= 0"),
        (float("nan"), r"l2: got nan; supported"),
        ({"0.weight": 0.1}, r"l2: got a mapping missing tracked parameter\(s\) \['0.bias', "),
        (lambda name: -1.0, r"l2: got -1.0 for '0.weight'; supported"),
        (lambda name: "big", r"l2: got 'big' for '0.weight'; supported"),
    ],
)
def test_bad_l2_is_named(mlp: Problem, l2: object, match: str) -> None:
    with pytest.raises(RlattrError, match=match):
        InfluenceFunction(mlp.task, l2=l2)  # type: ignore[arg-type]


def test_unknown_names_in_the_mapping_are_refused(mlp: Problem) -> None:
    mapping = {n: 0.1 for n in mlp.task.tracked_names} | {"head.weight": 0.1}
    with pytest.raises(RlattrError, match=r"with unknown name\(s\) \['head.weight'\]"):
        InfluenceFunction(mlp.task, l2=mapping)
