"""The explicit inverse-Hessian solver: the dense damped Hessian, Cholesky factorised once."""

from __future__ import annotations

import torch
from torch import Tensor

from rlattr.core.methods.hessian import HessianSolver, ObjectiveHessian, damping_remedy
from rlattr.errors import RlattrError


class ExplicitSolver(HessianSolver):
    """Dense damped Hessian, Cholesky factorised once. For models of up to a few thousand parameters."""

    def __init__(self, hessian: ObjectiveHessian, *, block: int = 256, rtol: float = 1e-10) -> None:
        super().__init__(hessian)
        h = hessian.dense(block=block)
        chol, info = torch.linalg.cholesky_ex(h)
        diag = torch.diagonal(chol) if int(info) == 0 else None
        scale = float(torch.diagonal(h).abs().max())
        if diag is None or float(diag.min()) ** 2 <= rtol * max(scale, 1e-300):
            low = float(torch.linalg.eigvalsh(h)[0])
            raise RlattrError(
                f"damping: the Hessian plus l2 + damping ({hessian.shift:g}) is singular or not positive "
                f"definite (smallest eigenvalue {low:.3g}); {damping_remedy(hessian.shift, low)}"
            )
        self.chol = chol

    def solve(self, b: Tensor) -> Tensor:
        """``H^-1 b`` for ``b: Tensor[d, k]``."""
        return torch.cholesky_solve(b.to(self.chol), self.chol)
