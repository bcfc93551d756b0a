"""EK-FAC: a block-diagonal, eigenvalue-corrected Kronecker-factored curvature (George et al. 2018).

For each Linear or Conv2d layer with weight (and bias) tracked, the layer's gradient of record i
is ``G_i = S_i^T A_i`` (output gradients x inputs, summed over positions; inputs extended by a 1
for the bias). K-FAC approximates the layer's curvature block by ``A (x) S`` with
``A = E[a a^T]`` and ``S = E[ds ds^T]``; EK-FAC keeps the eigenbases ``Q_A, Q_S`` and replaces the
Kronecker eigenvalues by ``Lambda = mean_i (Q_S^T G_i Q_A)^2`` (the curvature's exact diagonal in
that basis). The inverse applied to a layer block V is ``Q_S [(Q_S^T V Q_A) / (Lambda + shift)] Q_A^T``.

The curvature is the Fisher of ``fisher_loss`` on the spec's records (default the Task's own loss
on the training records: the empirical Fisher). The true Fisher (labels sampled from the model) was
clearly better on both digits models (``docs/results/tda.md``), but it cannot be the default: a
Task is a loss of ``(params, batch)`` and knows no predictive distribution to sample labels from.
For a classifier pass records with sampled labels as ``hessian_data`` (e.g.
``rlattr.testing.supervised.model_sampled_batch(model, train, draws=5)``, as the benchmark does),
or a ``fisher_loss`` that samples. Layers are independent blocks; every tracked parameter must
belong to a supported layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, cast

import torch
from torch import Tensor, nn

from rlattr.core.grads import batch_size, flatten, iter_per_record_grads, slice_batch
from rlattr.core.methods.hessian import CurvatureSpec, ParamLayout
from rlattr.core.task import Batch, Params, Task
from rlattr.errors import RlattrError


@dataclass
class _Block:
    module: nn.Module
    weight: str
    bias: str | None
    rows: int = 0
    q_a: Tensor = field(default_factory=lambda: torch.empty(0))
    q_s: Tensor = field(default_factory=lambda: torch.empty(0))
    lam: Tensor = field(default_factory=lambda: torch.empty(0))


def _layer_blocks(task: Task) -> list[_Block]:
    owner: dict[str, tuple[str, nn.Module, str]] = {}
    for mod_name, mod in task.model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            owner[full] = (mod_name, mod, pname)
    blocks: dict[str, _Block] = {}
    for name in task.tracked_names:
        mod_name, mod, pname = owner[name]
        ok = isinstance(mod, nn.Linear) or (
            isinstance(mod, nn.Conv2d) and mod.groups == 1 and isinstance(mod.padding, tuple)
        )
        if not ok or pname not in ("weight", "bias"):
            raise RlattrError(
                f"strategy: 'ekfac' supports nn.Linear and nn.Conv2d (groups=1, numeric padding) layers; "
                f"tracked parameter {name!r} belongs to {type(mod).__name__}: track only such layers"
            )
        blk = blocks.setdefault(
            mod_name, _Block(mod, weight="", bias=None, rows=int(cast(Tensor, mod.weight).shape[0]))
        )
        if pname == "weight":
            blk.weight = name
        else:
            blk.bias = name
    for mod_name, blk in blocks.items():
        if not blk.weight:
            raise RlattrError(
                f"strategy: 'ekfac' needs the weight of layer {mod_name!r} tracked with its bias"
            )
    return list(blocks.values())


def _layer_rows(mod: nn.Module, inp: Tensor, out_grad: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    """Inputs ``Tensor[rows, in']`` and output gradients ``Tensor[rows, out]`` of one layer."""
    if isinstance(mod, nn.Conv2d):
        patches = nn.functional.unfold(
            inp,
            mod.kernel_size,
            dilation=mod.dilation,
            padding=cast(tuple[int, ...], mod.padding),
            stride=mod.stride,
        )
        a = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        ds = out_grad.flatten(2).transpose(1, 2).reshape(-1, out_grad.shape[1])
    else:
        a = inp.reshape(-1, inp.shape[-1])
        ds = out_grad.reshape(-1, out_grad.shape[-1])
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
    return a, ds


def _kronecker_factors(
    task: Task, loss: Callable[[Params, Batch], Tensor], batch: Batch, blocks: list[_Block], chunk_size: int
) -> list[tuple[Tensor, Tensor]]:
    params = {k: v.clone().requires_grad_(True) for k, v in task.tracked_params().items()}
    sums: list[list[Tensor]] = [[] for _ in blocks]
    n = batch_size(batch)
    for start in range(0, n, chunk_size):
        seen: dict[int, tuple[Tensor, Tensor]] = {}

        def hook(idx: int, store: dict[int, tuple[Tensor, Tensor]] = seen) -> Callable[..., None]:
            def fn(_mod: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
                store[idx] = (args[0].detach(), output)

            return fn

        handles = [b.module.register_forward_hook(hook(j)) for j, b in enumerate(blocks)]
        try:
            total = loss(params, slice_batch(batch, start, min(start + chunk_size, n))).sum()
        finally:
            for h in handles:
                h.remove()
        if len(seen) != len(blocks):
            raise RlattrError(
                "strategy: 'ekfac' could not see every tracked layer run in the loss (each once)"
            )
        outs = torch.autograd.grad(total, [seen[j][1] for j in range(len(blocks))], allow_unused=True)
        for j, blk in enumerate(blocks):
            out_grad = outs[j] if outs[j] is not None else torch.zeros_like(seen[j][1])
            a, ds = _layer_rows(blk.module, seen[j][0], out_grad.detach(), blk.bias is not None)
            a_aa, s_ss = a.T @ a, ds.T @ ds
            sums[j] = [a_aa, s_ss] if not sums[j] else [sums[j][0] + a_aa, sums[j][1] + s_ss]
    return [(s[0] / n, s[1] / n) for s in sums]


class EKFACSolver:
    """``H^-1 B`` with the EK-FAC curvature plus ``shift`` (the objective's l2 + damping).

    Args:
        task: the Task (its tracked parameters must all sit in Linear / Conv2d layers).
        batch: the training records the curvature is estimated on.
        shift: l2 + damping, added to every corrected eigenvalue.
        fisher_loss: per-record loss whose Fisher is used; default ``task.loss`` (empirical Fisher).
        chunk_size: records per pass.
    """

    gauss_newton: ClassVar[bool] = False  # its curvature is the Fisher of fisher_loss, never output's
    per_parameter_shift: ClassVar[bool] = False  # one shift for every eigenvalue: a float l2 only

    @classmethod
    def from_spec(cls, spec: CurvatureSpec, **options: Any) -> Self:
        """The solver on ``spec``'s records and shift; ``options``: ``fisher_loss``."""
        if spec.output is not None or spec.output_loss is not None:
            raise RlattrError(
                "output, output_loss: got a Gauss-Newton curvature for strategy 'ekfac', which uses the "
                "Fisher of fisher_loss; supported with strategies 'explicit', 'cg', 'lissa'"
            )
        if isinstance(spec.shift, Tensor):
            raise RlattrError(
                "l2: got a per-parameter l2 for strategy 'ekfac', which adds one shift to every eigenvalue "
                "of its Kronecker eigenbasis; supported: a float"
            )
        return cls(spec.task, spec.batch, shift=spec.shift, chunk_size=spec.chunk_size, **options)

    def __init__(
        self,
        task: Task,
        batch: Batch,
        *,
        shift: float = 0.0,
        fisher_loss: Callable[[Params, Batch], Tensor] | None = None,
        chunk_size: int = 256,
    ) -> None:
        if shift < 0:
            raise RlattrError(f"damping: l2 + damping must be >= 0, got {shift}")
        self.task, self.shift = task, float(shift)
        self.blocks = _layer_blocks(task)
        self.layout = ParamLayout(task.tracked_params(), task.tracked_names)
        loss = task.loss if fisher_loss is None else fisher_loss
        for blk, (a, s) in zip(
            self.blocks, _kronecker_factors(task, loss, batch, self.blocks, chunk_size), strict=True
        ):
            blk.q_a = torch.linalg.eigh(a)[1]
            blk.q_s = torch.linalg.eigh(s)[1]
            blk.lam = torch.zeros(s.shape[0], a.shape[0], dtype=a.dtype, device=a.device)
        fisher_task = Task(task.model, loss, params=task.tracked_names)
        n = batch_size(batch)
        for _, _, g in iter_per_record_grads(fisher_task, batch, chunk_size=chunk_size):
            flat = flatten(g, task.tracked_names)
            for blk in self.blocks:
                rot = blk.q_s.T @ self._block_matrix(flat, blk) @ blk.q_a
                blk.lam += rot.pow(2).sum(0) / n
        if self.shift == 0 and any(bool((b.lam <= 0).any()) for b in self.blocks):
            raise RlattrError("damping: the EK-FAC curvature is singular; pass l2= or a damping > 0")

    def _block_matrix(self, flat: Tensor, blk: _Block) -> Tensor:
        """``Tensor[k, d] -> Tensor[k, out, in']``: a layer's weight (and bias as the last column)."""
        w = flat[:, self.layout.slices[blk.weight]].reshape(flat.shape[0], blk.rows, -1)
        if blk.bias is None:
            return w
        return torch.cat([w, flat[:, self.layout.slices[blk.bias]].unsqueeze(-1)], dim=2)

    def solve(self, b: Tensor) -> Tensor:
        """``H^-1 b`` for ``b: Tensor[d, k]``, in the curvature's dtype and device."""
        flat = b.T.to(self.blocks[0].lam)
        out = torch.zeros_like(flat)
        for blk in self.blocks:
            q_a, q_s, lam = blk.q_a, blk.q_s, blk.lam
            rot = q_s.T @ self._block_matrix(flat, blk) @ q_a
            back = q_s @ (rot / (lam + self.shift)) @ q_a.T
            n_w = self.layout.slices[blk.weight]
            out[:, n_w] = back[:, :, : back.shape[2] - (blk.bias is not None)].reshape(flat.shape[0], -1)
            if blk.bias is not None:
                out[:, self.layout.slices[blk.bias]] = back[:, :, -1]
        return out.T
