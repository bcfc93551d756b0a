"""Inverse-curvature solvers: the :class:`Solver` protocol and the strategy table that selects one.

A solver applies ``C^-1`` to the columns of ``B: Tensor[d, k]``, C being a curvature of the
training objective (its Hessian, a Gauss-Newton matrix, or EK-FAC's eigenvalue-corrected Fisher)
plus ``shift`` (l2 + damping). :data:`STRATEGIES` maps a strategy name to a solver class; every
class is built the same way, ``from_spec(spec, **options)`` from one
:class:`~rlattr.core.methods.hessian.CurvatureSpec`, takes as options the keyword-only arguments of
its constructor, and says by ``gauss_newton`` whether it honours the spec's ``output`` /
``output_loss``. A new strategy is one class and one row of the table (as ``"arnoldi"`` was).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, Protocol, cast

from torch import Tensor

from rlattr.core.methods.arnoldi import ArnoldiSolver
from rlattr.core.methods.cg import CGSolver
from rlattr.core.methods.ekfac import EKFACSolver
from rlattr.core.methods.explicit import ExplicitSolver
from rlattr.core.methods.hessian import CurvatureSpec
from rlattr.core.methods.lissa import LiSSASolver
from rlattr.errors import RlattrError


class Solver(Protocol):
    """An inverse-curvature-vector product."""

    def solve(self, b: Tensor) -> Tensor:
        """``C^-1 b`` for ``b: Tensor[d, k]``, in the curvature's dtype and device."""
        ...


class SolverClass(Protocol):
    """A row of :data:`STRATEGIES`: a class that builds a :class:`Solver` from a CurvatureSpec."""

    @property
    def gauss_newton(self) -> bool:
        """Whether it uses the spec's Gauss-Newton ``output`` / ``output_loss``."""
        ...

    def from_spec(self, spec: CurvatureSpec, **options: Any) -> Solver: ...


STRATEGIES: dict[str, SolverClass] = {
    "explicit": ExplicitSolver,
    "cg": CGSolver,
    "lissa": LiSSASolver,
    "ekfac": EKFACSolver,
    "arnoldi": ArnoldiSolver,
}

_FROM_SPEC = frozenset(f.name for f in fields(CurvatureSpec))  # set by the spec, never an option


def strategy_options(strategy: str) -> list[str]:
    """The options ``strategy`` takes: its class's keyword-only constructor arguments."""
    params = inspect.signature(cast(Callable[..., Any], STRATEGIES[strategy])).parameters
    return [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in _FROM_SPEC]


def check_strategy(
    strategy: str, options: Mapping[str, Any], *, gauss_newton: bool, per_parameter_l2: bool = False
) -> SolverClass:
    """The solver class of ``strategy``, after refusing options it would not use.

    Raises an RlattrError for an unknown strategy, options it does not take, a Gauss-Newton
    curvature (``gauss_newton``) that it would silently ignore, or a per-parameter l2 it cannot add.
    """
    if strategy not in STRATEGIES:
        raise RlattrError(f"strategy: got {strategy!r}; supported: {sorted(STRATEGIES)}")
    allowed = strategy_options(strategy)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise RlattrError(f"options: got {unknown} for strategy {strategy!r}; supported: {allowed}")
    cls = STRATEGIES[strategy]
    if gauss_newton and not cls.gauss_newton:
        honour = sorted(s for s, c in STRATEGIES.items() if c.gauss_newton)
        raise RlattrError(
            f"output, output_loss: strategy {strategy!r} ignores a Gauss-Newton curvature; "
            f"supported with strategies {honour}"
        )
    if per_parameter_l2 and not getattr(cls, "per_parameter_shift", False):
        honour = sorted(s for s, c in STRATEGIES.items() if getattr(c, "per_parameter_shift", False))
        raise RlattrError(
            f"l2: got a per-parameter l2 for strategy {strategy!r}, which adds one shift to its whole "
            f"curvature; supported: a float, or a per-parameter l2 with strategies {honour}"
        )
    return cls


def build_solver(spec: CurvatureSpec, strategy: str, **options: Any) -> Solver:
    """The :class:`Solver` of ``strategy`` on ``spec``'s curvature (options checked first)."""
    cls = check_strategy(
        strategy,
        options,
        gauss_newton=spec.output is not None,
        per_parameter_l2=isinstance(spec.shift, Tensor),
    )
    if spec.record_total is not None and not getattr(cls, "record_total", False):
        honour = sorted(s for s, c in STRATEGIES.items() if getattr(c, "record_total", False))
        raise RlattrError(
            f"curvature: got a precomputed record sum for strategy {strategy!r}, which builds its own "
            f"curvature from the records; supported with strategies {honour}"
        )
    return cls.from_spec(spec, **options)


__all__ = ["STRATEGIES", "Solver", "SolverClass", "build_solver", "check_strategy", "strategy_options"]
