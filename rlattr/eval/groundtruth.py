"""Counterfactual ground truth by retraining: leave-one-out, subsets for LDS, final-model-only.

Retraining is the caller's: ``retrain(weights, seed) -> params`` trains with per-record weights
(``Tensor[n]``, 0 drops a record; e.g. :func:`rlattr.testing.supervised.train_classifier`) and
``evaluate(params) -> Tensor[m]`` measures the queries (their losses, margins ...). This module
decides *what* to retrain, runs the jobs (in up to ``processes`` forked worker processes, one torch
thread each, or through an ``executor`` such as :class:`rlattr.scale.RayExecutor`, which runs them
as Ray tasks) and, given ``out_dir``, stores every finished job as its own file through
:mod:`rlattr.core.store`, so an interrupted run resumes where it stopped. ``out_dir`` also holds
``manifest.json`` with the configuration; a folder holding another configuration is refused.

* :func:`leave_one_out`: ``evaluate(theta_{-i}) - evaluate(theta)`` for chosen records.
* :func:`subset_retraining`: ``evaluate(theta_S)`` for seeded random subsets (LDS).
* :func:`final_model_gold`: Wei et al. (arXiv 2412.03906): from the final model, further training
  with and without record i under the same randomness, the difference averaged over seeds.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from rlattr.core.store import load_json, load_tensors, save_json, save_tensors, stored_digest
from rlattr.core.task import Params
from rlattr.errors import RlattrError
from rlattr.progress import progress_bar

Retrain = Callable[[Tensor, int], Params]
Evaluate = Callable[[Params], Tensor]
_JOB: Callable[[int], Tensor] | None = None
_T = TypeVar("_T")


class JobExecutor(Protocol):
    """Runs independent jobs elsewhere (e.g. :class:`rlattr.scale.RayExecutor`, as Ray tasks).

    ``map(job, todo)`` yields ``(j, job(j))`` for every j of ``todo``, in any order, as jobs
    finish; ``job`` must be picklable (cloudpickle: closures are fine). With ``payload``, job j
    is called as ``job(j, payload(j))`` and only its own payload (e.g. its shard of the records)
    travels with it, while ``job`` itself is shipped once.
    """

    def map(
        self, job: Callable[..., _T], todo: Sequence[int], payload: Callable[[int], Any] | None = None
    ) -> Iterator[tuple[int, _T]]: ...


def subset_masks(n: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """``Tensor[num_subsets, n]`` bool, each row keeping exactly ``round(fraction * n)`` records."""
    if n < 2 or num_subsets < 1:
        raise RlattrError(f"n, num_subsets: need n >= 2 and num_subsets >= 1, got {n}, {num_subsets}")
    if not 0.0 < fraction < 1.0:
        raise RlattrError(f"fraction: must be in (0, 1), got {fraction}")
    keep = max(1, round(fraction * n))
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_subsets, n, dtype=torch.bool)
    for s in range(num_subsets):
        masks[s, torch.randperm(n, generator=gen)[:keep]] = True
    return masks


def _init_worker() -> None:
    torch.set_num_threads(1)


def _call_job(j: int) -> tuple[int, Tensor]:
    assert _JOB is not None
    return j, _JOB(j)


def _map_jobs(
    job: Callable[[int], Tensor], todo: Sequence[int], processes: int
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(j, job(j))`` as jobs finish; forked workers inherit ``job`` (closures are fine)."""
    global _JOB
    if processes <= 1 or len(todo) <= 1:
        for j in todo:
            yield j, job(j)
        return
    _JOB = job
    try:
        with mp.get_context("fork").Pool(min(processes, len(todo)), initializer=_init_worker) as pool:
            yield from pool.imap_unordered(_call_job, todo)
    finally:
        _JOB = None


def _check_manifest(out_dir: Path, config: dict[str, Any]) -> None:
    path = out_dir / "manifest.json"
    config = json.loads(json.dumps(config, sort_keys=True, default=str))
    if path.exists():
        old = load_json(path)
        if old != config:
            raise RlattrError(
                f"out_dir: {str(out_dir)!r} holds results of another configuration; use a new folder "
                f"(stored: {old}, asked: {config})"
            )
    else:
        save_json(path, config)


def collect_jobs(
    job: Callable[..., Tensor],
    count: int,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    config: dict[str, Any] | None = None,
    processes: int = 1,
    executor: JobExecutor | None = None,
    extra: Callable[[int], dict[str, Tensor]] | None = None,
    payload: Callable[[int], Any] | None = None,
    description: str = "ground-truth retraining",
    stored_by_job: bool = False,
) -> list[Tensor]:
    """``[job(j) for j in range(count)]`` (``job(j, payload(j))`` with ``payload``), resuming
    from (and saving to) ``out_dir``.

    Jobs run in this process, in ``processes`` forked workers, or through ``executor`` (one of the
    two). Each finished job is stored as ``job_{j:05d}.safetensors`` (key ``"value"``, plus the
    tensors ``extra(j)`` returns) as soon as it arrives, so a killed run redoes only unfinished jobs.
    With ``stored_by_job`` (needs ``out_dir``: on a cluster, storage every worker writes) each job
    writes its own file where it runs and sends back only the file's SHA-256; the returned list
    then holds each job's stored digest (:func:`job_digest`) instead of its value: read the values
    from the files (:func:`job_path`) when they are needed.
    """
    if processes < 1:
        raise RlattrError(f"processes: must be >= 1, got {processes}")
    if executor is not None and processes > 1:
        raise RlattrError(f"processes: got {processes} together with an executor; supported: one of the two")
    if stored_by_job and out_dir is None:
        raise RlattrError("stored_by_job: got True without out_dir; supported: an out_dir the jobs write to")
    results: dict[int, Tensor] = {}
    folder = Path(out_dir) if out_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        _check_manifest(folder, {"count": count, **(config or {})})
        for j in range(count):
            path = job_path(folder, j)
            if path.exists():
                results[j] = job_digest(path) if stored_by_job else load_tensors(path)[0]["value"]
    todo = [j for j in range(count) if j not in results]
    if stored_by_job:
        assert folder is not None
        job = _storing(job, str(folder), extra)
    if executor is not None:
        finished = executor.map(job, todo, payload)
    else:
        local = job if payload is None else (lambda j: job(j, payload(j)))
        finished = _map_jobs(local, todo, processes)
    # retrainings take minutes: a bar on stderr when it is a terminal
    with progress_bar(description, len(todo)) as advance:
        for j, value in finished:
            results[j] = value.detach().cpu()
            if stored_by_job:
                assert folder is not None
                if not torch.equal(job_digest(job_path(folder, j)), results[j]):
                    raise RlattrError(
                        f"out_dir: job {j}'s file does not hold what the job wrote (digest differs)"
                    )
            elif folder is not None:
                tensors = {"value": results[j], **(extra(j) if extra is not None else {})}
                save_tensors(folder / f"job_{j:05d}.safetensors", tensors, {"index": j})
            advance()
    return [results[j] for j in range(count)]


def job_path(folder: str | os.PathLike[str], j: int) -> Path:
    """Where :func:`collect_jobs` stores job ``j``'s result in ``folder``."""
    return Path(folder) / f"job_{j:05d}.safetensors"


def job_digest(path: str | os.PathLike[str]) -> Tensor:
    """``Tensor[32]`` (uint8): the SHA-256 of a stored job file's tensors, from its header."""
    return torch.tensor(list(bytes.fromhex(stored_digest(path))), dtype=torch.uint8)


def _storing(
    job: Callable[..., Tensor], folder: str, extra: Callable[[int], dict[str, Tensor]] | None
) -> Callable[..., Tensor]:
    """``job`` that stores its value (and ``extra(j)``) as job j's file where it runs and returns the digest."""

    def stored(j: int, *payload: Any) -> Tensor:
        value = job(j, *payload).detach().cpu()
        tensors = {"value": value, **(extra(j) if extra is not None else {})}
        path = save_tensors(job_path(folder, j), tensors, {"index": j})
        return job_digest(path)

    return stored


def run_jobs(
    job: Callable[[int], Tensor],
    count: int,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    config: dict[str, Any] | None = None,
    processes: int = 1,
    executor: JobExecutor | None = None,
) -> Tensor:
    """``Tensor[count, ...]``: ``job(j)`` for every j, resuming from (and saving to) ``out_dir``
    (see :func:`collect_jobs`)."""
    values = collect_jobs(job, count, out_dir=out_dir, config=config, processes=processes, executor=executor)
    return torch.stack(values)


def _digest(t: Tensor) -> str:
    return hashlib.sha256(t.to(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def leave_one_out(
    retrain: Retrain,
    evaluate: Evaluate,
    n: int,
    indices: Sequence[int],
    *,
    seed: int = 0,
    baseline: Tensor | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    config: dict[str, Any] | None = None,
    processes: int = 1,
    executor: JobExecutor | None = None,
) -> Tensor:
    """``Tensor[len(indices), m]``: ``evaluate(retrain(w_{-i}, seed)) - baseline``.

    ``baseline`` defaults to ``evaluate(retrain(ones, seed))`` (retrained the same way, so the
    optimiser's own error cancels). Positive = removing the record raised the measured quantity.
    """
    idx = [int(i) for i in indices]
    if not idx or min(idx) < 0 or max(idx) >= n:
        raise RlattrError(f"indices: expected record indices in [0, {n}), got {list(indices)[:10]}")

    def job(j: int) -> Tensor:
        w = torch.ones(n)
        w[idx[j]] = 0.0
        return evaluate(retrain(w, seed)).detach()

    cfg = {"kind": "loo", "n": n, "indices": idx, "seed": seed, **(config or {})}
    values = run_jobs(job, len(idx), out_dir=out_dir, config=cfg, processes=processes, executor=executor)
    base = evaluate(retrain(torch.ones(n), seed)).detach() if baseline is None else baseline
    return values - base.reshape(1, -1)


def subset_retraining(
    retrain: Retrain,
    evaluate: Evaluate,
    masks: Tensor,
    *,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    config: dict[str, Any] | None = None,
    processes: int = 1,
    executor: JobExecutor | None = None,
) -> Tensor:
    """``Tensor[M, m]``: ``evaluate(retrain(mask_s, seed + s))`` for each subset (row of ``masks``)."""
    if masks.dim() != 2 or masks.dtype != torch.bool or not bool(masks.any(1).all()):
        raise RlattrError(
            f"masks: expected a bool Tensor[M, n] keeping >= 1 record per row, got {masks.dtype} {tuple(masks.shape)}"
        )

    def job(s: int) -> Tensor:
        return evaluate(retrain(masks[s].double(), seed + s)).detach()

    cfg = {
        "kind": "subsets",
        "masks": _digest(masks),
        "shape": list(masks.shape),
        "seed": seed,
        **(config or {}),
    }
    return run_jobs(job, masks.shape[0], out_dir=out_dir, config=cfg, processes=processes, executor=executor)


def final_model_gold(
    further_train: Retrain,
    evaluate: Evaluate,
    n: int,
    indices: Sequence[int],
    seeds: Sequence[int],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    config: dict[str, Any] | None = None,
    processes: int = 1,
    executor: JobExecutor | None = None,
) -> Tensor:
    """``Tensor[len(indices), m]``: ``mean_seed [evaluate(ft(w_{-i}, s)) - evaluate(ft(ones, s))]``.

    ``further_train(weights, seed)`` must start from the final model every time and draw all its
    randomness (batch order, dropout ...) from ``seed`` alone, so that the two arms differ only by
    the record: the run with all records is computed once per seed and subtracted.
    """
    idx = [int(i) for i in indices]
    seeds = [int(s) for s in seeds]
    if not idx or min(idx) < 0 or max(idx) >= n:
        raise RlattrError(f"indices: expected record indices in [0, {n}), got {list(indices)[:10]}")
    if not seeds:
        raise RlattrError("seeds: expected at least one seed")
    arms = [None, *idx]  # None: no removal

    def job(j: int) -> Tensor:
        arm, s = arms[j // len(seeds)], seeds[j % len(seeds)]
        w = torch.ones(n)
        if arm is not None:
            w[arm] = 0.0
        return evaluate(further_train(w, s)).detach()

    cfg = {"kind": "final_model", "n": n, "indices": idx, "seeds": seeds, **(config or {})}
    values = run_jobs(
        job, len(arms) * len(seeds), out_dir=out_dir, config=cfg, processes=processes, executor=executor
    )
    values = values.reshape(len(arms), len(seeds), -1)
    return (values[1:] - values[:1]).mean(1)


__all__ = [
    "JobExecutor",
    "collect_jobs",
    "final_model_gold",
    "job_digest",
    "job_path",
    "leave_one_out",
    "run_jobs",
    "subset_masks",
    "subset_retraining",
]
