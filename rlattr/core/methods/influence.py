"""Influence functions (Koh & Liang 2017): ``score(q, i) = g_q^T H^-1 g_i``.

H is the Hessian of the training objective ``(1/N) sum_i l_i + (l2 / 2) ||theta||^2`` at the
model's parameters, plus ``damping``: pass the objective's own L2 coefficient as ``l2`` so the
Hessian is the objective's. Removing record i moves the query loss by about ``+score / N``
(positive = the record helps the query). The inverse is applied to the query side (m solves,
however many training records), by one of the strategies of :data:`STRATEGIES`:

* ``"explicit"``: dense Hessian and Cholesky (models of up to a few thousand parameters);
  options ``block``, ``rtol``.
* ``"cg"``: conjugate gradient with Hessian-vector products; options ``max_iter``, ``tol``.
* ``"lissa"``: LiSSA recursion; options ``depth``, ``scale``, ``batch_size``, ``repeats``, ``seed``.
* ``"ekfac"``: EK-FAC for Linear / Conv2d layers; option ``fisher_loss`` (refuses ``output``).
* ``"arnoldi"``: the inverse on H's top-``rank`` eigenspace found by Arnoldi iteration (Schioppa et
  al.); options ``rank``, ``iterations``, ``seed``, ``rtol``.

The table and the :class:`~rlattr.core.methods.solvers.Solver` protocol live in
:mod:`rlattr.core.methods.solvers`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self

import torch
from torch import Tensor

from rlattr.core.methods.base import Attributor, FeaturePass, group_masks, query_grads
from rlattr.core.methods.hessian import CurvatureSpec, l2_shift
from rlattr.core.methods.solvers import Solver, build_solver, check_strategy
from rlattr.core.task import Batch, L2Spec, Task
from rlattr.errors import RlattrError


class InfluenceFunction(Attributor):
    """``g_q^T (H + damping I)^-1 g_i`` with H the training objective's Hessian.

    Args:
        task: the Task; its loss gives ``g_i`` and the Hessian, its target (or its loss on the
            query records) gives ``g_q``.
        strategy: a key of :data:`~rlattr.core.methods.solvers.STRATEGIES`: ``"explicit"``,
            ``"cg"``, ``"lissa"``, ``"ekfac"`` or ``"arnoldi"``.
        l2: the L2 coefficient of the training objective (``(l2 / 2) ||theta||^2``); part of H. A
            float, or per parameter (e.g. weight decay on weights only): a mapping from every tracked
            parameter name to its coefficient, or a callable ``name -> coefficient`` (the objective is
            then ``sum_p (l2_p / 2) ||theta_p||^2``; every strategy but ``"ekfac"``).
        damping: extra numerical damping added to H's diagonal.
        hessian_data: records to estimate H on (default: the cached training records).
        output, output_loss: ``(params, batch) -> Tensor[n, C]`` and ``(z, batch) -> Tensor[n]``:
            use the Gauss-Newton matrix instead of the Hessian (explicit, CG, LiSSA, Arnoldi; EK-FAC refuses
            them); for networks whose Hessian is indefinite. Equal to the Hessian for GLMs.
        chunk_size: records per vmap chunk.
        **options: the strategy's own options (see the module docstring).
    """

    def __init__(
        self,
        task: Task,
        *,
        strategy: str = "explicit",
        l2: L2Spec = 0.0,
        damping: float = 0.0,
        hessian_data: Batch | None = None,
        output: Callable[..., Tensor] | None = None,
        output_loss: Callable[..., Tensor] | None = None,
        chunk_size: int = 128,
        **options: Any,
    ) -> None:
        super().__init__(task, chunk_size=chunk_size)
        if (output is None) != (output_loss is None):
            raise RlattrError("output, output_loss: pass both (Gauss-Newton curvature) or neither (Hessian)")
        if (
            isinstance(damping, bool)
            or not isinstance(damping, (int, float))
            or not 0 <= damping < float("inf")
        ):
            raise RlattrError(f"damping: got {damping!r}; supported: a finite number >= 0")
        coefs = task.l2_coefficients(l2)
        check_strategy(
            strategy, options, gauss_newton=output is not None, per_parameter_l2=isinstance(coefs, dict)
        )
        self.output, self.output_loss = output, output_loss
        self.strategy, self.l2, self.damping = strategy, coefs, float(damping)
        self.hessian_data, self.options = hessian_data, options
        self._solver: Solver | None = None

    @property
    def solver(self) -> Solver:
        """The cached inverse-curvature solver (built by :meth:`cache`)."""
        if self._solver is None:
            raise RuntimeError(f"{type(self).__name__}: call cache(train) first")
        return self._solver

    accepts_curvature = True

    @property
    def curvature_block(self) -> int:
        """Hessian columns per autograd pass of the dense curvature (the explicit solver's ``block``)."""
        return int(self.options.get("block", 256))

    def curvature_spec(self, train: Batch, record_total: Tensor | None = None) -> CurvatureSpec:
        """What :meth:`cache` builds its solver from: H on ``hessian_data`` (default ``train``);
        with ``record_total`` (the records' :meth:`~rlattr.core.methods.hessian.ObjectiveHessian.record_sum`,
        computed elsewhere) the solver is finished from it instead of a pass over the records."""
        return CurvatureSpec(
            self.task,
            train if self.hessian_data is None else self.hessian_data,
            shift=l2_shift(self.task, self.l2, self.damping),
            chunk_size=max(self.chunk_size, 256),
            output=self.output,
            output_loss=self.output_loss,
            record_total=record_total,
        )

    def cache(self, train: Batch) -> Self:
        return self._cache_passes(train)

    def feature_passes(self) -> list[FeaturePass]:
        return [(self.task, None, None)]

    def _cache_features(self, train: Batch, features: list[Tensor], curvature: Tensor | None) -> None:
        self._solver = build_solver(self.curvature_spec(train, curvature), self.strategy, **self.options)
        self._train = features[0]

    def query_vectors(self, query: Batch) -> list[Tensor]:
        self._require_cache()
        self.check_query(query)
        return [query_grads(self.task, query, chunk_size=self.chunk_size)]

    def score_vectors(self, vectors: list[Tensor]) -> Tensor:
        train = self._require_cache()
        q = vectors[0]
        if q.dim() != 2 or q.shape[1] != train.shape[1]:
            raise RlattrError(
                f"query: expected gradients of shape (m, {train.shape[1]}), got {tuple(q.shape)}"
            )
        solved = self.solver.solve(q.T.to(train.dtype)).T
        return solved @ train.T

    def attribute(self, query: Batch) -> Tensor:
        return self.score_vectors(self.query_vectors(query))

    def attribute_by_group(self, query: Batch) -> Tensor:
        """Per-group contributions ``Tensor[m, n, G]`` from one solve of all G x m masked queries
        (one Cholesky solve, or one CG run on a block of columns, instead of G separate solves)."""
        train = self._require_cache()
        q = self.query_vectors(query)[0].to(train.dtype)
        masks = group_masks(self.task, dtype=train.dtype, device=train.device)  # [G, d]
        g, (m, d) = masks.shape[0], q.shape
        stacked = (masks[:, None, :] * q[None]).reshape(g * m, d)
        solved = self.solver.solve(stacked.T).T.reshape(g, m, d)
        return torch.einsum("gmd,nd->mng", solved, train)

    def inverse_hvp(self, vectors: Tensor) -> Tensor:
        """``H^-1 v`` for ``vectors: Tensor[k, d]`` (rows), with the cached solver."""
        self._require_cache()
        return self.solver.solve(vectors.T).T


def self_influence(attributor: InfluenceFunction) -> Tensor:
    """``g_i^T H^-1 g_i`` for every cached training record: ``Tensor[n]`` (mislabel detection)."""
    g = attributor._require_cache()
    out = []
    for start in range(0, g.shape[0], 256):
        rows = g[start : start + 256]
        out.append((attributor.inverse_hvp(rows) * rows).sum(1))
    return torch.cat(out)
