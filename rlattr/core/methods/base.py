"""The cache / attribute split shared by every attributor.

``cache(train)`` featurises the training records once; ``attribute(query)`` scores any number of
queries against them and returns ``Tensor[m, n]`` (queries x training records). One sign
convention: a positive score means the training record *helps* the query (a gradient step on it
lowers the query's loss, or raises a target to raise).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from rlattr.core.grads import flatten, iter_per_record_grads, target_grads
from rlattr.core.projection import RandomProjection
from rlattr.core.task import Batch, Params, Task


def query_grads(task: Task, query: Batch, *, params: Params | None = None, chunk_size: int = 128) -> Tensor:
    """Query gradients as ``Tensor[m, d]``, signed as ``g_q`` (the gradient of a loss to lower).

    With a Task target, the m components of ``target(params, query)``; without one, the training
    loss of each query record (the usual supervised query: a test example's loss).
    """
    if task.target is not None:
        return task.target_sign() * flatten(target_grads(task, query, params=params), task.tracked_names)
    parts = [
        flatten(g, task.tracked_names)
        for _, _, g in iter_per_record_grads(task, query, params=params, chunk_size=chunk_size)
    ]
    return torch.cat(parts)


class Attributor(ABC):
    """Base class: featurise training records once, score many queries."""

    def __init__(self, task: Task, *, chunk_size: int = 128) -> None:
        if not isinstance(task, Task):
            raise TypeError(f"task: expected rlattr.core.Task, got {type(task).__name__}")
        self.task = task
        self.chunk_size = chunk_size
        self._train: Tensor | None = None

    @abstractmethod
    def cache(self, train: Batch) -> Attributor:
        """Featurise the training records; returns self."""

    @abstractmethod
    def attribute(self, query: Batch) -> Tensor:
        """Scores ``Tensor[m, n]`` of every query against every cached training record."""

    def _require_cache(self) -> Tensor:
        if self._train is None:
            raise RuntimeError(f"{type(self).__name__}.attribute: call cache(train) first")
        return self._train

    def _train_features(self, train: Batch, projector: RandomProjection | None) -> Tensor:
        rows = []
        for _, _, g in iter_per_record_grads(self.task, train, chunk_size=self.chunk_size):
            flat = flatten(g, self.task.tracked_names)
            rows.append(projector.project(flat) if projector is not None else flat)
        return torch.cat(rows)
