"""Unlearning-based attribution (MUCS-style: mirrored unlearning, consistent-randomness skew).

For each query, a copy of the parameters takes ``steps`` bounded gradient-*ascent* steps on the
query's loss (the query is unlearned, "mirroring" the descent that learned it):

    theta_{t+1} = theta_t + eta_t g_q(theta_t),   eta_t = min(lr, max_step / ||g_q(theta_t)||),

so no step moves the parameters further than ``max_step`` (Euclidean, over the tracked
parameters). Each training record is then scored by the skew of its loss between the unlearned
and the original parameters,

    delta_i = L_i(theta_unlearned) - L_i(theta),

both evaluated under the same random state (``torch.manual_seed(seed)`` before every loss
evaluation: the same dropout masks / noise for both models), normalised per query:
``"zscore"`` ``(delta - mean delta) / std delta``; ``"step"`` ``delta / ||theta_unlearned - theta||``
(to first order ``g_i . g_q / ||g_q||`` after one step); ``"none"`` ``delta``. Records whose loss
rises most when the query is unlearned helped it most: positive = helps, as everywhere.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from rlattr.core.grads import batch_size, slice_batch
from rlattr.core.methods.base import Attributor, batch_signature, query_grads
from rlattr.core.task import Batch, Params, Task
from rlattr.errors import RlattrError

Normalize = Literal["zscore", "step", "none"]
NORMALIZATIONS = ("zscore", "step", "none")


def unflatten(task: Task, flat: Tensor, like: Params) -> Params:
    """``dict[name, Tensor]`` of the tracked parameters from one flat ``Tensor[d]``."""
    out, start = {}, 0
    for name in task.tracked_names:
        size = like[name].numel()
        out[name] = flat[start : start + size].reshape(like[name].shape).to(like[name])
        start += size
    return out


class Unlearning(Attributor):
    """Score records by how much their loss rises when a copy of the model unlearns the query.

    Args:
        task: the Task (its loss gives ``L_i``; its target, or its loss on the query, the ascent).
        lr: ascent step size ``eta`` (> 0).
        steps: ascent steps per query (>= 1).
        max_step: bound on the Euclidean length of each step (> 0; ``None``: unbounded).
        normalize: ``"zscore"`` (default), ``"step"`` or ``"none"`` (see the module docstring).
        seed: the random state both models' losses are evaluated under.
        chunk_size: records per loss evaluation.
    """

    def __init__(
        self,
        task: Task,
        *,
        lr: float = 1e-2,
        steps: int = 1,
        max_step: float | None = 1.0,
        normalize: Normalize = "zscore",
        seed: int = 0,
        chunk_size: int = 1024,
    ) -> None:
        super().__init__(task, chunk_size=chunk_size)
        if not lr > 0:
            raise RlattrError(f"lr: got {lr}; supported: a step size > 0")
        if steps < 1:
            raise RlattrError(f"steps: got {steps}; supported: >= 1")
        if max_step is not None and not max_step > 0:
            raise RlattrError(f"max_step: got {max_step}; supported: a bound > 0 or None")
        if normalize not in NORMALIZATIONS:
            raise RlattrError(f"normalize: got {normalize!r}; supported: {NORMALIZATIONS}")
        self.lr, self.steps, self.max_step = lr, steps, max_step
        self.normalize, self.seed = normalize, seed
        self._batch: Batch | None = None

    def record_losses(self, params: Params) -> Tensor:
        """``Tensor[n]``: the cached records' losses at ``params``, under the fixed random state."""
        if self._batch is None:
            raise RuntimeError("Unlearning: call cache(train) first")
        n = batch_size(self._batch)
        parts = []
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(self.seed)  # same masks / noise for the original and the unlearned model
            for start in range(0, n, self.chunk_size):
                parts.append(self.task.loss(params, slice_batch(self._batch, start, start + self.chunk_size)))
        return torch.cat(parts).detach()

    def cache(self, train: Batch) -> Unlearning:
        self._signature = batch_signature(train)
        self._batch = train
        self._train = self.record_losses(self.task.tracked_params())
        return self

    def _query_grads(self, query: Batch, params: Params) -> Tensor:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            return query_grads(self.task, query, params=params, chunk_size=self.chunk_size)

    def _row_grad(self, query: Batch, j: int, params: Params) -> Tensor:
        if self.task.target is None:  # query records are scored by their own loss: take record j alone
            return self._query_grads(slice_batch(query, j, j + 1), params)[0]
        return self._query_grads(query, params)[j]  # a target's components need the whole batch

    def unlearned(self, query: Batch) -> list[Params]:
        """The unlearned parameters of each of the m queries (``steps`` bounded ascent steps)."""
        theta = self.task.tracked_params()
        flat0 = torch.cat([theta[n].reshape(-1) for n in self.task.tracked_names])
        g0 = self._query_grads(query, theta)
        out = []
        for j in range(g0.shape[0]):
            flat = flat0.clone()
            g = g0[j]
            for step in range(self.steps):
                if step > 0:  # later steps: query j's gradient at its own partly unlearned point
                    g = self._row_grad(query, j, unflatten(self.task, flat, theta))
                eta = self.lr
                norm = float(g.norm())
                if self.max_step is not None and eta * norm > self.max_step:
                    eta = self.max_step / norm
                flat = flat + eta * g.to(flat)
            out.append(unflatten(self.task, flat, theta))
        return out

    def attribute(self, query: Batch) -> Tensor:
        base = self._require_cache()
        self.check_query(query)
        theta = self.task.tracked_params()
        flat0 = torch.cat([theta[n].reshape(-1) for n in self.task.tracked_names])
        rows = []
        for params in self.unlearned(query):
            delta = self.record_losses(params) - base
            if self.normalize == "zscore":
                delta = (delta - delta.mean()) / delta.std().clamp_min(1e-30)
            elif self.normalize == "step":
                moved = torch.cat([params[n].reshape(-1) for n in self.task.tracked_names]) - flat0
                delta = delta / moved.norm().clamp_min(1e-30)
            rows.append(delta)
        return torch.stack(rows)


__all__ = ["NORMALIZATIONS", "Unlearning", "unflatten"]
