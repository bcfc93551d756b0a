"""Scoring as jobs: query blocks (1-D), or query blocks x stored training shards (2-D).

:func:`attribute_blocks` scores query blocks of a cached attributor as jobs. When the training
features do not fit in this process, :func:`attribute_grid` scores (query block, training shard)
pairs instead: each job reads its training shard's features from the store written by
:func:`~rlattr.scale.shards.sharded_features` (``out_dir``, on storage every worker reads), caches
its own copy of the attributor on them and returns an ``m_block x n_shard`` block. Either way,
given ``out``, the score matrix streams into a memory-mapped ``.npy`` file instead of memory.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlattr.core.grads import batch_size
from rlattr.core.methods.base import Attributor
from rlattr.core.methods.similarity import GradDot
from rlattr.core.methods.tracin import TracIn
from rlattr.core.store import load_json, load_tensors
from rlattr.core.task import Batch
from rlattr.errors import RlattrError, check_int
from rlattr.eval.groundtruth import JobExecutor, job_path
from rlattr.progress import progress_bar
from rlattr.scale.shards import own_slice, shard_bounds

Block = tuple[int, int, int, int]  # rows [lo, hi) of the queries, columns [lo, hi) of the records


def _check_out(out: str | os.PathLike[str] | None) -> None:
    if out is not None and not str(out).endswith(".npy"):
        raise RlattrError(f"out: got {str(out)!r}; supported: a path ending in .npy, or None")


def _one_row_per_query(scores: Tensor, rows: int) -> Tensor:
    if scores.shape[0] != rows:
        raise RlattrError(
            f"query: the attributor gives {scores.shape[0]} rows for {rows} query records; "
            "supported: one row per query record (no target, or one target component per record)"
        )
    return scores


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
    _check_out(out)
    train = attributor._require_cache()
    m = batch_size(query)
    bounds = shard_bounds(m, block_size)

    def job(b: int, block: Batch) -> Tensor:  # the cached attributor ships once, each block alone
        lo, hi = bounds[b]
        return _one_row_per_query(attributor.attribute(block), hi - lo)

    def block(b: int) -> Batch:
        return own_slice(query, *bounds[b])

    todo = range(len(bounds))
    finished = (
        executor.map(job, todo, block) if executor is not None else ((b, job(b, block(b))) for b in todo)
    )
    blocks = [(lo, hi, 0, train.shape[0]) for lo, hi in bounds]
    return _gather(finished, blocks, (m, train.shape[0]), out, "scoring query blocks")


def attribute_grid(
    attributor: Attributor,
    query: Batch,
    train: Batch,
    *,
    shards_dir: str | os.PathLike[str],
    block_size: int,
    executor: JobExecutor | None = None,
    out: str | os.PathLike[str] | None = None,
) -> Tensor:
    """Scores ``Tensor[m, n]``, one job per (query block, stored training shard) pair.

    Args:
        attributor: an uncached :class:`GradDot`, :class:`GradCos` or :class:`TracIn` (a record's
            score depends on its own features alone), the one whose features ``shards_dir`` holds.
        query: the query records.
        train: the training records the shards were featurised from (each job gets its shard's
            records, for the query check, and reads the shard's features from ``shards_dir``).
        shards_dir: the ``out_dir`` of :func:`~rlattr.scale.shards.sharded_features`, complete.
        block_size: query records per block.
        executor, out: as :func:`attribute_blocks`.

    A query block's gradients are computed once per training shard (the price of never holding
    all the features in one place); results equal :meth:`attribute` up to the matrix product's
    rounding for the narrower column blocks (bit for bit where the product's kernel does not
    depend on the column count, as on one CPU thread here).
    """
    if not isinstance(attributor, GradDot | TracIn):
        raise RlattrError(
            f"attributor: got {type(attributor).__name__}; supported: GradDot, GradCos, TracIn "
            "(whose score of a record needs its own features only)"
        )
    check_int("block_size", block_size)
    _check_out(out)
    folder = Path(shards_dir)
    manifest = load_json(folder / "manifest.json")
    n, m = batch_size(train), batch_size(query)
    if manifest.get("kind") != "features" or manifest.get("n") != n:
        raise RlattrError(
            f"shards_dir: {str(folder)!r} holds {manifest.get('kind')!r} shards of {manifest.get('n')} "
            f"records; supported: the feature shards of these {n} training records"
        )
    if manifest.get("attributor") != type(attributor).__name__:
        raise RlattrError(
            f"shards_dir: holds {manifest['attributor']} features; supported: {type(attributor).__name__}'s"
        )
    cols = shard_bounds(n, int(manifest["shard_size"]))
    missing = [s for s in range(len(cols)) if not job_path(folder, s).exists()]
    if missing:
        raise RlattrError(f"shards_dir: shards {missing[:10]} are missing; supported: a complete store")
    rows = shard_bounds(m, block_size)
    grid = [(r[0], r[1], c[0], c[1]) for r in rows for c in cols]
    where = str(folder)

    def job(j: int, parts: tuple[Batch, Batch]) -> Tensor:  # the attributor ships once, uncached
        block, records = parts
        stored = load_tensors(job_path(where, j % len(cols)))[0]["value"]
        local = copy.copy(attributor).cache_features(records, list(stored.unbind(0)))
        return _one_row_per_query(local.attribute(block), grid[j][1] - grid[j][0])

    def payload(j: int) -> tuple[Batch, Batch]:
        r0, r1, c0, c1 = grid[j]
        return own_slice(query, r0, r1), own_slice(train, c0, c1)

    todo = range(len(grid))
    finished = (
        executor.map(job, todo, payload) if executor is not None else ((j, job(j, payload(j))) for j in todo)
    )
    return _gather(finished, grid, (m, n), out, "scoring query blocks x training shards")


def _gather(
    finished: Iterator[tuple[int, Tensor]],
    blocks: list[Block],
    shape: tuple[int, int],
    out: str | os.PathLike[str] | None,
    description: str,
) -> Tensor:
    target: Any = None
    tmp = Path(f"{out}.partial.npy") if out is not None else None
    with progress_bar(description, len(blocks)) as advance:
        for b, scores in finished:
            if target is None:
                if tmp is None:
                    target = torch.empty(shape, dtype=scores.dtype)
                else:
                    tmp.parent.mkdir(parents=True, exist_ok=True)
                    np_dtype = torch.empty(0, dtype=scores.dtype).numpy().dtype
                    target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=shape)
            r0, r1, c0, c1 = blocks[b]
            target[r0:r1, c0:c1] = scores if tmp is None else scores.numpy()
            advance()
    if tmp is None:
        return target
    target.flush()
    del target
    os.replace(tmp, Path(out))  # type: ignore[arg-type]
    return torch.from_numpy(np.load(Path(out), mmap_mode="r+"))  # type: ignore[arg-type]


__all__ = ["attribute_blocks", "attribute_grid"]
