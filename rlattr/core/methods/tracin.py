"""TracIn (Pruthi et al. 2020), checkpoint form: ``score(q, i) = sum_c lr_c g_q(c) . g_i(c)``.

``g(c)`` are gradients at checkpoint c (a dict of tracked parameters saved during training) and
``lr_c`` the learning rate in force over the stretch of training that checkpoint stands for.
Positive = the record helps the query (a gradient step on it lowers the query loss).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from rlattr.core.methods.base import Attributor, FeaturePass, query_grads
from rlattr.core.projection import RandomProjection
from rlattr.core.task import Batch, Params, Task
from rlattr.errors import RlattrError


def check_checkpoints(
    task: Task, checkpoints: Sequence[Params], lrs: Sequence[float], what: str = "checkpoints"
) -> None:
    """Raise an RlattrError naming ``what`` unless there is at least one checkpoint, one learning
    rate per checkpoint, and every checkpoint holds the task's tracked parameters with the model's
    shapes."""
    if len(checkpoints) == 0:
        raise RlattrError(f"{what}: expected at least one dict of tracked parameters, got none")
    if len(lrs) != len(checkpoints):
        raise RlattrError(
            f"lrs: expected one learning rate per checkpoint ({len(checkpoints)}), got {len(lrs)}"
        )
    for c, ckpt in enumerate(checkpoints):
        task.check_params(ckpt, f"{what}[{c}]")


class TracIn(Attributor):
    """Learning-rate-weighted sum of gradient dot products over checkpoints.

    Args:
        task: the Task.
        checkpoints: ``[dict[name, Tensor]]``, tracked parameters at each checkpoint (default:
            the model's current parameters alone).
        lrs: learning rate per checkpoint (default 1.0 each).
        projector: optional :class:`RandomProjection` (``dim_in == task.num_params``), shared by
            all checkpoints.
        chunk_size: records per vmap chunk.
    """

    def __init__(
        self,
        task: Task,
        checkpoints: Sequence[Params] | None = None,
        lrs: Sequence[float] | None = None,
        *,
        projector: RandomProjection | None = None,
        chunk_size: int = 128,
    ) -> None:
        super().__init__(task, chunk_size=chunk_size)
        ckpts = list(checkpoints) if checkpoints is not None else [task.tracked_params()]
        self.checkpoints = [{k: v.detach().clone() for k, v in c.items()} for c in ckpts]
        self.lrs = [float(x) for x in lrs] if lrs is not None else [1.0] * len(self.checkpoints)
        check_checkpoints(task, self.checkpoints, self.lrs)
        if projector is not None and projector.dim_in != task.num_params:
            raise RlattrError(
                f"projector: dim_in is {projector.dim_in}, but the task tracks {task.num_params} parameters"
            )
        self.projector = projector
        self._feats: list[Tensor] = []

    def _project(self, x: Tensor) -> Tensor:
        return self.projector.project(x) if self.projector is not None else x

    def cache(self, train: Batch) -> TracIn:
        return self._cache_passes(train)

    def feature_passes(self) -> list[FeaturePass]:
        return [(self.task, c, self.projector) for c in self.checkpoints]

    def _cache_features(self, train: Batch, features: list[Tensor], curvature: Tensor | None) -> None:
        self._feats = list(features)
        self._train = self._feats[0]

    def query_vectors(self, query: Batch) -> list[Tensor]:
        self.check_query(query)
        return [query_grads(self.task, query, params=c, chunk_size=self.chunk_size) for c in self.checkpoints]

    def score_vectors(self, vectors: list[Tensor]) -> Tensor:
        self._require_cache()
        total = None
        for lr, q, feats in zip(self.lrs, vectors, self._feats, strict=True):
            part = lr * (self._project(q) @ feats.T.to(q.dtype))
            total = part if total is None else total + part
        assert total is not None
        return total

    def attribute(self, query: Batch) -> Tensor:
        return self.score_vectors(self.query_vectors(query))
