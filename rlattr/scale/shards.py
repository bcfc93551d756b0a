"""Sharded featurisation and block-wise scoring: an attributor's costly passes as independent jobs.

:func:`sharded_cache` splits the training records into shards of ``shard_size`` consecutive
records (fixed order), featurises each shard as one job (its per-record gradients, flattened and
projected as the attributor's own ``cache`` does, for every model / checkpoint of the attributor)
and hands the concatenated features to the attributor's ``cache``. Shards are whole multiples of
the attributor's ``chunk_size``, so every shard runs exactly the chunks the single-process
``cache`` runs: with torch on one thread the features, and so the scores, are bit for bit equal.
With ``out_dir`` each finished shard is stored (features and record ids) as it arrives, and a
restarted call featurises only the missing shards.

:func:`attribute_blocks` scores query blocks as jobs and, given ``out``, streams the score matrix
into a memory-mapped ``.npy`` file instead of holding it in memory.

Supported: :class:`GradDot` / :class:`GradCos`, :class:`TracIn`, :class:`TRAK`, and the attributors
whose ``cache`` featurises through ``Attributor._train_features`` once (:class:`InfluenceFunction`,
its :class:`RescaledInfluence`, :class:`NewtonStep`). For those the curvature (Hessian, solver) is
still built in the calling process: only the per-record gradient pass is sharded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from rlattr.core.grads import batch_size, flatten, iter_per_record_grads, slice_batch
from rlattr.core.methods.base import Attributor, batch_signature
from rlattr.core.methods.influence import InfluenceFunction
from rlattr.core.methods.rif import NewtonStep
from rlattr.core.methods.similarity import GradDot
from rlattr.core.methods.tracin import TracIn
from rlattr.core.methods.trak import TRAK
from rlattr.core.projection import RandomProjection
from rlattr.core.task import Batch, Params, Task
from rlattr.errors import RlattrError, check_int
from rlattr.eval.groundtruth import JobExecutor, collect_jobs
from rlattr.progress import progress_bar

# one featurisation pass: the Task whose loss is differentiated, where, and the projection
FeatureSpec = tuple[Task, Params | None, RandomProjection | None]


def featurise(task: Task, batch: Batch, spec: FeatureSpec, chunk_size: int) -> Tensor:
    """``Tensor[n, k]``: the per-record gradients of ``spec``'s Task, flattened, then projected."""
    ftask, params, proj = spec
    rows = []
    for _, _, g in iter_per_record_grads(ftask, batch, params=params, chunk_size=chunk_size):
        flat = flatten(g, task.tracked_names)
        rows.append(proj.project(flat) if proj is not None else flat)
    return torch.cat(rows)


def _specs(attributor: Attributor) -> list[FeatureSpec]:
    a: Any = attributor
    if isinstance(a, TracIn):
        return [(a.task, c, a.projector) for c in a.checkpoints]
    if isinstance(a, TRAK):
        ftask = a._out_task if a._out_task is not None else a.task
        return [(ftask, m, p) for m, p in zip(a.models, a.projectors, strict=True)]
    if isinstance(a, GradDot | InfluenceFunction | NewtonStep):
        return [(a.task, None, getattr(a, "projector", None))]
    raise RlattrError(
        f"attributor: got {type(a).__name__}; supported: GradDot, GradCos, TracIn, TRAK, "
        "InfluenceFunction (and RescaledInfluence), NewtonStep"
    )


def _install(attributor: Attributor, train: Batch, specs: list[FeatureSpec], feats: list[Tensor]) -> None:
    """Run ``attributor.cache(train)`` with its per-record gradient pass replaced by ``feats``.

    The attributors expose no public way to take precomputed features, so the one featurising
    method ``cache`` calls is swapped for the duration of the call (TracIn's features are set).
    """
    a: Any = attributor
    if isinstance(a, TracIn):
        a._signature = batch_signature(train)
        a._feats = feats
        a._train = feats[0]
        return
    queue = iter(zip(specs, feats, strict=True))

    def precomputed(*args: Any) -> Tensor:
        spec, value = next(queue)
        if args[-1] is not spec[2]:  # the projector: a mismatch means the attributor changed its cache
            raise RuntimeError(f"{type(a).__name__}.cache featurised with another projection than expected")
        return value

    name = "_features" if isinstance(a, TRAK) else "_train_features"
    setattr(a, name, precomputed)
    try:
        a.cache(train)
    finally:
        delattr(a, name)
    a._signature = batch_signature(train)


def shard_bounds(n: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of consecutive shards of ``shard_size`` records (the last may be shorter)."""
    check_int("shard_size", shard_size)
    return [(lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size)]


def own_slice(batch: Batch, start: int, stop: int) -> Batch:
    """Records ``[start, stop)`` as tensors of their own (a pickled view would carry the whole storage)."""
    return tree_map(lambda x: x.clone() if isinstance(x, Tensor) else x, slice_batch(batch, start, stop))


def _params_digest(specs: list[FeatureSpec]) -> str:
    h = hashlib.sha256()
    for ftask, params, proj in specs:
        values = ftask.resolve_params(params)
        for name in ftask.tracked_names:
            h.update(
                name.encode() + values[name].detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
            )
        h.update(repr(proj.config() if proj is not None else None).encode())
    return h.hexdigest()[:16]


def sharded_cache(
    attributor: Attributor,
    train: Batch,
    *,
    shard_size: int,
    executor: JobExecutor | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    ids: Tensor | None = None,
) -> Attributor:
    """``attributor.cache(train)`` with the per-record gradient pass run shard by shard; returns it.

    Args:
        attributor: a supported attributor (module docstring), not cached yet.
        train: the training records (a batch).
        shard_size: records per shard; a multiple of ``attributor.chunk_size``.
        executor: runs the shards (e.g. :class:`rlattr.scale.RayExecutor`); None: in this process.
        out_dir: store each shard as ``job_{j:05d}.safetensors`` (``value: Tensor[C, rows, k]``
            for C models / checkpoints, ``ids: Tensor[rows]``) and resume from it.
        ids: ``Tensor[n]`` record ids stored with the shards (default: positions 0..n-1).
    """
    specs = _specs(attributor)
    check_int("shard_size", shard_size)
    if shard_size % attributor.chunk_size:
        raise RlattrError(
            f"shard_size: got {shard_size}; supported: a multiple of the attributor's chunk_size "
            f"({attributor.chunk_size}), so that shards run the chunks the single-process cache runs"
        )
    n = batch_size(train)
    record_ids = torch.arange(n) if ids is None else ids
    if not isinstance(record_ids, Tensor) or record_ids.shape != (n,):
        shape = tuple(record_ids.shape) if isinstance(record_ids, Tensor) else type(record_ids).__name__
        raise RlattrError(f"ids: got {shape}; supported: a Tensor[{n}] of record ids")
    bounds = shard_bounds(n, shard_size)
    task, chunk = attributor.task, attributor.chunk_size

    def job(j: int, part: Batch) -> Tensor:  # ships the Task and projections, not the records
        return torch.stack([featurise(task, part, spec, chunk) for spec in specs])

    config = {
        "kind": "features",
        "attributor": type(attributor).__name__,
        "n": n,
        "shard_size": shard_size,
        "chunk_size": chunk,
        "params": _params_digest(specs),
        "ids": hashlib.sha256(record_ids.contiguous().numpy().tobytes()).hexdigest()[:16],
    }
    shards = collect_jobs(
        job,
        len(bounds),
        out_dir=out_dir,
        config=config,
        executor=executor,
        extra=lambda j: {"ids": record_ids[bounds[j][0] : bounds[j][1]]},
        payload=lambda j: own_slice(train, *bounds[j]),
        description="featurising shards",
    )
    feats = [torch.cat([s[c] for s in shards]) for c in range(len(specs))]
    _install(attributor, train, specs, feats)
    return attributor


def attribute_blocks(
    attributor: Attributor,
    query: Batch,
    *,
    block_size: int,
    executor: JobExecutor | None = None,
    out: str | os.PathLike[str] | None = None,
) -> Tensor:
    """Scores ``Tensor[m, n]`` of ``attributor.attribute`` over query blocks of ``block_size`` records.

    Each block is one job (the cached attributor is shipped to it once). With ``out`` (a path
    ending in ``.npy``) the blocks are written into a memory-mapped file as they arrive, which is
    renamed into place when complete, and the returned tensor is backed by that file. Each query
    record must give one row of scores (no target, or a target with one component per record).
    """
    check_int("block_size", block_size)
    if out is not None and not str(out).endswith(".npy"):
        raise RlattrError(f"out: got {str(out)!r}; supported: a path ending in .npy, or None")
    attributor._require_cache()
    m = batch_size(query)
    bounds = shard_bounds(m, block_size)

    def job(b: int, block: Batch) -> Tensor:  # the cached attributor ships once, each block alone
        lo, hi = bounds[b]
        scores = attributor.attribute(block)
        if scores.shape[0] != hi - lo:
            raise RlattrError(
                f"query: the attributor gives {scores.shape[0]} rows for {hi - lo} query records; "
                "supported: one row per query record (no target, or one target component per record)"
            )
        return scores

    def block(b: int) -> Batch:
        return own_slice(query, *bounds[b])

    todo = range(len(bounds))
    finished = (
        executor.map(job, todo, block) if executor is not None else ((b, job(b, block(b))) for b in todo)
    )
    return _gather(finished, bounds, m, out)


def _gather(finished: Any, bounds: Sequence[tuple[int, int]], m: int, out: Any) -> Tensor:
    target: Any = None
    tmp = Path(f"{out}.partial.npy") if out is not None else None
    with progress_bar("scoring query blocks", len(bounds)) as advance:
        for b, scores in finished:
            if target is None:
                shape, dtype = (m, scores.shape[1]), scores.dtype
                if tmp is None:
                    target = torch.empty(shape, dtype=dtype)
                else:
                    tmp.parent.mkdir(parents=True, exist_ok=True)
                    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
                    target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=shape)
            lo, hi = bounds[b]
            target[lo:hi] = scores if tmp is None else scores.numpy()
            advance()
    if tmp is None:
        return target
    target.flush()
    del target
    os.replace(tmp, Path(out))
    return torch.from_numpy(np.load(Path(out), mmap_mode="r+"))


__all__ = ["FeatureSpec", "attribute_blocks", "featurise", "own_slice", "shard_bounds", "sharded_cache"]
