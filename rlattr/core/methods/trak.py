"""TRAK (Park et al. 2023): projected gradients of an output function, an ensemble of models.

For each model c, ``phi_i = P_c^T grad out_i`` (k numbers, P_c a seeded random projection) and

    score_c(q, i) = (P_c^T v_q)^T (Phi^T Phi + lambda I)^-1 (P_c^T u_i),

with ``u_i = -w_i grad out_i`` the loss side of record i linearised through its output
(``w_i = dloss_i / d(-out_i)``, e.g. ``1 - p_i`` for the margin of a softmax classifier) and
``v_q`` the query's loss gradient (``-grad out_q`` for an output query, ``g_q`` for a Task target).
The scores of the models are averaged. With no ``output``, ``out_i = -loss_i`` and ``w_i = 1``: the
kernel is the projected empirical Fisher. ``lambda = damping * mean_i ||phi_i||^2`` (invariant to
the projection). When k exceeds n, the same scores come from the n x n dual form.
Positive = the record helps the query.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rlattr.core.methods.base import Attributor, FeaturePass, featurise, query_grads
from rlattr.core.methods.tracin import check_checkpoints
from rlattr.core.projection import ProjectionKind, RandomProjection
from rlattr.core.task import Batch, Params, Task
from rlattr.errors import RlattrError

OutputFn = Callable[[Params, Batch], Tensor]


class TRAK(Attributor):
    """TRAK scores averaged over an ensemble of models.

    Args:
        task: the Task (architecture, loss, tracked parameters, optional target).
        models: ``[dict[name, Tensor]]``: tracked parameters of each ensemble member (default:
            the model's current parameters alone).
        proj_dim: k; ``None`` for no projection (exact gradients, small models).
        proj_kind: the projection's kind (see :class:`RandomProjection`); model c uses seed ``seed + c``.
        damping: lambda relative to the mean squared feature norm.
        output: per-record output function ``(params, batch) -> Tensor[n]`` (e.g. the margin), or None.
        output_weight: ``(params, batch) -> Tensor[n]``, ``w_i`` above; default 1.
        chunk_size: records per vmap chunk.
    """

    def __init__(
        self,
        task: Task,
        models: Sequence[Params] | None = None,
        *,
        proj_dim: int | None = 2048,
        proj_kind: ProjectionKind = "gaussian",
        seed: int = 0,
        damping: float = 1e-3,
        output: OutputFn | None = None,
        output_weight: OutputFn | None = None,
        chunk_size: int = 128,
    ) -> None:
        super().__init__(task, chunk_size=chunk_size)
        members = list(models) if models is not None else [task.tracked_params()]
        self.models = [{k: v.detach().clone() for k, v in m.items()} for m in members]
        check_checkpoints(task, self.models, [1.0] * len(self.models), what="models")
        if proj_dim is not None and proj_dim < 1:
            raise RlattrError(f"proj_dim: must be >= 1 or None, got {proj_dim}")
        if not damping >= 0:
            raise RlattrError(f"damping: must be >= 0, got {damping}")
        if output_weight is not None and output is None:
            raise RlattrError("output_weight: given without output; pass output= too")
        self.damping, self.output, self.output_weight = damping, output, output_weight
        d = task.num_params
        self.projectors = [
            RandomProjection(d, proj_dim, proj_kind, seed=seed + c) if proj_dim is not None else None
            for c in range(len(self.models))
        ]
        self._out_task = Task(task.model, output, params=task.tracked_names) if output is not None else None
        self._parts: list[tuple[Tensor, Tensor | None]] = []

    def _model_part(self, train: Batch, params: Params, phi: Tensor) -> tuple[Tensor, Tensor | None]:
        if self._out_task is None:
            sign = torch.ones(phi.shape[0], dtype=phi.dtype, device=phi.device)
        else:
            w = (
                self.output_weight(params, train)
                if self.output_weight is not None
                else torch.ones(phi.shape[0], dtype=phi.dtype, device=phi.device)
            )
            sign = -w.detach().to(phi).reshape(-1)
        n, k = phi.shape
        lam = self.damping * float(phi.pow(2).sum(1).mean())
        if k <= n:
            kern = phi.T @ phi + lam * torch.eye(k, dtype=phi.dtype, device=phi.device)
            return torch.linalg.solve(kern, (sign[:, None] * phi).T).T, None
        gram = phi @ phi.T + lam * torch.eye(n, dtype=phi.dtype, device=phi.device)
        return phi, torch.linalg.solve(gram, torch.diag(sign))

    def cache(self, train: Batch) -> TRAK:
        return self._cache_passes(train)

    def feature_passes(self) -> list[FeaturePass]:
        task = self._out_task if self._out_task is not None else self.task
        return [(task, p, proj) for p, proj in zip(self.models, self.projectors, strict=True)]

    def _cache_features(self, train: Batch, features: list[Tensor], curvature: Tensor | None) -> None:
        self._parts = [self._model_part(train, p, phi) for p, phi in zip(self.models, features, strict=True)]
        self._train = self._parts[0][0]

    def query_vectors(self, query: Batch) -> list[Tensor]:
        self._require_cache()
        self.check_query(query)
        if self._out_task is None or self.task.target is not None:
            return [query_grads(self.task, query, params=p, chunk_size=self.chunk_size) for p in self.models]
        out = self._out_task
        return [-featurise(out, query, (out, p, None), chunk_size=self.chunk_size) for p in self.models]

    def score_vectors(self, vectors: list[Tensor]) -> Tensor:
        self._require_cache()
        total = None
        for v, proj, (left, right) in zip(vectors, self.projectors, self._parts, strict=True):
            vp = proj.project(v) if proj is not None else v
            part = vp.to(left.dtype) @ left.T
            part = part @ right if right is not None else part
            total = part if total is None else total + part
        assert total is not None
        return total / len(self.models)

    def attribute(self, query: Batch) -> Tensor:
        return self.score_vectors(self.query_vectors(query))
