"""Exact replay of one PPO round's update outside the training framework, with TracIn over its steps.

A :class:`RoundSnapshot` holds everything stable-baselines3's ``PPO.train`` reads: theta(k), the
optimiser's state at theta(k), the round's records, the hyperparameters in force for the round and
the minibatch order SB3 drew (one permutation of the records per epoch). :func:`replay_round`
re-runs the update step by step, exactly as ``PPO.train`` does:

    for each epoch e, for each minibatch M (consecutive slices of permutation e, size batch_size):
        A~ = (A_M - mean A_M) / (std A_M + 1e-8)             (if normalize_advantage and |M| > 1)
        L  = -mean min(A~ r, A~ clip(r, 1-c, 1+c)) + ent_coef * (-mean H) + vf_coef * mse(R, V')
        stop the round (before stepping) if target_kl and mean((r - 1) - log r) > 1.5 target_kl
        zero grads, backward, clip the global grad norm to max_grad_norm, optimiser step

with ``V' = V_old + clamp(V - V_old, -c_vf, c_vf)`` when ``clip_range_vf`` is set. Given the same
float32 inputs in the same order it reproduces SB3's theta(k+1) to float rounding (bitwise on CPU).

**TracIn over the round's steps** (``tracin_target``): at every update step j, before the step,

    I_i += < grad f(theta_j), -grad L(theta_j, z_i) >      for every record i of minibatch j,

with L the per-record PPO policy loss (:func:`rlattr.rl.ppo.ppo_record_loss`, actor parameters)
using the advantages *as that minibatch normalised them*, and f the target (raise). Computed with
the round's Task (:func:`rlattr.rl.attribution.build_round_task`): one reverse pass for grad f and
one forward-mode JVP over the minibatch per step.

``rlattr.eval.rl_validity.retrain_subset`` re-runs the round from theta(k) on a subset of the records with the same
hyperparameters and a seeded minibatch order (fewer records: fewer steps, as a compacted buffer).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlattr.core.grads import directional_scores, target_grads
from rlattr.core.task import Params
from rlattr.errors import RlattrError
from rlattr.rl.attribution import RoundSpec, build_round_task
from rlattr.rl.ppo import SB3_ADV_EPS, PolicyEval, PPOLossConfig
from rlattr.rl.records import RecordBatch, index_observations
from rlattr.rl.targets import TargetSpec


@dataclass
class RoundHyperparameters:
    """The settings of one round's update, as ``PPO.train`` uses them.

    Args:
        learning_rate: the optimiser's learning rate during the round (after SB3's schedule).
        clip_range: epsilon of the clipped surrogate. clip_range_vf: value clipping or ``None``.
        ent_coef, vf_coef: loss coefficients. max_grad_norm: global gradient-norm clip.
        normalize_advantage: standardise advantages per minibatch. target_kl: early stop or ``None``.
        n_epochs: passes over the buffer. batch_size: minibatch size.
    """

    learning_rate: float
    clip_range: float
    clip_range_vf: float | None
    ent_coef: float
    vf_coef: float
    max_grad_norm: float
    normalize_advantage: bool
    target_kl: float | None
    n_epochs: int
    batch_size: int

    def __post_init__(self) -> None:
        for name in ("n_epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise RlattrError(f"{name}: expected an integer >= 1, got {value!r}")
        if not float(self.learning_rate) >= 0:
            raise RlattrError(f"learning_rate: expected a number >= 0, got {self.learning_rate!r}")
        for name in ("clip_range", "max_grad_norm"):
            if not float(getattr(self, name)) > 0:
                raise RlattrError(f"{name}: expected a number > 0, got {getattr(self, name)!r}")

    def loss_config(self) -> PPOLossConfig:
        """The per-record (actor) loss settings of this round, for scoring."""
        norm = "minibatch" if self.normalize_advantage else "none"
        return PPOLossConfig(clip_range=self.clip_range, ent_coef=self.ent_coef, advantage_norm=norm)


@dataclass
class RoundSnapshot:
    """What a replay of round k needs.

    Attributes:
        theta: ``dict[name, Tensor]`` of every trainable parameter at theta(k), in the order the
            optimiser holds them (the module's ``named_parameters()`` order).
        optimizer_state: a deep copy of the optimiser's ``state_dict()`` at theta(k).
        optimizer_class: the optimiser's class (e.g. ``torch.optim.Adam``).
        records: the round's records. hyper: the round's hyperparameters.
        permutations: ``n_epochs`` tensors ``Tensor[n]`` int64 of record positions: the order in
            which epoch e visits the records (minibatch b = slice b of it).
        theta_next: theta(k+1) as the framework computed it (for checking), or ``None``.
        validation: held-out transitions collected with theta(k), for a validation-sourced
            target (``ReturnTarget(source="validation")``), or ``None``.
        meta: free-form facts about the recording (round, RNG check ...).
    """

    theta: dict[str, Tensor]
    optimizer_state: dict[str, Any]
    optimizer_class: type[torch.optim.Optimizer]
    records: RecordBatch
    hyper: RoundHyperparameters
    permutations: list[Tensor]
    theta_next: dict[str, Tensor] | None = None
    validation: RecordBatch | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.records)
        if len(self.permutations) < 1:
            raise RlattrError("permutations: expected at least one epoch's permutation, got none")
        for e, perm in enumerate(self.permutations):
            if perm.shape != (n,) or not torch.equal(perm.sort().values, torch.arange(n)):
                raise RlattrError(f"permutations: entry {e} is not a permutation of the {n} record positions")


@dataclass
class ReplayResult:
    """Outcome of a replay: ``theta`` (every trainable parameter after the round), ``n_updates``
    (optimiser steps taken), ``stopped_early`` (target_kl hit) and ``tracin: Tensor[n]`` or None."""

    theta: dict[str, Tensor]
    n_updates: int
    stopped_early: bool
    tracin: Tensor | None = None


def seeded_permutations(n: int, n_epochs: int, seed: int) -> list[Tensor]:
    """``n_epochs`` permutations ``Tensor[n]`` drawn from ``numpy.random.RandomState(seed)``."""
    if n < 1 or n_epochs < 1:
        raise RlattrError(f"n, n_epochs: need n >= 1 and n_epochs >= 1, got {n}, {n_epochs}")
    rng = np.random.RandomState(int(seed))
    return [torch.from_numpy(rng.permutation(n).astype(np.int64)) for _ in range(n_epochs)]


def _make_optimizer(snapshot: RoundSnapshot, leaves: list[nn.Parameter]) -> torch.optim.Optimizer:
    opt = snapshot.optimizer_class(leaves, lr=snapshot.hyper.learning_rate)  # type: ignore[call-arg]
    opt.load_state_dict(copy.deepcopy(snapshot.optimizer_state))
    for group in opt.param_groups:
        group["lr"] = snapshot.hyper.learning_rate
    return opt


def _minibatch(records: RecordBatch, idx: Tensor) -> dict[str, Any]:
    return {
        "observations": index_observations(records.observations, idx),
        "actions": records.actions[idx],
        "old_log_prob": records.old_log_prob[idx],
        "old_values": records.values[idx],
        "advantages": records.advantages[idx],
        "returns": records.returns[idx],
    }


def _minibatch_loss(
    policy_eval: PolicyEval, params: Params, mb: dict[str, Any], hyper: RoundHyperparameters
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, approx_kl, norm_advantages: Tensor[B])`` of one minibatch, as ``PPO.train``."""
    out = policy_eval(params, mb["observations"], mb["actions"])
    if out.values is None:
        raise RlattrError("policy_eval: replay needs values (the value loss is part of the update)")
    values, log_prob = out.values.flatten(), out.log_prob
    adv = mb["advantages"]
    if hyper.normalize_advantage and len(adv) > 1:
        adv = (adv - adv.mean()) / (adv.std() + SB3_ADV_EPS)
    ratio = torch.exp(log_prob - mb["old_log_prob"])
    surrogate = torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - hyper.clip_range, 1 + hyper.clip_range))
    policy_loss = -surrogate.mean()
    values_pred = values
    if hyper.clip_range_vf is not None:
        c = hyper.clip_range_vf
        values_pred = mb["old_values"] + torch.clamp(values - mb["old_values"], -c, c)
    value_loss = F.mse_loss(mb["returns"], values_pred)
    entropy_loss = -torch.mean(-log_prob) if out.entropy is None else -torch.mean(out.entropy)
    loss = policy_loss + hyper.ent_coef * entropy_loss + hyper.vf_coef * value_loss
    with torch.no_grad():
        log_ratio = log_prob - mb["old_log_prob"]
        approx_kl = torch.mean((torch.exp(log_ratio) - 1) - log_ratio)
    return loss, approx_kl, adv.detach()


class _TracInAccumulator:
    """Adds ``<grad f(theta_j), -grad L(theta_j, z_i)>`` of each step's minibatch records."""

    def __init__(
        self,
        model: nn.Module,
        actor_eval: PolicyEval,
        snapshot: RoundSnapshot,
        target: TargetSpec,
        actor_params: list[str],
        chunk_size: int,
    ) -> None:
        config = replace(snapshot.hyper.loss_config(), advantage_norm="none")
        spec = RoundSpec(
            model,
            actor_eval,
            snapshot.records,
            target,
            config,
            params=actor_params,
            validation=snapshot.validation,
        )
        self.task, _, self.target_batch = build_round_task(spec)
        self.scores = torch.zeros(len(snapshot.records), dtype=torch.float64)
        self.chunk_size = chunk_size

    def add(self, params: dict[str, Tensor], idx: Tensor, mb: dict[str, Tensor], norm_adv: Tensor) -> None:
        p = {k: params[k].detach() for k in self.task.tracked_names}
        tgrad = target_grads(self.task, self.target_batch, params=p)
        sign = self.task.target_sign()
        direction = {k: sign * v[0] for k, v in tgrad.items()}
        batch = {
            "observations": mb["observations"],
            "actions": mb["actions"],
            "old_log_prob": mb["old_log_prob"],
            "norm_advantages": norm_adv,
            "returns": mb["returns"],
        }
        s = directional_scores(self.task, batch, direction, params=p, chunk_size=self.chunk_size)
        self.scores.index_add_(0, idx, s.detach().double())


def _check_replay_inputs(model: nn.Module, snapshot: RoundSnapshot) -> list[str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(snapshot, RoundSnapshot):
        raise TypeError(f"snapshot: expected a RoundSnapshot, got {type(snapshot).__name__}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in snapshot.theta]
    if missing:
        raise RlattrError(f"snapshot.theta: missing trainable parameter(s) {missing} of the model")
    return names


def replay_round(
    model: nn.Module,
    policy_eval: PolicyEval,
    snapshot: RoundSnapshot,
    *,
    tracin_target: TargetSpec | None = None,
    actor_eval: PolicyEval | None = None,
    actor_params: list[str] | None = None,
    chunk_size: int = 4096,
) -> ReplayResult:
    """Re-run the round's update from ``snapshot.theta``; the module itself is left untouched.

    Args:
        model: the policy module (its parameters are only swapped in functionally).
        policy_eval: ``(params, obs, actions) -> PolicyOutput`` *with values*, keyed by the
            module's parameter names (e.g. the SB3 adapter's ``SB3PolicyEval(policy, True)``).
        snapshot: the round. tracin_target: also compute TracIn over the steps for this target.
        actor_eval: evaluator for the TracIn loss (default ``policy_eval``).
        actor_params: parameters TracIn tracks (default: every trainable parameter).
        chunk_size: records per JVP chunk for TracIn.
    """
    names = _check_replay_inputs(model, snapshot)
    hyper, records = snapshot.hyper, snapshot.records
    leaves = [nn.Parameter(snapshot.theta[n].detach().clone()) for n in names]
    params: dict[str, Tensor] = dict(zip(names, leaves, strict=True))
    optimizer = _make_optimizer(snapshot, leaves)
    tracin = None
    if tracin_target is not None:
        tracked = actor_params if actor_params is not None else names
        tracin = _TracInAccumulator(
            model, actor_eval or policy_eval, snapshot, tracin_target, list(tracked), chunk_size
        )
    n_updates, stopped = 0, False
    for epoch in range(hyper.n_epochs):
        perm = snapshot.permutations[epoch % len(snapshot.permutations)]
        for start in range(0, len(records), hyper.batch_size):
            idx = perm[start : start + hyper.batch_size]
            mb = _minibatch(records, idx)
            loss, approx_kl, norm_adv = _minibatch_loss(policy_eval, params, mb, hyper)
            if hyper.target_kl is not None and float(approx_kl) > 1.5 * hyper.target_kl:
                stopped = True
                break
            if tracin is not None:
                tracin.add(params, idx, mb, norm_adv)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(leaves, hyper.max_grad_norm)
            optimizer.step()
            n_updates += 1
        if stopped:
            break
    theta = {n: p.detach().clone() for n, p in params.items()}
    return ReplayResult(theta, n_updates, stopped, tracin.scores if tracin is not None else None)


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Largest absolute difference between two parameter dicts over their shared names."""
    shared = [k for k in a if k in b]
    if not shared:
        raise RlattrError("a, b: the parameter dicts share no name")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in shared)


__all__ = [
    "ReplayResult",
    "RoundHyperparameters",
    "RoundSnapshot",
    "max_abs_diff",
    "replay_round",
    "seeded_permutations",
]
