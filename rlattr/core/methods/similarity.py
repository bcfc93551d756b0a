"""Gradient-similarity attribution: Grad-Dot and Grad-Cos, exact or through a random projection.

Grad-Dot: ``score(q, i) = g_q . g_i``; Grad-Cos: ``cos(g_q, g_i)``. With a projection P the
dot products are taken between ``P^T g`` (an unbiased estimate of the exact ones).
"""

from __future__ import annotations

from torch import Tensor

from rlattr.core.methods.base import Attributor, FeaturePass, query_grads
from rlattr.core.projection import RandomProjection
from rlattr.core.task import Batch, Task
from rlattr.errors import RlattrError


class GradDot(Attributor):
    """``g_q . g_i`` for every query q and cached training record i.

    Args:
        task: the Task (its loss defines g_i; its target, or its loss on the query, defines g_q).
        projector: optional :class:`RandomProjection` with ``dim_in == task.num_params``.
        chunk_size: records per vmap chunk.
    """

    normalize = False

    def __init__(
        self, task: Task, *, projector: RandomProjection | None = None, chunk_size: int = 128
    ) -> None:
        super().__init__(task, chunk_size=chunk_size)
        if projector is not None and projector.dim_in != task.num_params:
            raise RlattrError(
                f"projector: dim_in is {projector.dim_in}, but the task tracks {task.num_params} parameters"
            )
        self.projector = projector

    def _prepare(self, feats: Tensor) -> Tensor:
        if not self.normalize:
            return feats
        return feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def cache(self, train: Batch) -> GradDot:
        return self._cache_passes(train)

    def feature_passes(self) -> list[FeaturePass]:
        return [(self.task, None, self.projector)]

    def _cache_features(self, train: Batch, features: list[Tensor], curvature: Tensor | None) -> None:
        self._train = self._prepare(features[0])

    def attribute(self, query: Batch) -> Tensor:
        train = self._require_cache()
        self.check_query(query)
        q = query_grads(self.task, query, chunk_size=self.chunk_size)
        if self.projector is not None:
            q = self.projector.project(q)
        return self._prepare(q) @ train.T.to(q.dtype)

    def query_vectors(self, query: Batch) -> list[Tensor]:
        self.check_query(query)
        q = query_grads(self.task, query, chunk_size=self.chunk_size)
        if self.normalize:
            proj = self.projector.project(q) if self.projector is not None else q
            q = q / proj.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return [q]

    def score_vectors(self, vectors: list[Tensor]) -> Tensor:
        train = self._require_cache()
        q = vectors[0]
        if self.projector is not None:
            q = self.projector.project(q)
        return q @ train.T.to(q.dtype)


class GradCos(GradDot):
    """Cosine of ``g_q`` and ``g_i`` (exact or projected)."""

    normalize = True
