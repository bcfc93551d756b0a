"""Per-record gradients, target gradients and directional scores.

Three ways to get at ``grad L_i``, the gradient of record i's training loss over the tracked
parameters (d numbers in all):

* :func:`per_record_grads` materialises them, ``dict[name, Tensor[n, *shape]]``, with
  ``torch.func`` (``vmap(grad(...))``), chunked over records; a plain autograd loop is the
  fallback for modules vmap cannot handle.
* :func:`directional_scores` computes ``<v, grad L_i>`` for one direction v and every record i in
  a single forward-mode pass (``torch.func.jvp``) without materialising any per-record gradient:
  the fast path for online scoring, where v is a target gradient.
* :func:`target_grads` differentiates the Task's target.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from rlattr.core.task import Batch, Params, Task
from rlattr.errors import RlattrError
from rlattr.progress import progress_bar

GradMethod = Literal["auto", "vmap", "loop"]
GRAD_METHODS = ("auto", "vmap", "loop")
# featurisations of at least this many chunks show a progress bar (when the console is a terminal)
_BAR_CHUNKS = 32


def batch_size(batch: Batch) -> int:
    """Number of records in ``batch``: the shared leading dimension of its tensor leaves."""
    leaves = [x for x in tree_flatten(batch)[0] if isinstance(x, Tensor)]
    if not leaves:
        raise RlattrError("batch: expected a pytree holding at least one tensor, got none")
    sizes = {x.shape[0] if x.dim() else -1 for x in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise RlattrError(
            f"batch: tensor leaves must share a leading record dimension, got sizes {sorted(sizes)}"
        )
    n = sizes.pop()
    if n == 0:
        raise RlattrError("batch: empty (0 records)")
    return n


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    return tree_map(lambda x: x[start:stop] if isinstance(x, Tensor) else x, batch)


def _chunks(n: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    if chunk_size < 1:
        raise RlattrError(f"chunk_size: must be >= 1, got {chunk_size}")
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _check_loss(out: Tensor, n: int) -> None:
    if not isinstance(out, Tensor) or out.shape != (n,):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise RlattrError(
            f"loss: expected one value per record, shape ({n},), got {shape}; "
            "the Task's loss must return Tensor[n] (no reduction)"
        )


def _check_finite(what: str, values: Tensor | dict[str, Tensor]) -> None:
    items = values.items() if isinstance(values, dict) else [("", values)]
    for name, v in items:
        # a NaN or inf anywhere makes the sum non-finite; summing allocates no n x d mask
        if not torch.isfinite(v.sum()) and not torch.isfinite(v).all():
            where = f" (parameter {name!r})" if name else ""
            raise FloatingPointError(
                f"{what}: non-finite values (NaN or inf){where}; check the loss and inputs"
            )


def _vmap_grads(task: Task, params: Params, chunk: Batch) -> dict[str, Tensor]:
    def one(p: Params, record: Batch) -> Tensor:
        return task.loss(p, tree_map(lambda x: x.unsqueeze(0), record)).reshape(())

    return vmap(grad(one), in_dims=(None, 0))(params, chunk)


def _loop_grads(task: Task, params: Params, chunk: Batch, n: int) -> dict[str, Tensor]:
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    rows: list[tuple[Tensor, ...]] = []
    for i in range(n):
        loss = task.loss(leaves, slice_batch(chunk, i, i + 1)).reshape(())
        rows.append(torch.autograd.grad(loss, list(leaves.values()), allow_unused=True))
    out = {}
    for j, (name, p) in enumerate(leaves.items()):
        out[name] = torch.stack([r[j] if r[j] is not None else torch.zeros_like(p) for r in rows])
    return out


def iter_per_record_grads(
    task: Task,
    batch: Batch,
    *,
    params: Params | None = None,
    chunk_size: int = 128,
    method: GradMethod = "auto",
) -> Iterator[tuple[int, int, dict[str, Tensor]]]:
    """Yield ``(start, stop, grads)`` with ``grads[name]: Tensor[stop - start, *shape]``.

    Memory stays bounded by ``chunk_size * d``. ``method="auto"`` uses vmap and, if vmap fails on
    the first chunk, warns once and uses the autograd loop for the rest.
    """
    if method not in GRAD_METHODS:
        raise RlattrError(f"method: got {method!r}; supported: {GRAD_METHODS}")
    p = task.resolve_params(params)
    n = batch_size(batch)
    use = method
    n_chunks = -(-n // chunk_size) if chunk_size >= 1 else 0
    # a bar (on a terminal) only for long featurisations, not for every PPO round's few chunks
    with progress_bar("per-record gradients", n, None if n_chunks >= _BAR_CHUNKS else False) as advance:
        for start, stop in _chunks(n, chunk_size):
            chunk = slice_batch(batch, start, stop)
            if start == 0:
                with torch.no_grad():
                    _check_loss(task.loss(p, chunk), stop - start)
            if use == "loop":
                g = _loop_grads(task, p, chunk, stop - start)
            else:
                try:
                    g = _vmap_grads(task, p, chunk)
                except Exception as err:  # noqa: BLE001 - any vmap failure means: use the loop
                    if use == "vmap":
                        raise
                    warnings.warn(
                        f"per-record gradients: torch.func.vmap cannot run this model ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]}); falling back to a slower autograd loop",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    use = "loop"
                    g = _loop_grads(task, p, chunk, stop - start)
            _check_finite("per-record gradients", g)
            advance(stop - start)
            yield start, stop, g


def per_record_grads(
    task: Task,
    batch: Batch,
    *,
    params: Params | None = None,
    chunk_size: int = 128,
    method: GradMethod = "auto",
) -> dict[str, Tensor]:
    """Gradients of every record's loss: ``dict[name, Tensor[n, *shape]]``."""
    parts = list(iter_per_record_grads(task, batch, params=params, chunk_size=chunk_size, method=method))
    return {name: torch.cat([g[name] for _, _, g in parts]) for name in task.tracked_names}


def flatten(grads: dict[str, Tensor], names: list[str]) -> Tensor:
    """Concatenate per-record gradients into ``Tensor[n, d]`` in the order of ``names``."""
    return torch.cat([grads[name].reshape(grads[name].shape[0], -1) for name in names], dim=1)


def target_grads(task: Task, batch: Batch, *, params: Params | None = None) -> dict[str, Tensor]:
    """Gradient of each target component: ``dict[name, Tensor[m, *shape]]`` (m = 1 for a scalar)."""
    target = task.require_target()
    p = task.resolve_params(params)

    def f(q: Params) -> Tensor:
        out = target(q, batch)
        if out.dim() > 1:
            raise RlattrError(f"target: expected a scalar or Tensor[m], got shape {tuple(out.shape)}")
        return out.reshape(-1)

    g = jacrev(f)(p)
    _check_finite("target gradients", g)
    return g


def loss_grads_sum(task: Task, batch: Batch, *, params: Params | None = None) -> dict[str, Tensor]:
    """Gradient of the summed training loss over ``batch``: ``dict[name, Tensor[*shape]]``."""
    p = task.resolve_params(params)
    g = grad(lambda q: task.loss(q, batch).sum())(p)
    _check_finite("loss gradients", g)
    return g


def _jvp_chunk(task: Task, params: Params, chunk: Batch, direction: Params, names: list[str]) -> Tensor:
    fixed = {k: v for k, v in params.items() if k not in names}
    primals = {k: params[k] for k in names}
    tangents = {k: direction[k].to(params[k].dtype) for k in names}

    def f(q: Params) -> Tensor:
        return task.loss({**fixed, **q}, chunk)

    out = jvp(f, (primals,), (tangents,))
    value, tangent = out[0], out[1]
    _check_loss(value, batch_size(chunk))  # the JVP's primal output: no extra forward pass for the check
    return tangent


def directional_scores(
    task: Task,
    batch: Batch,
    direction: Params,
    *,
    params: Params | None = None,
    chunk_size: int = 4096,
    by_group: bool = False,
) -> Tensor:
    """``<direction, grad L_i>`` for every record i, by forward-mode JVP.

    Returns ``Tensor[n]``, or ``Tensor[n, G]`` with one column per group of ``task.group_names``
    when ``by_group`` (the columns sum to the total). ``direction`` maps every tracked name to a
    tensor of the parameter's shape.
    """
    p = task.resolve_params(params)
    task.check_params(direction, "direction")
    n = batch_size(batch)
    groups = task.group_names if by_group else ["*"]
    members = {g: [k for k in task.tracked_names if not by_group or task.group_of[k] == g] for g in groups}
    first = next(iter(p.values()))
    out = torch.empty(n, len(groups), dtype=first.dtype, device=first.device)
    for start, stop in _chunks(n, chunk_size):
        chunk = slice_batch(batch, start, stop)
        for j, g in enumerate(groups):
            out[start:stop, j] = _jvp_chunk(task, p, chunk, direction, members[g]).detach().to(out.dtype)
    _check_finite("directional scores", out)
    return out if by_group else out[:, 0]


def group_dots(task: Task, grads: dict[str, Tensor], direction: Params) -> Tensor:
    """Per-group dot products of per-record gradients with one direction: ``Tensor[n, G]``."""
    cols = []
    for g in task.group_names:
        parts = [
            grads[k].reshape(grads[k].shape[0], -1) @ direction[k].reshape(-1).to(grads[k].dtype)
            for k in task.tracked_names
            if task.group_of[k] == g
        ]
        cols.append(torch.stack(parts).sum(0))
    return torch.stack(cols, dim=1)


__all__ = [
    "batch_size",
    "slice_batch",
    "iter_per_record_grads",
    "per_record_grads",
    "flatten",
    "target_grads",
    "loss_grads_sum",
    "directional_scores",
    "group_dots",
]
