"""RoundRecorder: capture what an exact replay of a stable-baselines3 PPO round needs.

Usage::

    recorder = RoundRecorder(rounds={0, 10, 40})
    model.learn(total, callback=CallbackList([InfluenceCallback(...), recorder]))
    snap = recorder.snapshots[10]                  # a rlattr.rl.replay.RoundSnapshot
    result = replay_round(model.policy, SB3PolicyEval(model.policy, with_values=True), snap)

At ``_on_rollout_end`` of a recorded round (buffer full, advantages computed, ``train()`` not yet
run) it copies theta(k), a deep copy of the optimiser's ``state_dict()``, the buffer (as a
:class:`~rlattr.rl.records.RecordBatch`) and NumPy's global RNG state. ``RolloutBuffer.get`` draws
``np.random.permutation(buffer_size * n_envs)`` once per epoch and nothing else in ``train()``
draws from NumPy, so the permutations SB3 used are regenerated from that state on a private
``RandomState``: the recorder itself consumes no random number. At the next ``_on_rollout_start``
(or ``_on_training_end``) it reads theta(k+1) and the hyperparameters ``train()`` used (learning
rate from the optimiser, clip ranges at SB3's progress), and checks that the global RNG advanced
by exactly the recorded number of permutations (``snapshot.meta["rng_verified"]``).

Place it *last* in a ``CallbackList``: it then records the buffer exactly as ``train()`` sees it,
also after an IIF callback compacted it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback

from rlattr.callbacks.sb3.influence import preserved_rng
from rlattr.callbacks.sb3.policy import check_model, records_from_buffer
from rlattr.callbacks.sb3.validation import collect_validation
from rlattr.errors import RlattrError
from rlattr.rl.replay import RoundHyperparameters, RoundSnapshot

# numpy's global RNG state in its dict form (``get_state(legacy=False)``); ``set_state`` takes it back
RNGState = dict[str, Any]


def sb3_permutations(rng_state: RNGState, n_steps: int, n_envs: int, n_epochs: int) -> list[torch.Tensor]:
    """The ``n_epochs`` minibatch orders ``RolloutBuffer.get`` draws from ``rng_state``, as
    step-major record positions: ``list[Tensor[n_steps * n_envs]]``.

    SB3 permutes env-major flat indices (``swap_and_flatten``: flat f = env * n_steps + step);
    record position r = step * n_envs + env.
    """
    rng = np.random.RandomState()
    rng.set_state(rng_state)
    flat = np.arange(n_steps * n_envs)
    record_of_flat = (flat % n_steps) * n_envs + flat // n_steps
    return [torch.from_numpy(record_of_flat[rng.permutation(n_steps * n_envs)]) for _ in range(n_epochs)]


def _rng_after(rng_state: RNGState, n: int, draws: int) -> RNGState:
    rng = np.random.RandomState()
    rng.set_state(rng_state)
    for _ in range(draws):
        rng.permutation(n)
    return rng.get_state(legacy=False)


def _same_rng_state(a: RNGState, b: RNGState) -> bool:
    same_key = np.array_equal(a["state"]["key"], b["state"]["key"])
    rest = ("bit_generator", "has_gauss", "gauss")
    return same_key and a["state"]["pos"] == b["state"]["pos"] and all(a[k] == b[k] for k in rest)


def sb3_hyperparameters(model: Any) -> RoundHyperparameters:
    """The settings ``PPO.train`` used for the round just trained (call after ``train()``)."""
    progress = model._current_progress_remaining
    clip_vf = model.clip_range_vf(progress) if model.clip_range_vf is not None else None
    return RoundHyperparameters(
        learning_rate=float(model.policy.optimizer.param_groups[0]["lr"]),
        clip_range=float(model.clip_range(progress)),
        clip_range_vf=None if clip_vf is None else float(clip_vf),
        ent_coef=float(model.ent_coef),
        vf_coef=float(model.vf_coef),
        max_grad_norm=float(model.max_grad_norm),
        normalize_advantage=bool(model.normalize_advantage),
        target_kl=None if model.target_kl is None else float(model.target_kl),
        n_epochs=int(model.n_epochs),
        batch_size=int(model.batch_size),
    )


class RoundRecorder(BaseCallback):
    """Record replayable snapshots of chosen PPO rounds (kept in memory, ``self.snapshots``).

    Args:
        rounds: round indices to record (0 = the first rollout); ``None`` records every round.
        validation_env: a separate VecEnv; when given, ``validation_steps`` steps per env are
            collected with theta(k) for each recorded round (``snapshot.validation``), drawing
            from forked RNGs, for ``ReturnTarget(source="validation")``.
        validation_steps: steps per environment of ``validation_env``.
        verbose: 1 prints a line per recorded round.
    """

    model: PPO  # checked in _init_callback

    def __init__(
        self,
        rounds: Iterable[int] | None = None,
        *,
        validation_env: Any = None,
        validation_steps: int = 512,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose=verbose)
        if not isinstance(validation_steps, int) or validation_steps < 1:
            raise RlattrError(f"validation_steps: expected an integer >= 1, got {validation_steps!r}")
        self.validation_env, self.validation_steps = validation_env, validation_steps
        if rounds is not None:
            rounds = {int(r) for r in rounds}
            if any(r < 0 for r in rounds):
                raise RlattrError(f"rounds: expected round indices >= 0, got {sorted(rounds)}")
        self.rounds = rounds
        self.round = 0
        self.snapshots: dict[int, RoundSnapshot] = {}
        self._pending: dict[str, Any] | None = None

    def _init_callback(self) -> None:
        check_model(self.model)
        if self.model.policy.optimizer is None:
            raise RlattrError("model.policy.optimizer: the policy has no optimiser to record")

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        k = self.round
        self.round += 1
        if self.rounds is not None and k not in self.rounds:
            return
        policy, buffer = self.model.policy, self.model.rollout_buffer
        self._pending = {
            "round": k,
            "theta": {n: p.detach().cpu().clone() for n, p in policy.named_parameters() if p.requires_grad},
            "optimizer_state": copy.deepcopy(policy.optimizer.state_dict()),
            "optimizer_class": type(policy.optimizer),
            "records": records_from_buffer(buffer, k),
            "rng_state": np.random.get_state(legacy=False),
            "shape": (int(buffer.buffer_size), int(buffer.n_envs)),
            "validation": None,
        }
        if self.validation_env is not None:
            with preserved_rng():
                self._pending["validation"] = collect_validation(
                    self.model, self.validation_env, self.validation_steps, k
                )

    def _on_rollout_start(self) -> None:
        self._finish()

    def _on_training_end(self) -> None:
        self._finish()

    def _finish(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        hyper = sb3_hyperparameters(self.model)
        n_steps, n_envs = pending["shape"]
        perms = sb3_permutations(pending["rng_state"], n_steps, n_envs, hyper.n_epochs)
        now = np.random.get_state(legacy=False)
        used = [
            e
            for e in range(hyper.n_epochs, 0, -1)
            if _same_rng_state(_rng_after(pending["rng_state"], n_steps * n_envs, e), now)
        ]
        policy = self.model.policy
        self.snapshots[pending["round"]] = RoundSnapshot(
            theta=pending["theta"],
            optimizer_state=pending["optimizer_state"],
            optimizer_class=pending["optimizer_class"],
            records=pending["records"],
            hyper=hyper,
            permutations=perms,
            theta_next={n: p.detach().cpu().clone() for n, p in policy.named_parameters() if p.requires_grad},
            validation=pending["validation"],
            meta={
                "round": pending["round"],
                "rng_verified": bool(used),
                "epochs_drawn": used[0] if used else None,
            },
        )
        if self.verbose >= 1:
            print(
                f"[rlattr] recorded round {pending['round']} ({n_steps * n_envs} records, rng ok: {bool(used)})"
            )


__all__ = ["RoundRecorder", "sb3_hyperparameters", "sb3_permutations"]
