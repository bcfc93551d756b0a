"""LiSSA (Agarwal, Bullins & Hazan, 2017): the inverse Hessian as a stochastic Neumann series."""

from __future__ import annotations

import torch
from torch import Tensor

from rlattr.core.methods.hessian import HessianSolver, ObjectiveHessian
from rlattr.errors import RlattrError


class LiSSASolver(HessianSolver):
    """LiSSA: ``h_t = b + (I - H_t / scale) h_{t-1}``, ``H^-1 b ~ h_T / scale``, averaged over repeats.

    ``H_t`` is the Hessian on a random minibatch of ``batch_size`` records (the full batch, and a
    deterministic recursion, when ``None``). The recursion converges when ``scale`` exceeds the
    largest eigenvalue of H; ``scale=None`` takes 1.5 x a power-iteration estimate.
    """

    def __init__(
        self,
        hessian: ObjectiveHessian,
        *,
        depth: int = 1000,
        scale: float | None = None,
        batch_size: int | None = None,
        repeats: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(hessian)
        if depth < 1 or repeats < 1:
            raise RlattrError(f"depth, repeats: must be >= 1, got {depth}, {repeats}")
        if scale is not None and scale <= 0:
            raise RlattrError(f"scale: must be > 0, got {scale}")
        if batch_size is not None and not 1 <= batch_size <= hessian.n:
            raise RlattrError(f"batch_size: must be in [1, {hessian.n}], got {batch_size}")
        self.depth, self.batch_size, self.repeats, self.seed = depth, batch_size, repeats, seed
        self.scale = 1.5 * hessian.max_eigenvalue() if scale is None else float(scale)

    def solve(self, b: Tensor) -> Tensor:
        b = b.to(self.h.theta)
        gen = torch.Generator().manual_seed(self.seed)
        total = torch.zeros_like(b)
        for _ in range(self.repeats):
            est = b.clone()
            for _ in range(self.depth):
                idx = None
                if self.batch_size is not None:
                    idx = torch.randperm(self.h.n, generator=gen, device="cpu")[: self.batch_size]
                est = b + est - self.h.matvec(est, idx) / self.scale
            total += est / self.scale
        return total / self.repeats
