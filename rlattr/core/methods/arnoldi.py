"""Influence through the Hessian's top eigenspace, found by Arnoldi iteration (Schioppa et al., 2022).

Arnoldi iteration on ``H = (curvature) + shift I`` builds an orthonormal Krylov basis
``Q: Tensor[d, m]`` from ``m`` Hessian-vector products; the eigenpairs of the small projected
matrix ``Q^T H Q`` (Ritz pairs) approximate H's extreme eigenpairs. Keeping the ``rank`` of largest
magnitude, ``U: Tensor[d, rank]`` and ``lam: Tensor[rank]``, the solver applies

    H^-1 b ~ U diag(1 / lam) U^T b,

the inverse restricted to the top eigenspace: the part of b outside it is dropped (Schioppa et al.
argue the gradients that carry influence live there). With ``rank = iterations = d`` it is the exact
inverse; it approaches it as ``rank`` grows. The cost is ``iterations`` single-vector products at
cache time and two thin matrix products per solve, however many right-hand sides.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlattr.core.methods.hessian import HessianSolver, ObjectiveHessian, damping_remedy
from rlattr.errors import RlattrError


class ArnoldiSolver(HessianSolver):
    """``U diag(1 / lam) U^T b`` over the ``rank`` Ritz pairs of largest magnitude.

    Options: ``rank`` (eigenpairs kept), ``iterations`` (Krylov dimension, default
    ``min(2 rank, d)``, at least ``rank``), ``seed`` (the start vector), ``rtol`` (eigenvalues of
    magnitude below ``rtol`` times the largest are refused: the inverse would blow up).
    """

    def __init__(
        self,
        hessian: ObjectiveHessian,
        *,
        rank: int = 100,
        iterations: int | None = None,
        seed: int = 0,
        rtol: float = 1e-10,
    ) -> None:
        super().__init__(hessian)
        d = hessian.dim
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= d:
            raise RlattrError(f"rank: got {rank!r}; supported: an integer in [1, {d}] (the parameter count)")
        iters = min(2 * rank, d) if iterations is None else iterations
        if isinstance(iters, bool) or not isinstance(iters, int) or not rank <= iters <= d:
            raise RlattrError(f"iterations: got {iterations!r}; supported: an integer in [rank={rank}, {d}]")
        q, t = self._krylov(iters, seed)
        lam, vec = torch.linalg.eigh(0.5 * (t + t.T))
        keep = lam.abs().argsort(descending=True)[: min(rank, lam.numel())]
        lam, vec = lam[keep], vec[:, keep]
        small = lam.abs() <= rtol * float(lam.abs().max())
        if bool(small.any()):
            raise RlattrError(
                f"damping: the Hessian plus l2 + damping ({hessian.shift:g}) has a Ritz value near 0 "
                f"({float(lam[small].abs().min()):.3g}); take a smaller rank, or "
                f"{damping_remedy(hessian.shift, float(lam[small].abs().min()))}"
            )
        self.eigenvalues, self.eigenvectors = lam.to(self.h.theta.dtype), (q @ vec).to(self.h.theta.dtype)
        self.iterations = q.shape[1]

    def _krylov(self, iters: int, seed: int) -> tuple[Tensor, Tensor]:
        """Orthonormal ``Q: Tensor[d, iters]`` and ``Q^T H Q: Tensor[iters, iters]``."""
        theta = self.h.theta
        # the basis in float64 (where the device has it): a float32 Gram-Schmidt loses orthogonality
        work = torch.float64 if theta.device.type != "mps" else theta.dtype
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(self.h.dim, generator=gen, dtype=torch.float64, device="cpu").to(theta.device, work)
        basis = [v / v.norm()]
        hq: list[Tensor] = []
        for _ in range(iters):
            w = self.h.matvec(basis[-1][:, None].to(theta.dtype))[:, 0].to(work)
            hq.append(w)
            if len(basis) == iters:
                break
            q = torch.stack(basis, dim=1)
            for _ in range(2):  # Gram-Schmidt twice: orthogonality to rounding error
                w = w - q @ (q.T @ w)
            if float(w.norm()) <= 1e-10 * float(hq[-1].norm()):
                # an invariant subspace (repeated eigenvalues, e.g. l2 on a null space): restart
                # from a fresh random direction; Q^T H Q below stays exact, no longer tridiagonal
                w = torch.randn(self.h.dim, generator=gen, dtype=torch.float64, device="cpu").to(
                    theta.device, work
                )
                for _ in range(2):
                    w = w - q @ (q.T @ w)
            basis.append(w / w.norm())
        q = torch.stack(basis, dim=1)
        return q, q.T @ torch.stack(hq, dim=1)

    def solve(self, b: Tensor) -> Tensor:
        """``U diag(1 / lam) U^T b`` for ``b: Tensor[d, k]``."""
        u = self.eigenvectors
        return u @ ((u.T @ b.to(u)) / self.eigenvalues[:, None])


__all__ = ["ArnoldiSolver"]
