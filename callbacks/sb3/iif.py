"""IIFCallback: iterative influence-based filtering (Algorithm 1 of Hu et al. 2025) for SB3 PPO.

Usage::

    model = PPO("MlpPolicy", "LunarLander-v3")
    model.learn(300_000, callback=IIFCallback(drop="neg-bottom", p=0.125))

Every round, :class:`~rlattr.callbacks.sb3.InfluenceCallback` scores the fresh buffer against the
return target at theta(k); then this callback picks the kept records with a
:mod:`rlattr.rl.filtering` rule and *compacts* SB3's rollout buffer to them: every per-record array
becomes ``(n_kept, 1, ...)`` with ``buffer_size = n_kept`` and ``n_envs = 1``. SB3's own ``train()``
then runs on the kept records alone, with its usual epochs, minibatches (fewer of them: that is where
IIF saves time) and per-minibatch advantage normalisation. A round whose rule keeps every record
leaves the buffer untouched, so PPO's update is then bit-identical to plain PPO's. Zeroing the
advantages of dropped records would not be a filter: the normalisation turns the zeros into
non-zero values.

The buffer gets its shape back in ``_on_rollout_start`` (SB3 calls ``reset()`` just before it, on
the compacted shape; the callback resets again on the original one) and in ``_on_training_end``, so
later rounds, a second ``learn()`` and ``save``/``load`` see the buffer PPO built.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rlattr.callbacks.sb3.buffers import (
    BufferShape,
    compact_rollout_buffer,
    per_record_arrays,
    restore_rollout_buffer,
)
from rlattr.callbacks.sb3.influence import InfluenceCallback
from rlattr.errors import RlattrError
from rlattr.rl.attribution import RoundScores, RoundSpec, score_round
from rlattr.rl.filtering import (
    FilterResult,
    NegBottom,
    RandomDrop,
    SelectionRule,
    make_rule,
    soft_weights,
    systematic_counts,
)
from rlattr.rl.records import RecordBatch
from rlattr.rl.targets import ReturnTarget, TargetSpec

# what rule_kwargs may hold: the other rules' parameters, and the rule a "random" drop shadows
RULE_KWARGS = ("f", "k", "like", "q", "t")
SCORE_ON = ("buffer", "validation")
RESCORE = ("round", "epoch", "epoch-fresh")
WEIGHTING = ("drop", "refill", "soft")


def _shallow_copy(value: Any) -> Any:
    """A dict of arrays copied (SB3's ``get()`` flattens a DictRolloutBuffer's observations in place,
    inside the dict), any other value as it is (``get()`` replaces those attributes)."""
    return dict(value) if isinstance(value, dict) else value


class IIFCallback(InfluenceCallback):
    """Score every round against the return target and train PPO on the kept records only.

    Args:
        drop: the selection rule: ``"neg-bottom"`` (the paper's; drop the most negative ``p``
            fraction of the negative records), ``"random"`` (the baseline: drop as many records as
            ``neg-bottom`` with this ``p`` would, chosen at random), ``"bottom-fraction"``,
            ``"threshold"``, ``"top-k"``, ``"adaptive"`` (drop the fewest most-negative records that
            carry the fraction ``rule_kwargs["f"]`` of the predicted first-order gain), or a
            :class:`~rlattr.rl.filtering.SelectionRule`.
        p: the fraction for ``neg-bottom`` and ``random`` (paper: 0.5 FrozenLake/Acrobot/Highway,
            0.125 MiniGrid/LunarLander, 0.0625 BipedalWalker).
        min_keep: never keep fewer records than this (default: the model's ``batch_size``, one
            minibatch); when the rule would, the best-scored ``min_keep`` are kept.
        seed: seed of the ``random`` rule's own generator (the global RNG is never touched).
        score_on: ``"buffer"`` (the paper's: the return target over the round's own records) or
            ``"validation"`` (the return target over ``validation_steps`` fresh transitions per env
            from ``validation_env``, collected at theta(k) and never trained on, so the filter does
            not select on the data that defines its target).
        rescore: ``"round"`` (the paper's: score once, at theta(k)), ``"epoch"``: at the start of
            every epoch after the first, score the still-kept records again at the current
            parameters (same target data) and drop from the remaining epochs what the rule drops
            (the drops compound: each epoch applies the rule to what the last one kept), or
            ``"epoch-fresh"``: at the start of every epoch after the first, score *every* record of
            the round at the current parameters and train that epoch on what the rule keeps of all
            of them (no compounding: each epoch drops about what the round's first selection
            dropped, and a record dropped earlier can come back).
        weighting: how the rule's decision reaches ``train()``: ``"drop"`` (the paper's: train on
            the kept records only, so each epoch has fewer minibatches), ``"refill"`` (the kept
            records resampled back to the round's record count, so PPO takes as many minibatch
            steps as without a filter) or ``"soft"`` (per-record loss weights instead of a drop:
            a kept record weighs 1, a dropped one ``1 - s / s_min``, from
            :func:`rlattr.rl.filtering.soft_weights`, realised as multiplicities by systematic
            resampling back to the round's record count). ``"refill"`` and ``"soft"`` need
            ``rescore="round"``.
        rule_kwargs: arguments of the other named rules (``f`` of ``"adaptive"``, ``q``, ``t``, ``k``)
            and ``like``, the rule
            a ``"random"`` drop shadows; every rule comes from :func:`rlattr.rl.filtering.make_rule`.
        save_dropped: write each round's dropped ids to ``<run_dir>/rlattr/iif/round_XXXXX.json``
            when the callback has a run folder.
        **influence_kwargs: passed to :class:`~rlattr.callbacks.sb3.InfluenceCallback`
            (``target`` defaults to ``"return"``, ``snapshot_every`` to 10).

    Attributes:
        filter_history: one dict per filtered round: round, n_records, n_kept, kept_fraction,
            threshold, note, dropped_ids (``[[round, step, env], ...]``); with ``rescore="epoch"``
            also epoch_drops: per later epoch, the ids dropped at its start (from the records the
            epoch before kept); with ``"epoch-fresh"`` epoch_drops holds, per later epoch, every id
            that epoch left out of the round's records. With ``weighting`` ``"refill"`` or
            ``"soft"``: n_unique (records drawn at least once), max_count (the most draws of one
            record) and, for ``"soft"``, weight_sum (the weights' total; dropped_ids are then the
            ids the rule down-weighted).

    ``rescore="epoch"`` hooks into SB3's unmodified ``train()``, which calls
    ``rollout_buffer.get(batch_size)`` once per epoch: for the round, the buffer instance gets a
    ``get`` that re-scores and compacts before handing over to the class's own ``get``; the
    instance attribute is removed again when the buffer is restored.
    """

    def __init__(
        self,
        drop: str | SelectionRule = "neg-bottom",
        p: float = 0.125,
        *,
        min_keep: int | None = None,
        seed: int = 0,
        rule_kwargs: dict[str, Any] | None = None,
        save_dropped: bool = True,
        score_on: str = "buffer",
        rescore: str = "round",
        weighting: str = "drop",
        **influence_kwargs: Any,
    ) -> None:
        if score_on not in SCORE_ON:
            raise RlattrError(f"score_on: got {score_on!r}; supported: {list(SCORE_ON)}")
        if rescore not in RESCORE:
            raise RlattrError(f"rescore: got {rescore!r}; supported: {list(RESCORE)}")
        if weighting not in WEIGHTING:
            raise RlattrError(f"weighting: got {weighting!r}; supported: {list(WEIGHTING)}")
        if weighting != "drop" and rescore != "round":
            raise RlattrError(
                f"weighting: got {weighting!r} with rescore={rescore!r}; supported: weighting 'drop' "
                "with any rescore, 'refill' and 'soft' with rescore='round'"
            )
        if score_on == "validation":
            if "target" in influence_kwargs:
                raise RlattrError(
                    "target: score_on='validation' sets the return target itself; give no target"
                )
            influence_kwargs["target"] = ReturnTarget(source="validation")
        influence_kwargs.setdefault("target", "return")
        influence_kwargs.setdefault("snapshot_every", 10)
        super().__init__(**influence_kwargs)
        if not isinstance(p, (int, float)) or isinstance(p, bool):
            raise RlattrError(f"p: must be a fraction in [0, 1], got {p!r}")
        unknown = sorted(set(rule_kwargs or {}) - set(RULE_KWARGS))
        if unknown:
            raise RlattrError(f"rule_kwargs: got {unknown}; supported: {list(RULE_KWARGS)}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise RlattrError(f"seed: expected an integer, got {seed!r}")
        if min_keep is not None and (
            not isinstance(min_keep, int) or isinstance(min_keep, bool) or min_keep < 1
        ):
            raise RlattrError(f"min_keep: expected an int >= 1 or None (one minibatch), got {min_keep!r}")
        self.drop, self.p, self.min_keep, self.seed = drop, float(p), min_keep, int(seed)
        self.rule_kwargs = dict(rule_kwargs or {})
        self.save_dropped = save_dropped
        # built once here so that bad arguments fail at construction; rebuilt with the model's
        # batch_size as min_keep in _init_callback when min_keep is None
        self.rule: SelectionRule = drop if isinstance(drop, SelectionRule) else self._make_rule(min_keep or 1)
        self._rule_pending = not isinstance(drop, SelectionRule) and min_keep is None
        if rescore != "round" and self.advantage_norm == "minibatch":
            # the labels of each later epoch's minibatches are SB3's fresh shuffle, unknown beforehand
            raise RlattrError(
                f"rescore: got {rescore!r} with advantage_norm='minibatch'; supported: advantage_norm "
                "'auto', 'buffer' or 'none'"
            )
        self.score_on, self.rescore, self.weighting = score_on, rescore, weighting
        self.filter_history: list[dict[str, Any]] = []
        self._original_shape: BufferShape | None = None
        self._kept_pos: torch.Tensor | None = None  # record position of each row of the compacted buffer
        self._epochs_seen = 0
        self._hooked, self._instance_get = False, None
        # rescore="epoch-fresh": the round's full per-record arrays (references, taken before any
        # compaction or flattening) and shape, so every epoch can select from all of them again
        self._full_arrays: dict[str, Any] | None = None
        self._full_shape: BufferShape | None = None

    def _make_rule(self, min_keep: int) -> SelectionRule:
        """The rule named by ``drop``, from :func:`rlattr.rl.filtering.make_rule`; ``p`` goes to neg-bottom."""
        args: dict[str, Any] = dict(self.rule_kwargs)
        shadows_neg_bottom = (
            self.drop == RandomDrop.name and args.get("like", NegBottom.name) == NegBottom.name
        )
        if self.drop == NegBottom.name or shadows_neg_bottom:
            args["p"] = self.p
        return make_rule(str(self.drop), seed=self.seed, min_keep=min_keep, **args)

    def _init_callback(self) -> None:
        if self._rule_pending:  # before super() writes the run metadata, which records the rule
            self.rule = self._make_rule(
                self.min_keep if self.min_keep is not None else int(self.model.batch_size)
            )
            self._rule_pending = False
        super()._init_callback()
        if self._original_shape is None:
            buf = self.model.rollout_buffer
            self._original_shape = BufferShape(buf.buffer_size, buf.n_envs)

    def _settings(self) -> dict[str, Any]:
        return {
            **super()._settings(),
            "iif_rule": self.rule.config(),
            "score_on": self.score_on,
            "rescore": self.rescore,
            "weighting": self.weighting,
        }

    # ----------------------------------------------------------------- hooks
    def _on_round_scored(self, records: RecordBatch, scores: RoundScores) -> None:
        s = scores.scores
        if s.dim() != 1:
            raise RlattrError(
                f"target: IIF filters on one score per record, got scores of shape {tuple(s.shape)}; "
                "use a single-component target such as 'return'"
            )
        result = self.rule(s)
        self._restore()
        if self.rescore == "epoch-fresh":
            buf = self.model.rollout_buffer
            self._full_shape = BufferShape(buf.buffer_size, buf.n_envs)
            self._full_arrays = {name: _shallow_copy(getattr(buf, name)) for name in per_record_arrays(buf)}
        # a rule that keeps every record leaves the buffer, and so PPO's update, exactly as they were
        resampled: dict[str, Any] = {}
        if self.weighting != "drop":
            positions, resampled = self._resample(s, result, records.round_index)
            if positions is not None:
                self._original_shape = compact_rollout_buffer(self.model.rollout_buffer, positions)
        elif not bool(result.keep.all()):
            self._original_shape = compact_rollout_buffer(self.model.rollout_buffer, result.keep.numpy())
        self._log_filter(records, result, resampled)
        if self.rescore != "round":
            self._kept_pos = torch.nonzero(result.keep).flatten()
            self._epochs_seen = 0
            self._hook_get()

    def _resample(
        self, scores: torch.Tensor, result: FilterResult, round_index: int
    ) -> tuple[np.ndarray | None, dict[str, Any]]:
        """The record positions (repeats allowed) that give ``train()`` the rule's decision as weights
        (``weighting`` ``"refill"`` or ``"soft"``), or None when every weight is 1 (the buffer then
        stays as it is), and what the log records of them."""
        n = scores.numel()
        weights = result.keep.double() if self.weighting == "refill" else soft_weights(scores, result.keep)
        if bool((weights == 1.0).all()):
            return None, {"n_unique": n, "max_count": 1, "weight_sum": float(n)}
        # the systematic offset comes from a generator of this callback's seed and the round,
        # never from the global RNG that SB3's shuffling draws on
        offset = float(np.random.default_rng([self.seed, round_index]).random())
        counts = systematic_counts(weights, n, offset).numpy()
        info = {
            "n_unique": int((counts > 0).sum()),
            "max_count": int(counts.max()),
            "weight_sum": float(weights.sum()),
        }
        return np.repeat(np.arange(n), counts), info

    # ----------------------------------------------------------------- re-scoring per epoch
    def _hook_get(self) -> None:
        buf = self.model.rollout_buffer
        self._unhook_get()
        # a get another callback put on the instance (e.g. a test's spy) is wrapped, and put back later
        self._instance_get = vars(buf).get("get")
        inner = buf.get

        def get(batch_size: int | None = None):  # type: ignore[no-untyped-def]
            if self._epochs_seen > 0:
                self._rescore_epoch()
            self._epochs_seen += 1
            return inner(batch_size)

        buf.get = get  # type: ignore[method-assign]
        self._hooked = True

    def _unhook_get(self) -> None:
        if not self._hooked:
            return
        buf = self.model.rollout_buffer
        if self._instance_get is not None:
            buf.get = self._instance_get  # type: ignore[method-assign]
        else:
            del buf.get
        self._hooked, self._instance_get = False, None

    def _rescore_epoch(self) -> None:
        """Score the kept records (``"epoch"``) or all the round's records (``"epoch-fresh"``) at
        the current parameters against the round's target data and compact the buffer to what the
        rule keeps of them."""
        records = self.last_records
        assert records is not None and self._kept_pos is not None
        fresh = self.rescore == "epoch-fresh"
        pos = torch.arange(len(records)) if fresh else self._kept_pos
        target: TargetSpec
        validation: RecordBatch | None
        if isinstance(self.target, ReturnTarget) and self.target.source == "buffer":
            # the target stays the return surrogate of the whole round, now at the current parameters
            target, validation = ReturnTarget(source="validation"), records
        else:
            target, validation = self.target, self.last_validation
        kept = records.select(pos)
        spec = RoundSpec(
            self.model.policy,
            self.policy_eval,
            kept,
            target,
            self.loss_config(),
            params=self.param_names,
            validation=validation,
        )
        result = self.rule(score_round(spec, chunk_size=self.chunk_size).scores)
        self.filter_history[-1].setdefault("epoch_drops", []).append(kept.ids[~result.keep].tolist())
        if fresh:
            self._put_full_arrays()
        if not bool(result.keep.all()):
            compact_rollout_buffer(self.model.rollout_buffer, result.keep.numpy())
            self._kept_pos = pos[result.keep]  # read by "epoch" only

    def _put_full_arrays(self) -> None:
        """Give the buffer the round's full, unflattened arrays back (``rescore="epoch-fresh"``)."""
        assert self._full_arrays is not None and self._full_shape is not None
        buf = self.model.rollout_buffer
        for name, value in self._full_arrays.items():
            setattr(buf, name, _shallow_copy(value))
        buf.buffer_size, buf.n_envs = self._full_shape.buffer_size, self._full_shape.n_envs
        buf.pos, buf.full, buf.generator_ready = self._full_shape.buffer_size, True, False

    def _on_rollout_start(self) -> None:
        self._restore()

    def _on_training_end(self) -> None:
        self._restore()
        super()._on_training_end()

    def _restore(self) -> None:
        self._unhook_get()
        self._full_arrays = None
        buf = self.model.rollout_buffer
        shape = self._original_shape
        if shape is not None and (buf.buffer_size, buf.n_envs) != (shape.buffer_size, shape.n_envs):
            restore_rollout_buffer(buf, shape)

    # ----------------------------------------------------------------- outputs
    def _log_filter(self, records: RecordBatch, result: FilterResult, resampled: dict[str, Any]) -> None:
        dropped = records.ids[~result.keep].tolist()
        entry = {
            "round": records.round_index,
            "timesteps": int(self.model.num_timesteps),
            "n_records": len(records),
            "n_kept": result.n_kept,
            "kept_fraction": result.kept_fraction,
            "threshold": result.threshold,
            "note": result.note,
            "dropped_ids": dropped,
            **resampled,
        }
        self.filter_history.append(entry)
        self.logger.record("attr/kept_fraction", result.kept_fraction)
        self.logger.record("attr/n_dropped", result.n_dropped)
        if np.isfinite(result.threshold):
            self.logger.record("attr/drop_threshold", result.threshold)
        if result.note and self.verbose >= 1:
            print(f"[rlattr] IIF round {entry['round']}: {result.note}")
        if self.save_dropped and self._snapshots is not None and "snapshots" not in self._outputs_off:
            k = records.round_index
            try:
                self._snapshots.write_json(f"iif/round_{k:05d}.json", entry, round_index=k)
            except OSError as err:
                self._stop_output("snapshots", err)


__all__ = ["BufferShape", "IIFCallback", "compact_rollout_buffer", "restore_rollout_buffer"]
