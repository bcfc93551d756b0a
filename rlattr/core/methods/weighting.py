"""Learned parameter-group weights (Li, Le, Xu, Salzmann, ICLR 2026, arXiv 2506.05647).

Split the tracked parameters into G groups (``task.group_names``: per layer, per tensor ...).
On top of any base attributor whose scores split by group (``attribute_by_group``), the weighted
score is

    tau(q, i; w) = sum_g w_g tau_g(q, i),    w = G * softmax(theta)  (w = 1: the base method),

the weights acting on the query side (``g_q^T Diag(w) K g_i``). They are learned without labels,
from unlabelled queries alone, by minimising

    L(w) = -mean_q [ (1/k) sum_{i in TopK_q(w)} tau(q, i; w) / ||tau(q, .; w)||_2 ] + reg ||w||^2,

which rewards weightings under which a few training records stand out for each query; the top-k
set is recomputed at every step. Per-group contributions are computed once per query batch.

``normalize=True`` fits on each group's contribution divided by its scale on the fit queries
(``s_g = ||tau_g||_F / mean_h ||tau_h||_F``) and returns ``w_g / s_g``: when one group's
contributions are orders of magnitude larger than the others', the objective is flat in the other
weights (the ratio above is scale-invariant, so it hardly moves with them) and Adam barely leaves
the start; on the normalised parts every weight matters alike.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlattr.core.methods.base import Attributor
from rlattr.core.task import Batch
from rlattr.errors import RlattrError


def topk_objective(contrib: Tensor, weights: Tensor, top_k: int, reg: float) -> Tensor:
    """The loss L(w) above for ``contrib: Tensor[m, n, G]`` and ``weights: Tensor[G]``."""
    tau = contrib @ weights
    top = tau.topk(top_k, dim=1).values.mean(1)
    ratio = top / tau.norm(dim=1).clamp_min(1e-12)
    return -ratio.mean() + reg * weights.pow(2).sum()


class LearnedWeights(Attributor):
    """Per-group weights on a base attributor, fitted by the label-free top-k objective.

    Args:
        base: any attributor implementing ``attribute_by_group`` (GradDot, GradCos, TracIn,
            InfluenceFunction, TRAK, RescaledInfluence), built on the same Task.
        top_k: k of the objective (default: 1% of the training records, at least 1).
        reg: coefficient of ``||w||^2``.
        steps, lr: Adam steps and learning rate on the softmax logits.
        normalize: fit on scale-normalised group contributions (see the module docstring).
    """

    def __init__(
        self,
        base: Attributor,
        *,
        top_k: int | None = None,
        reg: float = 1e-3,
        steps: int = 300,
        lr: float = 0.05,
        normalize: bool = False,
    ) -> None:
        if not isinstance(base, Attributor):
            raise TypeError(f"base: expected an Attributor, got {type(base).__name__}")
        super().__init__(base.task, chunk_size=base.chunk_size)
        if top_k is not None and top_k < 1:
            raise RlattrError(f"top_k: must be >= 1, got {top_k}")
        if reg < 0 or steps < 0 or lr <= 0:
            raise RlattrError(f"reg, steps, lr: need reg >= 0, steps >= 0, lr > 0; got {reg}, {steps}, {lr}")
        self.base, self.top_k, self.reg, self.steps, self.lr = base, top_k, reg, steps, lr
        self.normalize = normalize
        first = next(iter(self.task.tracked_params().values()))
        self.weights = torch.ones(len(self.task.group_names), dtype=first.dtype, device=first.device)
        self.history: list[float] = []

    @property
    def group_weights(self) -> dict[str, float]:
        """``{group label: weight}`` (weights average to 1)."""
        return {g: float(w) for g, w in zip(self.task.group_names, self.weights, strict=True)}

    def cache(self, train: Batch) -> LearnedWeights:
        if self.base._train is None:
            self.base.cache(train)
        self._train = self.base._train
        return self

    def fit(self, queries: Batch) -> LearnedWeights:
        """Learn the weights from unlabelled ``queries`` (their loss / target gradients only)."""
        self._require_cache()
        if len(self.task.group_names) < 2:  # one weight, normalised to 1: fitting would change nothing
            raise RlattrError(
                f"base: got a Task with one parameter group {self.task.group_names}; supported: a Task "
                "with >= 2 groups (e.g. groups='tensor' to weight a layer's weight and bias apart)"
            )
        contrib = self.base.attribute_by_group(queries).detach().double()
        n, g = contrib.shape[1], contrib.shape[2]
        norms = contrib.flatten(0, 1).norm(dim=0)
        scale = norms / norms.mean() if self.normalize else torch.ones_like(norms)
        silent = [name for name, x in zip(self.task.group_names, scale.tolist(), strict=True) if not x > 0]
        if silent:
            raise RlattrError(
                f"queries: group(s) {silent} contribute 0 to every score; supported with normalize=False"
            )
        contrib = contrib / scale
        k = self.top_k if self.top_k is not None else max(1, math.ceil(0.01 * n))
        if k > n:
            raise RlattrError(f"top_k: {k} exceeds the {n} training records")
        logits = torch.zeros(g, dtype=torch.float64, device=contrib.device, requires_grad=True)
        opt = torch.optim.Adam([logits], lr=self.lr)
        self.history = []
        for _ in range(self.steps):
            opt.zero_grad()
            loss = topk_objective(contrib, g * torch.softmax(logits, 0), k, self.reg)
            loss.backward()
            opt.step()
            self.history.append(float(loss.detach()))
        self.weights = (g * torch.softmax(logits.detach(), 0) / scale).to(self.weights)
        return self

    def attribute(self, query: Batch) -> Tensor:
        self._require_cache()
        contrib = self.base.attribute_by_group(query)
        return contrib @ self.weights.to(contrib)
