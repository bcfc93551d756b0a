"""Gauss-Newton factors of a Task's objective: per-record output Jacobians and output-loss Hessians.

For a loss ``l_i = loss(z_i)`` of outputs ``z_i: Tensor[C]`` (logits), record i's Gauss-Newton
matrix is ``J_i^T A_i J_i`` with ``J_i = dz_i / dtheta`` and ``A_i = d^2 loss / dz^2``. The dense
matrix ``sum_i J_i^T A_i J_i`` is a Gram product of ``J`` and ``A J``, symmetric, so only its
blocks on and above the diagonal are computed. Used by :mod:`rlattr.core.methods.hessian` and the
Woodbury updates of :mod:`rlattr.core.methods.rif`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jacrev, vmap
from torch.utils._pytree import tree_map

from rlattr.core.grads import batch_size
from rlattr.core.task import Batch, Params, Task


def record_curvature_factors(
    task: Task,
    output: Callable[[Params, Batch], Tensor],
    output_loss: Callable[[Tensor, Batch], Tensor],
    batch: Batch,
    params: Params | None = None,
) -> tuple[Tensor, Tensor]:
    """``J: Tensor[n, C, d]`` (output Jacobians) and ``A: Tensor[n, C, C]`` (loss Hessians in z)."""
    p = task.tracked_params() if params is None else {k: params[k].detach() for k in task.tracked_names}
    n = batch_size(batch)

    def out_one(q: Params, record: Batch) -> Tensor:
        return output(q, tree_map(lambda x: x.unsqueeze(0), record)).reshape(-1)

    def loss_one(z: Tensor, record: Batch) -> Tensor:
        return output_loss(z.unsqueeze(0), tree_map(lambda x: x.unsqueeze(0), record)).reshape(())

    # per-tensor Jacobians, concatenated once: differentiating through a flat vector's views instead
    # scatters every tensor's gradient into a d-sized zero vector (4x slower on the digits MLP)
    parts = vmap(jacrev(out_one), in_dims=(None, 0))(p, batch)
    jac = torch.cat([parts[k].reshape(n, parts[k].shape[1], -1) for k in task.tracked_names], dim=2)
    with torch.no_grad():
        z = output(p, batch).reshape(n, -1)
    a = vmap(jacrev(jacrev(loss_one)))(z, batch)  # reverse-over-reverse: far cheaper here than jacfwd
    return jac.detach(), a.detach()


GRAM_BLOCK = 256  # the fastest of 128 to 1,024 for d = 650 and 4,810 (one thread)


def add_gram_upper(h: Tensor, left: Tensor, right: Tensor) -> None:
    """``h += left^T right`` for ``left, right: Tensor[r, d]`` whose product is symmetric, computing
    only the ``GRAM_BLOCK``-row blocks on and above the diagonal (about 60% of the flops);
    :func:`mirror_upper` then completes ``h``."""
    d = h.shape[0]
    for i in range(0, d, GRAM_BLOCK):
        h[i : i + GRAM_BLOCK, i:] += left[:, i : i + GRAM_BLOCK].T @ right[:, i:]


def mirror_upper(h: Tensor) -> Tensor:
    """Complete in place the symmetric ``h`` whose blocks of :func:`add_gram_upper` are computed."""
    d = h.shape[0]
    for i in range(0, d, GRAM_BLOCK):
        j = i + GRAM_BLOCK
        h[j:, i:j] = h[i:j, j:].T
        h[i:j, i:j] = 0.5 * (h[i:j, i:j] + h[i:j, i:j].T)  # exactly symmetric, as rounding is not
    return h


__all__ = ["GRAM_BLOCK", "add_gram_upper", "mirror_upper", "record_curvature_factors"]
