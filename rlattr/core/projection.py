"""Seeded random projections for gradients: Gaussian, Rademacher and sparse Johnson-Lindenstrauss.

A projection P has shape ``d x k`` and ``E[P P^T] = I``, so ``<P^T a, P^T b>`` is an unbiased
estimate of ``<a, b>``. P is never built whole: its rows are generated in blocks of
``block_rows`` from ``(seed, block index)`` alone, so the same seed gives the same matrix in any
process, and projecting ``Tensor[n, d]`` walks the blocks (and callers chunk the records).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from rlattr.errors import RlattrError

ProjectionKind = Literal["gaussian", "rademacher", "sparse"]
PROJECTION_KINDS: tuple[ProjectionKind, ...] = ("gaussian", "rademacher", "sparse")
_SEED_STRIDE = 1_000_003


class RandomProjection:
    """A seeded ``dim_in x dim_out`` random projection, generated block by block.

    Args:
        dim_in: d, the gradient dimension.
        dim_out: k, the projected dimension.
        kind: ``"gaussian"`` (N(0, 1/k)), ``"rademacher"`` (+-1/sqrt(k)) or ``"sparse"``
            (sparse JL: +-1/sqrt(density k) with probability density/2 each, else 0).
        seed: the whole matrix is a function of the seed.
        density: fraction of non-zeros for ``"sparse"``.
        block_rows: rows of P generated at a time.
        cache_bytes: keep generated blocks in memory when the whole matrix fits in this budget.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        kind: ProjectionKind = "gaussian",
        seed: int = 0,
        *,
        density: float = 1.0 / 3.0,
        block_rows: int = 16384,
        cache_bytes: int = 256 * 2**20,
    ) -> None:
        if dim_in < 1 or dim_out < 1:
            raise RlattrError(f"dim_in, dim_out: must be >= 1, got {dim_in}, {dim_out}")
        if kind not in PROJECTION_KINDS:
            raise RlattrError(f"kind: got {kind!r}; supported: {PROJECTION_KINDS}")
        if not 0.0 < density <= 1.0:
            raise RlattrError(f"density: must be in (0, 1], got {density}")
        if block_rows < 1:
            raise RlattrError(f"block_rows: must be >= 1, got {block_rows}")
        self.dim_in, self.dim_out, self.kind, self.seed = dim_in, dim_out, kind, int(seed)
        self.density, self.block_rows = density, block_rows
        self._cache: dict[int, Tensor] | None = {} if dim_in * dim_out * 4 <= cache_bytes else None

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.dim_in / self.block_rows)

    def block(self, b: int) -> Tensor:
        """Rows ``[b * block_rows, ...)`` of P, float32 on the CPU: ``Tensor[rows, k]``."""
        if self._cache is not None and b in self._cache:
            return self._cache[b]
        rows = min(self.block_rows, self.dim_in - b * self.block_rows)
        gen = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + b)
        k = self.dim_out
        if self.kind == "gaussian":
            out = torch.randn(rows, k, generator=gen, dtype=torch.float32, device="cpu") / math.sqrt(k)
        elif self.kind == "rademacher":
            bits = torch.randint(0, 2, (rows, k), generator=gen, device="cpu")
            out = (bits * 2 - 1).float() / math.sqrt(k)
        else:
            u = torch.rand(rows, k, generator=gen, dtype=torch.float32, device="cpu")
            sign = 1.0 - 2.0 * (u < self.density / 2).float()
            out = torch.where(u < self.density, sign, 0.0) / math.sqrt(self.density * k)
        if self._cache is not None:
            self._cache[b] = out
        return out

    def matrix(self) -> Tensor:
        """The whole ``Tensor[d, k]`` (for tests and small d only)."""
        return torch.cat([self.block(b) for b in range(self.num_blocks)])

    def project(self, x: Tensor) -> Tensor:
        """``x @ P``: ``Tensor[n, d] -> Tensor[n, k]``, in x's dtype and device."""
        if x.dim() != 2 or x.shape[1] != self.dim_in:
            raise RlattrError(f"x: expected shape (n, {self.dim_in}), got {tuple(x.shape)}")
        out = torch.zeros(x.shape[0], self.dim_out, dtype=x.dtype, device=x.device)
        for b in range(self.num_blocks):
            lo = b * self.block_rows
            hi = min(lo + self.block_rows, self.dim_in)
            out += x[:, lo:hi] @ self.block(b).to(dtype=x.dtype, device=x.device)
        return out

    def config(self) -> dict[str, object]:
        """What reproduces this projection (saved beside projected features)."""
        return {
            "dim_in": self.dim_in,
            "dim_out": self.dim_out,
            "kind": self.kind,
            "seed": self.seed,
            "density": self.density,
            "block_rows": self.block_rows,
        }
