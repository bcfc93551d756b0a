"""A PPO round becomes a core :class:`~rlattr.core.Task`; every record is scored in one batched pass.

For record i of round k and a target f to raise, the score is the paper's single-checkpoint
influence ``I_i = < grad f(theta(k)), -grad L_PPO(theta(k), z_i) >``: positive means a gradient step
on z_i raises the target. It is computed without materialising any per-record gradient: the target
gradient (one reverse pass, :func:`rlattr.core.grads.target_grads`) becomes the direction of a
forward-mode JVP through the per-record loss (:func:`rlattr.core.grads.directional_scores`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rlattr.core.grads import directional_scores, target_grads
from rlattr.core.task import Batch, GroupSpec, ParamSelector, Task
from rlattr.rl.ppo import PolicyEval, PPOLossConfig, normalise_advantages, ppo_record_loss
from rlattr.rl.records import RecordBatch
from rlattr.rl.targets import TargetSpec


@dataclass
class RoundScores:
    """The scores of one round.

    Attributes:
        scores: ``Tensor[n]`` (one target) or ``Tensor[m, n]`` (m target components), float32.
        ids: ``Tensor[n, 3]``, the (round, step, env) id of every scored record.
        by_group: ``Tensor[n, G]`` (or ``Tensor[m, n, G]``) per-layer parts, or ``None``.
        group_names: the G group labels.
        seconds: wall-clock time of the scoring.
        target: the target's description.
    """

    scores: Tensor
    ids: Tensor
    by_group: Tensor | None = None
    group_names: list[str] = field(default_factory=list)
    seconds: float = 0.0
    target: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[tuple[int, int, int], float]:
        """``{(round, step, env): score}`` (first target component when there are several)."""
        s = self.scores if self.scores.dim() == 1 else self.scores[0]
        return {
            (int(r), int(st), int(e)): float(v)
            for (r, st, e), v in zip(self.ids.tolist(), s.tolist(), strict=True)
        }


def average_duplicates(records: RecordBatch, scores: Tensor, *, max_features: int = 4096) -> Tensor:
    """``scores`` (``Tensor[n]`` or ``Tensor[..., n]``) with identical records' scores averaged.

    Records are identical when observation, action, old log-prob and advantage all match (the
    paper's rule). Only the per-record normalisation ``"minibatch"`` can give identical records
    different scores; with ``"buffer"`` or ``"none"`` this is a no-op. Records with more than
    ``max_features`` numbers (large images) are left as they are, as exact matches are then
    both rare and costly to find.
    """
    n = len(records)
    obs = records.observations
    obs_parts = [obs[k] for k in sorted(obs)] if isinstance(obs, dict) else [obs]
    parts = [*obs_parts, records.actions, records.old_log_prob, records.advantages]
    key = torch.cat([p.reshape(n, -1).to(torch.float64) for p in parts], dim=1)
    if key.shape[1] > max_features:
        return scores
    _, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    if int(counts.max()) == 1:
        return scores
    sums = torch.zeros(*scores.shape[:-1], counts.shape[0], dtype=scores.dtype, device=scores.device)
    sums.index_add_(scores.dim() - 1, inverse, scores)
    return (sums / counts.to(scores.dtype))[..., inverse]


def round_batch(records: RecordBatch, config: PPOLossConfig, minibatch_of: Tensor | None = None) -> Batch:
    """The training batch of the round's Task: the records plus ``norm_advantages: Tensor[n]``."""
    norm = normalise_advantages(records.advantages, config.advantage_norm, minibatch_of)
    return {
        "observations": records.observations,
        "actions": records.actions,
        "old_log_prob": records.old_log_prob,
        "norm_advantages": norm,
        "returns": records.returns,
    }


@dataclass(frozen=True, eq=False)
class RoundSpec:
    """What defines one round's attribution problem: the policy at theta(k), the records, the target.

    Args:
        model: the policy module at theta(k); ``params`` selects its tracked parameters.
        policy_eval: ``(params, obs, actions) -> PolicyOutput`` for that module.
        records: the round's records.
        target: what the scores attribute (:mod:`rlattr.rl.targets`).
        config: the PPO loss settings of the per-record loss.
        params: the tracked parameters (names, a predicate or ``None`` for all).
        groups: how the tracked parameters are grouped for per-layer parts.
        validation: validation transitions for a validation-sourced target.
        minibatch_of: ``Tensor[n]`` minibatch labels for ``advantage_norm="minibatch"``.
    """

    model: nn.Module
    policy_eval: PolicyEval
    records: RecordBatch
    target: TargetSpec
    config: PPOLossConfig
    params: ParamSelector = None
    groups: GroupSpec = "module"
    validation: RecordBatch | None = None
    minibatch_of: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.records, RecordBatch):
            raise TypeError(f"records: expected a RecordBatch, got {type(self.records).__name__}")
        if not isinstance(self.target, TargetSpec):
            raise TypeError(f"target: expected a TargetSpec, got {type(self.target).__name__}")
        if not isinstance(self.config, PPOLossConfig):
            raise TypeError(f"config: expected a PPOLossConfig, got {type(self.config).__name__}")


def build_round_task(spec: RoundSpec) -> tuple[Task, Batch, Batch]:
    """``(task, train_batch, target_batch)`` for the round ``spec`` describes."""
    target_fn, target_batch = spec.target.build(spec.policy_eval, spec.records, spec.validation)
    task = Task(
        model=spec.model,
        loss=ppo_record_loss(spec.policy_eval, spec.config),
        target=target_fn,
        target_goal=spec.target.goal,
        params=spec.params,
        groups=spec.groups,
    )
    return task, round_batch(spec.records, spec.config, spec.minibatch_of), target_batch


def score_task(
    task: Task, train_batch: Batch, target_batch: Batch, *, by_group: bool = False, chunk_size: int = 4096
) -> tuple[Tensor, Tensor | None]:
    """``(scores, parts)``: ``Tensor[n]`` or ``Tensor[m, n]``; parts ``[..., G]`` when ``by_group``."""
    tgrad = target_grads(task, target_batch)
    sign = task.target_sign()
    m = next(iter(tgrad.values())).shape[0]
    totals, parts = [], []
    for j in range(m):
        direction = {k: sign * v[j] for k, v in tgrad.items()}
        s = directional_scores(task, train_batch, direction, chunk_size=chunk_size, by_group=by_group)
        if by_group:
            parts.append(s)
            s = s.sum(dim=1)
        totals.append(s)
    scores = torch.stack(totals)
    grouped = torch.stack(parts) if by_group else None
    if m == 1:
        scores = scores[0]
        grouped = grouped[0] if grouped is not None else None
    return scores.float(), grouped.float() if grouped is not None else None


def score_round(
    spec: RoundSpec, *, by_group: bool = False, chunk_size: int = 4096, dedupe: bool = True
) -> RoundScores:
    """Score every record of ``spec.records`` against ``spec.target`` at the model's current parameters.

    ``by_group`` adds per-layer parts; ``dedupe`` averages the scores of identical records
    (:func:`average_duplicates`, which matters for ``advantage_norm="minibatch"`` only).
    """
    if not isinstance(spec, RoundSpec):
        raise TypeError(f"spec: expected a RoundSpec, got {type(spec).__name__}")
    start = time.perf_counter()
    task, train_batch, target_batch = build_round_task(spec)
    scores, grouped = score_task(task, train_batch, target_batch, by_group=by_group, chunk_size=chunk_size)
    if dedupe and spec.config.advantage_norm == "minibatch":
        scores = average_duplicates(spec.records, scores)
        if grouped is not None:
            grouped = average_duplicates(spec.records, grouped.movedim(-1, 0)).movedim(0, -1)
    return RoundScores(
        scores=scores,
        ids=spec.records.ids.clone(),
        by_group=grouped,
        group_names=task.group_names if by_group else [],
        seconds=time.perf_counter() - start,
        target=spec.target.describe(),
    )


__all__ = [
    "RoundScores",
    "RoundSpec",
    "average_duplicates",
    "build_round_task",
    "round_batch",
    "score_round",
    "score_task",
]
