"""One training batch from every saved round of a run: what a run-wide record index is built on.

A distilled embedding index (:class:`rlattr.core.methods.DistilledEmbedding`) or any other
attributor covers a whole run when it caches the records of all its rounds at once. Each round's
records become its Task batch exactly as :func:`rlattr.rl.attribution.round_batch` makes them
(advantages normalised within their own round), and the rounds are concatenated in round order;
``ids`` keeps each record's ``(round, step, env)`` so a hit in the index names its record.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlattr.core.task import Batch
from rlattr.errors import RlattrError
from rlattr.rl.attribution import round_batch
from rlattr.rl.ppo import PPOLossConfig
from rlattr.rl.snapshots import AttributionRun


def _cat(parts: list[Batch]) -> Batch:
    out: Batch = {}
    for key, first in parts[0].items():
        if isinstance(first, dict):
            out[key] = {k: torch.cat([p[key][k] for p in parts]) for k in first}
        else:
            out[key] = torch.cat([p[key] for p in parts])
    return out


def run_batch(run: AttributionRun, config: PPOLossConfig) -> tuple[Batch, Tensor]:
    """``(batch, ids)``: the records of every round of ``run`` that kept its snapshot, and ``Tensor[N, 3]`` ids.

    ``config`` is the run's PPO loss settings; ``advantage_norm="minibatch"`` is refused (the
    minibatch labels of past rounds are not stored).
    """
    if not isinstance(run, AttributionRun):
        raise TypeError(
            f"run: expected an AttributionRun (rlattr.rl.snapshots.load_run), got {type(run).__name__}"
        )
    if not isinstance(config, PPOLossConfig):
        raise TypeError(f"config: expected a PPOLossConfig, got {type(config).__name__}")
    if config.advantage_norm == "minibatch":
        raise RlattrError(
            "config: got advantage_norm='minibatch'; supported: 'buffer' or 'none' (past rounds' minibatch "
            "labels are not stored)"
        )
    kept = run.snapshot_rounds()
    if not kept:
        raise RlattrError(f"run: no saved round keeps its records (scored rounds: {run.rounds[:10]})")
    records = [run.records(k) for k in kept]
    return _cat([round_batch(r, config) for r in records]), torch.cat([r.ids for r in records])


__all__ = ["run_batch"]
