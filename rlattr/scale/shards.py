"""Sharded featurisation and curvature: an attributor's costly passes over the records as jobs.

:func:`sharded_cache` splits the training records into shards of ``shard_size`` consecutive
records (fixed order), featurises each shard as one job (its per-record gradients for every pass
of :meth:`~rlattr.core.methods.base.Attributor.feature_passes`, by
:func:`~rlattr.core.methods.base.featurise`) and hands the concatenated features to the attributor's
public :meth:`~rlattr.core.methods.base.Attributor.cache_features`. Shards are whole multiples of
the attributor's ``chunk_size``, so every shard runs exactly the chunks the single-process
``cache`` runs: with torch on one thread the features, and so the scores, are bit for bit equal.

With ``curvature_shard_size`` the dense curvature of :class:`InfluenceFunction`,
:class:`RescaledInfluence` and :class:`NewtonStep` is sharded too (:func:`sharded_curvature`): each
job returns its records' :meth:`~rlattr.core.methods.hessian.ObjectiveHessian.record_sum` and this
process adds them in shard order. That equals the single-process curvature bit for bit when every
curvature shard is one of the chunks the single process sums (``curvature_chunk``) and the
curvature is the Hessian; otherwise (larger shards, or the Gauss-Newton matrix, which one process
sums in one product over all records) it differs by rounding only.

With ``out_dir`` each finished shard is stored (features and record ids) and a restarted call
featurises only the missing shards; with ``store_in_task`` the tasks write their shards themselves
(``out_dir`` on storage every worker can write) and send back only digests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from rlattr.core.grads import batch_size, slice_batch
from rlattr.core.methods.base import Attributor, FeaturePass, featurise
from rlattr.core.methods.hessian import CurvatureSpec
from rlattr.core.methods.solvers import STRATEGIES
from rlattr.core.store import load_tensors
from rlattr.core.task import Batch
from rlattr.errors import RlattrError, check_int
from rlattr.eval.groundtruth import JobExecutor, collect_jobs, job_path


def shard_bounds(n: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of consecutive shards of ``shard_size`` records (the last may be shorter)."""
    check_int("shard_size", shard_size)
    return [(lo, min(lo + shard_size, n)) for lo in range(0, n, shard_size)]


def own_slice(batch: Batch, start: int, stop: int) -> Batch:
    """Records ``[start, stop)`` as tensors of their own (a pickled view would carry the whole storage)."""
    return tree_map(lambda x: x.clone() if isinstance(x, Tensor) else x, slice_batch(batch, start, stop))


def _params_digest(passes: list[FeaturePass]) -> str:
    h = hashlib.sha256()
    for ftask, params, proj in passes:
        values = ftask.resolve_params(params)
        for name in ftask.tracked_names:
            h.update(
                name.encode() + values[name].detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
            )
        h.update(repr(proj.config() if proj is not None else None).encode())
    return h.hexdigest()[:16]


def _record_ids(ids: Tensor | None, n: int) -> Tensor:
    record_ids = torch.arange(n) if ids is None else ids
    if not isinstance(record_ids, Tensor) or record_ids.shape != (n,):
        shape = tuple(record_ids.shape) if isinstance(record_ids, Tensor) else type(record_ids).__name__
        raise RlattrError(f"ids: got {shape}; supported: a Tensor[{n}] of record ids")
    return record_ids


def sharded_features(
    attributor: Attributor,
    train: Batch,
    *,
    shard_size: int,
    executor: JobExecutor | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    ids: Tensor | None = None,
    store_in_task: bool = False,
) -> list[Tensor]:
    """The features :meth:`Attributor.cache_features` takes, ``[Tensor[n, k_c]]``, shard by shard.

    Args: as :func:`sharded_cache`. With ``store_in_task`` every shard file is written by its task
    and read back here once all are done (its checksum verified by the store).
    """
    passes = attributor.feature_passes()
    check_int("shard_size", shard_size)
    if shard_size % attributor.chunk_size:
        raise RlattrError(
            f"shard_size: got {shard_size}; supported: a multiple of the attributor's chunk_size "
            f"({attributor.chunk_size}), so that shards run the chunks the single-process cache runs"
        )
    n = batch_size(train)
    record_ids = _record_ids(ids, n)
    bounds = shard_bounds(n, shard_size)
    task, chunk = attributor.task, attributor.chunk_size

    def job(j: int, part: Batch) -> Tensor:  # ships the Task and projections, not the records
        return torch.stack([featurise(task, part, p, chunk_size=chunk) for p in passes])

    config = {
        "kind": "features",
        "attributor": type(attributor).__name__,
        "n": n,
        "shard_size": shard_size,
        "chunk_size": chunk,
        "params": _params_digest(passes),
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
        stored_by_job=store_in_task,
    )
    if store_in_task:
        assert out_dir is not None
        shards = [load_tensors(job_path(out_dir, j))[0]["value"] for j in range(len(bounds))]
    return [torch.cat([s[c] for s in shards]) for c in range(len(passes))]


def curvature_chunk(spec: CurvatureSpec, block: int) -> int:
    """Records per chunk of the single-process Hessian record sum
    (:meth:`~rlattr.core.methods.hessian.ObjectiveHessian.record_chunk`, without building the
    operator): curvature shards of this size reproduce it bit for bit."""
    return max(spec.chunk_size, spec.chunk_size * 256 // min(block, spec.task.num_params))


def sharded_curvature(
    spec: CurvatureSpec,
    *,
    shard_size: int,
    block: int = 256,
    executor: JobExecutor | None = None,
    out_dir: str | os.PathLike[str] | None = None,
) -> Tensor:
    """``Tensor[d, d]``: the record sum of ``spec``'s curvature (``spec.hessian().record_sum(block)``),
    one job per shard of ``shard_size`` records, added here in shard order from zeros.

    Every job holds a ``d x d`` partial sum, and so does this process for each shard until all
    have arrived: ``d^2`` x (shards + 1) x 4 bytes (float32) at most.
    """
    n = batch_size(spec.batch)
    bounds = shard_bounds(n, shard_size)
    light = dataclasses.replace(spec, batch=own_slice(spec.batch, 0, 1), record_total=None)

    def job(j: int, part: Batch) -> Tensor:  # ships the spec without its records, each shard alone
        return light.hessian(part).record_sum(block)

    config = {"kind": "curvature", "n": n, "shard_size": shard_size, "block": block}
    parts = collect_jobs(
        job,
        len(bounds),
        out_dir=out_dir,
        config=config,
        executor=executor,
        payload=lambda j: own_slice(spec.batch, *bounds[j]),
        description="curvature shards",
    )
    total = torch.zeros_like(parts[0])
    for part in parts:
        total += part
    return total


def sharded_cache(
    attributor: Attributor,
    train: Batch,
    *,
    shard_size: int,
    executor: JobExecutor | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    ids: Tensor | None = None,
    curvature_shard_size: int | None = None,
    store_in_task: bool = False,
) -> Attributor:
    """``attributor.cache(train)`` with its per-record passes run shard by shard; returns it.

    Args:
        attributor: an attributor with :meth:`~Attributor.feature_passes` (GradDot, GradCos, TracIn,
            TRAK, InfluenceFunction, RescaledInfluence, NewtonStep).
        train: the training records (a batch).
        shard_size: records per shard; a multiple of ``attributor.chunk_size``.
        executor: runs the shards (e.g. :class:`rlattr.scale.RayExecutor`); None: in this process.
        out_dir: store each shard as ``job_{j:05d}.safetensors`` (``value: Tensor[C, rows, k]``
            for C passes, ``ids: Tensor[rows]``) and resume from it; curvature shards in
            ``out_dir/curvature``.
        ids: ``Tensor[n]`` record ids stored with the shards (default: positions 0..n-1).
        curvature_shard_size: records per curvature shard (attributors with
            ``accepts_curvature``); None: the curvature is built in this process, by ``cache``.
        store_in_task: the tasks write their shards into ``out_dir`` themselves (module docstring).
    """
    if curvature_shard_size is not None and not attributor.accepts_curvature:
        raise RlattrError(
            f"curvature_shard_size: got {curvature_shard_size} for {type(attributor).__name__}, which has "
            "no curvature; supported: None"
        )
    a: Any = attributor  # with a curvature: InfluenceFunction, RescaledInfluence, NewtonStep
    strategy = getattr(a, "strategy", "explicit")  # NewtonStep: always the dense Hessian
    if curvature_shard_size is not None and not getattr(STRATEGIES.get(strategy), "record_total", True):
        raise RlattrError(
            f"curvature_shard_size: got {curvature_shard_size} for strategy {strategy!r}, which builds its "
            "own curvature; supported: None, or a strategy of the dense curvature"
        )
    feats = sharded_features(
        attributor,
        train,
        shard_size=shard_size,
        executor=executor,
        out_dir=out_dir,
        ids=ids,
        store_in_task=store_in_task,
    )
    curvature = None
    if curvature_shard_size is not None:
        curvature = sharded_curvature(
            a.curvature_spec(train),
            shard_size=curvature_shard_size,
            block=a.curvature_block,
            executor=executor,
            out_dir=None if out_dir is None else os.path.join(out_dir, "curvature"),
        )
    return attributor.cache_features(train, feats, curvature=curvature)


__all__ = [
    "curvature_chunk",
    "featurise",
    "own_slice",
    "shard_bounds",
    "sharded_cache",
    "sharded_curvature",
    "sharded_features",
]
