"""Whole-run analysis: re-score every saved round of a run against a target, one job per round.

A run folder (:func:`rlattr.rl.snapshots.load_run`) keeps theta(k) and the records of its fully
snapshotted rounds. :func:`score_run` rebuilds each round's :class:`~rlattr.rl.attribution.RoundSpec`
with the caller's ``build_spec(theta, records)`` (which loads theta(k) into the policy and names the
target) and scores it with :func:`~rlattr.rl.attribution.score_round`; each job reads its own round
from the run folder (on a cluster the folder must be on storage every node can read), so only
the round index and the pickled ``build_spec`` travel to a task and only the scores come back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from rlattr.errors import MissingError, RlattrError
from rlattr.eval.groundtruth import JobExecutor
from rlattr.progress import progress_bar
from rlattr.rl.attribution import RoundScores, RoundSpec, score_round
from rlattr.rl.records import RecordBatch
from rlattr.rl.snapshots import AttributionRun, load_run

BuildSpec = Callable[[dict[str, Tensor], RecordBatch], RoundSpec]


def _rounds(run: AttributionRun, rounds: Sequence[int] | None) -> list[int]:
    full = run.snapshot_rounds()
    if rounds is None:
        if not full:
            raise MissingError(
                f"run: {str(run.root)!r} keeps no full snapshot (theta and records) of any round"
            )
        return full
    wanted = [int(k) for k in rounds]
    missing = [k for k in wanted if k not in full]
    if not wanted or missing:
        raise MissingError(
            f"rounds: got {list(rounds)[:10]} ({missing[:10]} without a full snapshot); "
            f"supported: rounds with theta and records on disk, {full[:10]}"
        )
    return wanted


def score_run(
    run: str | Path | AttributionRun,
    build_spec: BuildSpec,
    *,
    rounds: Sequence[int] | None = None,
    executor: JobExecutor | None = None,
    by_group: bool = False,
    chunk_size: int = 4096,
) -> dict[int, RoundScores]:
    """``{k: score_round(build_spec(theta(k), records(k)))}`` for the run's saved rounds.

    Args:
        run: the run folder, or a run read back with :func:`load_run`.
        build_spec: ``(theta, records) -> RoundSpec``; picklable when an executor runs it.
        rounds: the rounds to score (default: every round with a full snapshot), in this order.
        executor: runs one job per round (e.g. :class:`rlattr.scale.RayExecutor`); None: here, in order.
        by_group, chunk_size: as for :func:`score_round`.
    """
    loaded = run if isinstance(run, AttributionRun) else load_run(run)
    if not callable(build_spec):
        raise RlattrError(
            f"build_spec: got {type(build_spec).__name__}; supported: (theta, records) -> RoundSpec"
        )
    ks = _rounds(loaded, rounds)

    def job(i: int) -> RoundScores:
        spec = build_spec(loaded.theta(ks[i]), loaded.records(ks[i]))
        if not isinstance(spec, RoundSpec):
            raise RlattrError(f"build_spec: returned {type(spec).__name__}; supported: a RoundSpec")
        return score_round(spec, by_group=by_group, chunk_size=chunk_size)

    todo = range(len(ks))
    finished: Iterator[tuple[int, RoundScores]] = (
        executor.map(job, todo) if executor is not None else ((i, job(i)) for i in todo)
    )
    out: dict[int, RoundScores] = {}
    with progress_bar("scoring saved rounds", len(ks)) as advance:
        for i, scores in finished:
            out[ks[i]] = scores
            advance()
    return {k: out[k] for k in ks}


def same_scores(a: dict[int, RoundScores], b: dict[int, RoundScores]) -> bool:
    """Whether two whole-run results hold the same rounds with bit-identical scores and ids."""
    if list(a) != list(b):
        return False
    return all(torch.equal(a[k].scores, b[k].scores) and torch.equal(a[k].ids, b[k].ids) for k in a)


__all__ = ["BuildSpec", "same_scores", "score_run"]
