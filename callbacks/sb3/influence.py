"""InfluenceCallback: per-round data attribution for vanilla stable-baselines3 PPO.

Usage::

    model = PPO("MlpPolicy", "CartPole-v1", tensorboard_log="runs")
    model.learn(50_000, callback=InfluenceCallback(target="return"))

At the end of every rollout (``_on_rollout_end``: the buffer is full and SB3 has already computed
the GAE advantages and returns, and ``train()`` has not run yet) the callback copies the buffer into
a :class:`~rlattr.rl.records.RecordBatch`, scores every record against the target at theta(k)
(:func:`rlattr.rl.attribution.score_round`), logs ``attr/*`` to TensorBoard in SB3's run folder
and writes a snapshot. It never changes what PPO does: it draws no random numbers (RNG states it
must touch are put back), reads the buffer without modifying it, and leaves the parameters alone.
A write that fails (a full disk, a read-only folder) warns once and stops that output (snapshots or
TensorBoard); training goes on. One instance records one model's run: reusing it for another is refused.

The policy is evaluated in the mode the rollout left it in (eval mode); for the usual policies
(no dropout, no batch norm) that equals what ``train()`` sees.

For subclasses (e.g. IIF): override :meth:`InfluenceCallback._on_round_scored(records, scores)`,
called after scoring and right before SB3's ``train()`` runs on ``self.rollout_buffer`` (still
``(n_steps, n_envs, ...)``, not yet flattened). ``records`` is the round's
:class:`~rlattr.rl.records.RecordBatch` (record r = env ``r % n_envs`` at step ``r // n_envs``;
``records.ids: Tensor[n, 3]``; ``records.observations`` is a tensor, or a dict of tensors for a
Dict observation space with ``MultiInputPolicy``), ``scores`` its :class:`~rlattr.rl.attribution.RoundScores`
(``scores.scores: Tensor[n]`` in the same order, ``scores.as_dict()`` keyed by id). The same are
kept as ``self.last_records`` / ``self.last_scores``; ``self.round_scores()`` gives the dict,
``self.run_dir`` the run folder (or ``None``), ``self.history`` one summary dict per scored round.
"""

from __future__ import annotations

import os
import random
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import TensorBoardOutputFormat
from torch import Tensor

from rlattr.callbacks.sb3.guards import check_buffer_shape, check_finite, check_trainable
from rlattr.callbacks.sb3.outputs import RoundOutputs
from rlattr.callbacks.sb3.policy import (
    PARAM_SETS,
    SB3PolicyEval,
    check_model,
    first_epoch_minibatches,
    ppo_hyperparameters,
    records_from_buffer,
    tracked_param_names,
)
from rlattr.callbacks.sb3.validation import collect_validation
from rlattr.errors import RlattrError, check_int
from rlattr.rl.attribution import RoundScores, RoundSpec, score_round
from rlattr.rl.ppo import ADVANTAGE_NORMS, PPOLossConfig
from rlattr.rl.records import (
    RecordBatch,
    RecordId,
    flatten_observations,
    index_observations,
    unflatten_observations,
)
from rlattr.rl.snapshots import SnapshotWriter, load_run, run_metadata
from rlattr.rl.targets import ActionTarget, TargetSpec, make_target


@contextmanager
def preserved_rng():
    """Run a block and put the Python, NumPy and torch (CPU and CUDA) RNG states back afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(
        devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    ):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class InfluenceCallback(RoundOutputs, BaseCallback):
    """Score every record of every PPO round against a target.

    Args:
        target: ``"return"`` (REINFORCE surrogate, raw advantages), ``"action"`` (log-prob of given
            pairs; pass ``target_kwargs={"observations": ..., "actions": ...}``) or a
            :class:`~rlattr.rl.targets.TargetSpec`.
        target_kwargs: keyword arguments of the named target.
        every: score every ``every``-th round (1 = all rounds).
        params: ``"actor"`` (default; value head left out, shared extractor kept) or ``"all"``
            (every parameter, with the value loss in the per-record loss).
        advantage_norm: ``"auto"`` (``"buffer"`` if the model normalises advantages, else
            ``"none"``), ``"buffer"``, ``"minibatch"`` or ``"none"``; see :mod:`rlattr.rl.ppo`.
        by_group: also compute the per-layer breakdown (one JVP pass per layer).
        top_k: number of top and bottom records in the TensorBoard text table.
        log_dir: run folder for TensorBoard events and snapshots; default: SB3's TensorBoard run
            folder when ``tensorboard_log`` is set, otherwise nothing is written to disk.
        snapshot_every: keep the full snapshot (records, theta) of every k-th scored round.
        keep_last: keep at most this many full snapshots (older ones are pruned to their scores).
        keep_rounds: keep the folders (scores included) of at most this many recent scored rounds;
            older ones are deleted, their summaries stay in ``rounds.jsonl`` (``None``: keep all).
        tensorboard: write ``attr/*`` TensorBoard events.
        image_every: log the score-vs-advantage image every this many scored rounds, the first
            after ``image_every`` of them (so a shorter run never imports matplotlib).
        validation_env: a separate VecEnv for ``ReturnTarget(source="validation")``.
        validation_steps: steps per environment collected from ``validation_env`` per round.
        probe_states: behaviour-formation probes: ``m`` (take m evenly spaced (state, action) pairs
            of the first scored round) or ``(observations, actions)``; every round then also scores
            all records against each probe's log-prob (``ActionTarget(reduce="none")``) and
            records log pi(a|s) of each probe at theta(k).
        chunk_size: records per JVP chunk.
        verbose: 1 prints one line per scored round.
    """

    model: PPO  # checked in _init_callback

    def __init__(
        self,
        target: str | TargetSpec = "return",
        *,
        target_kwargs: dict[str, Any] | None = None,
        every: int = 1,
        params: str = "actor",
        advantage_norm: str = "auto",
        by_group: bool = False,
        top_k: int = 10,
        log_dir: str | Path | None = None,
        snapshot_every: int = 1,
        keep_last: int | None = None,
        keep_rounds: int | None = None,
        tensorboard: bool = True,
        image_every: int = 10,
        validation_env: Any = None,
        validation_steps: int = 256,
        probe_states: int | tuple[Any, Any] | None = None,
        chunk_size: int = 4096,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose=verbose)
        self.target = make_target(target, **(target_kwargs or {}))
        for name, value in (("every", every), ("top_k", top_k), ("snapshot_every", snapshot_every)):
            check_int(name, value)
        for name, value in (("image_every", image_every), ("validation_steps", validation_steps)):
            check_int(name, value)
        check_int("keep_last", keep_last, allow_none=True)
        check_int("keep_rounds", keep_rounds, allow_none=True)
        if log_dir is not None and not isinstance(log_dir, str | os.PathLike):
            raise RlattrError(f"log_dir: expected a path (str or os.PathLike) or None, got {log_dir!r}")
        check_int("chunk_size", chunk_size)
        if params not in PARAM_SETS:
            raise RlattrError(f"params: got {params!r}; supported: {PARAM_SETS}")
        if advantage_norm not in ("auto", *ADVANTAGE_NORMS):
            raise RlattrError(
                f"advantage_norm: got {advantage_norm!r}; supported: {('auto', *ADVANTAGE_NORMS)}"
            )
        if getattr(self.target, "source", "buffer") == "validation" and validation_env is None:
            raise RlattrError(
                "validation_env: ReturnTarget(source='validation') needs a validation_env (a VecEnv)"
            )
        self.every, self.params, self.advantage_norm, self.by_group = every, params, advantage_norm, by_group
        self.top_k, self.log_dir, self.tensorboard, self.image_every = (
            top_k,
            log_dir,
            tensorboard,
            image_every,
        )
        self.snapshot_every, self.keep_last, self.chunk_size = snapshot_every, keep_last, chunk_size
        self.keep_rounds = keep_rounds
        self.validation_env, self.validation_steps = validation_env, validation_steps
        if isinstance(probe_states, int):
            check_int("probe_states", probe_states)
        elif probe_states is not None and not (isinstance(probe_states, tuple) and len(probe_states) == 2):
            raise RlattrError(
                f"probe_states: expected an int, (observations, actions) or None, got {probe_states!r}"
            )
        self.probe_states = probe_states
        self._probe: ActionTarget | None = None
        self.last_probe: dict[str, Tensor] = {}
        self.round = 0
        self.n_scored = 0
        self.last_records: RecordBatch | None = None
        self.last_scores: RoundScores | None = None
        self.last_validation: RecordBatch | None = None  # the round's validation transitions, if any
        self.history: list[dict[str, Any]] = []
        self.run_dir: Path | None = None
        self._writer: Any = None
        self._snapshots: SnapshotWriter | None = None
        self._bound_model: Any = None
        self._resume_round: int | None = None
        self._outputs_off: set[str] = set()

    # ----------------------------------------------------------------- setup
    def _init_callback(self) -> None:
        check_model(self.model)
        if self._bound_model is not None and self._bound_model is not self.model:
            raise RlattrError(
                f"callback: this {type(self).__name__} already recorded a run of another model; "
                "make a new callback for each model"
            )
        self._bound_model = self.model
        policy = self.model.policy
        self.param_names = tracked_param_names(policy, self.params)
        check_trainable(self.param_names, self.params)
        self.policy_eval = SB3PolicyEval(policy, with_values=self.params == "all")
        # torch loads its forward-mode AD decompositions on the first jvp of a process (~0.5-1 s):
        # pay it here, at training start, rather than inside round 0's timing.
        torch.func.jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),))
        if self._snapshots is not None:  # a later learn() call continues the same run folder
            return
        self.run_dir = self._resolve_run_dir()
        if self.run_dir is None:
            warnings.warn(
                f"{type(self).__name__}: nothing will be saved (the PPO model has no tensorboard_log and "
                "the callback no log_dir): scores stay in memory only (callback.history, "
                "callback.last_scores). Pass PPO(..., tensorboard_log='runs') or log_dir='runs/my_run' "
                "to get TensorBoard attr/* tags, snapshots and `rlattr report`.",
                UserWarning,
                stacklevel=2,
            )
        else:
            meta = run_metadata(
                target=self.target.describe(),
                hyperparameters=ppo_hyperparameters(self.model),
                callback=self._settings(),
                tracked_params=self.param_names,
            )
            self._snapshots = SnapshotWriter(
                self.run_dir / "rlattr",
                meta,
                every=self.snapshot_every,
                keep_last=self.keep_last,
                keep_rounds=self.keep_rounds,
                resume=self._resume_round is not None,
            )
            if self._resume_round is not None:
                self._snapshots.discard_from(self._resume_round)
                self._reload_probes()
            if self.tensorboard:
                from rlattr.reporting.tensorboard import AttrWriter

                self._writer = AttrWriter(self.run_dir)

    def _resolve_run_dir(self) -> Path | None:
        if self.log_dir is not None:
            return Path(self.log_dir)
        logger = self.model.logger
        if any(isinstance(f, TensorBoardOutputFormat) for f in logger.output_formats) and logger.get_dir():
            return Path(str(logger.get_dir()))
        return None

    def _settings(self) -> dict[str, Any]:
        return {
            "every": self.every,
            "params": self.params,
            "advantage_norm": self.advantage_norm,
            "by_group": self.by_group,
            "snapshot_every": self.snapshot_every,
            "keep_last": self.keep_last,
            "keep_rounds": self.keep_rounds,
            "chunk_size": self.chunk_size,
        }

    # ----------------------------------------------------------------- hooks
    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        k = self.round
        self.round += 1
        if k % self.every != 0:
            return
        scores = self.score_current_round(k)
        self._record_round(scores)
        self._on_round_scored(self.last_records, scores)  # type: ignore[arg-type]

    def _on_round_scored(self, records: RecordBatch, scores: RoundScores) -> None:
        """Hook for subclasses: called after scoring, before SB3's ``train()`` (no-op here)."""

    def _on_training_end(self) -> None:
        self._flush_tensorboard()

    def resume_at(self, round_index: int) -> None:
        """Continue the run already in ``log_dir`` at ``round_index`` (``rlattr train --resume``):
        rounds from there on are discarded from the run folder and scored again."""
        check_int("round_index", round_index, low=0)
        self._resume_round = self.round = round_index

    def _reload_probes(self) -> None:
        """A resumed run keeps the probes its first round chose (stored beside that round's scores)."""
        if not isinstance(self.probe_states, int) or self.run_dir is None:
            return
        run = load_run(self.run_dir)
        if run.rounds:
            stored = run.score_tensors(run.rounds[0])
            obs = unflatten_observations("probe_observations", stored)
            if obs is not None and "probe_actions" in stored:
                self._probe = ActionTarget(obs, stored["probe_actions"], reduce="none")

    # ----------------------------------------------------------------- public API
    @property
    def rollout_buffer(self) -> RolloutBuffer | DictRolloutBuffer:
        """SB3's rollout buffer, shape ``(n_steps, n_envs, ...)`` during ``_on_round_scored``."""
        return self.model.rollout_buffer

    def loss_config(self) -> PPOLossConfig:
        """The PPO loss settings of the round about to be trained (clip range at SB3's progress)."""
        model = self.model
        progress = 1.0 - float(model.num_timesteps) / float(max(model._total_timesteps, 1))
        norm = self.advantage_norm
        if norm == "auto":
            norm = "buffer" if model.normalize_advantage else "none"
        return PPOLossConfig(
            clip_range=float(model.clip_range(progress)),  # type: ignore[operator]
            ent_coef=float(model.ent_coef),
            vf_coef=float(model.vf_coef),
            advantage_norm=norm,
            include_value_loss=self.params == "all",
        )

    def score_current_round(self, round_index: int | None = None) -> RoundScores:
        """Copy the buffer into ``self.last_records`` and score it; returns the round's scores."""
        k = self.round - 1 if round_index is None else round_index
        model = self.model
        check_buffer_shape(model, k)
        records = records_from_buffer(model.rollout_buffer, k)
        check_finite(records)
        config = self.loss_config()
        minibatch_of = None
        if config.advantage_norm == "minibatch":
            minibatch_of = first_epoch_minibatches(model.n_steps, model.n_envs, model.batch_size)
        validation = None
        if getattr(self.target, "source", "buffer") == "validation":
            with preserved_rng():
                validation = collect_validation(model, self.validation_env, self.validation_steps, k)
        spec = RoundSpec(
            model.policy,
            self.policy_eval,
            records,
            self.target,
            config,
            params=self.param_names,
            validation=validation,
            minibatch_of=minibatch_of,
        )
        scores = score_round(spec, by_group=self.by_group, chunk_size=self.chunk_size)
        self.last_records, self.last_scores, self.last_validation = records, scores, validation
        self.last_probe = self._score_probes(records, config) if self.probe_states is not None else {}
        return scores

    def _score_probes(self, records: RecordBatch, config: PPOLossConfig) -> dict[str, Tensor]:
        """``probe_scores: Tensor[m, n]`` and ``probe_logp: Tensor[m]`` (log pi(a|s) at theta(k))."""
        if self._probe is None:
            if isinstance(self.probe_states, int):
                pos = torch.linspace(0, len(records) - 1, min(self.probe_states, len(records))).long()
                obs, act = index_observations(records.observations, pos), records.actions[pos]
            else:
                obs, act = self.probe_states  # type: ignore[misc]
            self._probe = ActionTarget(obs, act, reduce="none")
        probe = self._probe
        spec = RoundSpec(self.model.policy, self.policy_eval, records, probe, config, params=self.param_names)
        result = score_round(spec, chunk_size=self.chunk_size)
        params = {n: p.detach() for n, p in self.model.policy.named_parameters()}
        with torch.no_grad():
            logp = self.policy_eval(params, probe.observations, probe.actions).log_prob
        scores = result.scores if result.scores.dim() == 2 else result.scores.unsqueeze(0)
        return {
            "probe_scores": scores,
            "probe_logp": logp.detach().float().cpu(),
            **flatten_observations("probe_observations", probe.observations),
            "probe_actions": probe.actions,
        }

    def round_scores(self) -> dict[RecordId, float]:
        """The last scored round as ``{(round, step, env): score}``."""
        if self.last_scores is None:
            raise RuntimeError("round_scores: no round has been scored yet")
        return self.last_scores.as_dict()


__all__ = ["InfluenceCallback", "preserved_rng"]
