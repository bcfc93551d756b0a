"""Attribution and IIF for TRL's ``GRPOTrainer`` and ``RLOOTrainer``.

TrainerCallbacks never see TRL's generation batch, so the hook is a mixin that wraps
``_generate_and_score_completions``: right after TRL has generated, rewarded and given advantages
to a generation batch (and before it shuffles and splits it into micro-batches), the mixin

1. samples completions for a held-out prompt set from the current policy (with the trainer's own
   generation, rewards and advantages) and takes the gradient of
   ``f_seq = mean A(x, y) * log pi(y | x)`` on the trainable parameters (LoRA adapters under peft);
2. scores every prompt-completion pair by ``<grad f_seq, -grad L_i>`` with L_i the pair's share of
   the trainer's own loss (its ``loss_type`` and normaliser; :mod:`rlattr.rl.sequence`);
3. optionally drops pairs chosen by a selection rule (default: every negative pair), by removing
   their rows, so they contribute no gradient and every normaliser counts only kept rows and tokens
   (``num_items_in_batch`` is recomputed over all processes).

Use ``IIFGRPOTrainer(..., attribution=AttributionConfig(target_prompts=[...]))`` (or
``IIFRLOOTrainer``, or :func:`with_attribution` on a subclass of either). Scores, drop decisions and
timings are kept in ``trainer.attribution_history`` and written as ``attr/*`` TensorBoard tags by
:class:`AttributionLogger`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from trl import GRPOTrainer, RLOOTrainer

from rlattr.callbacks.trl.batch import compact_rows, fit_to_micro_batches, keep_rows, pair_batch
from rlattr.callbacks.trl.logs import AttributionLogger, top_bottom_rows
from rlattr.core.task import Task
from rlattr.errors import RlattrError
from rlattr.rl.filtering import NegBottom, SelectionRule
from rlattr.rl.sequence import (
    GRPO_LOSS_TYPES,
    SCORE_METHODS,
    SequenceLossConfig,
    pair_scales,
    pair_scores,
    sequence_task,
    target_direction,
)

SUPPORTED_TRAINERS = ("trl.GRPOTrainer", "trl.RLOOTrainer")


@dataclass
class AttributionConfig:
    """Settings of the TRL attribution hook.

    Args:
        target_prompts: held-out prompts for f_seq: dataset rows (dicts with a ``"prompt"`` key and
            any columns the reward functions read) or plain strings. Split evenly over processes.
        drop: drop pairs before the update (IIF); ``False`` only scores and logs them.
        p: fraction of the negative-scored pairs to drop, most negative first (1.0 = all).
        rule: a :class:`~rlattr.rl.filtering.SelectionRule` overriding ``p`` (e.g. a RandomDrop).
        min_keep: the rule keeps at least this many pairs of the whole generation batch.
        target_every: recompute f_seq's gradient every this many generation batches (1 = always).
        method: how pair scores are computed: ``"auto"``, ``"jvp"`` or ``"loop"``.
        log_text_k: the k best and k worst pairs are logged as text (0 = none).
        log_dir: TensorBoard folder when the trainer has no TensorBoard callback of its own.
    """

    target_prompts: Sequence[Any]
    drop: bool = True
    p: float = 1.0
    rule: SelectionRule | None = None
    min_keep: int = 1
    target_every: int = 1
    method: str = "auto"
    log_text_k: int = 3
    log_dir: str | None = None
    selection: SelectionRule = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rows = list(self.target_prompts) if self.target_prompts is not None else []
        if not rows:
            raise RlattrError("target_prompts: need at least one held-out prompt, got none")
        bad = [r for r in rows if not isinstance(r, str) and not (isinstance(r, dict) and "prompt" in r)]
        if bad:
            raise RlattrError(f"target_prompts: each must be a str or a dict with 'prompt'; got {bad[0]!r}")
        self.target_prompts = [{"prompt": r} if isinstance(r, str) else dict(r) for r in rows]
        if self.rule is not None and not isinstance(self.rule, SelectionRule):
            raise TypeError(f"rule: expected a SelectionRule, got {type(self.rule).__name__}")
        if self.method not in SCORE_METHODS:
            raise RlattrError(f"method: got {self.method!r}; supported: {SCORE_METHODS}")
        for name in ("target_every", "min_keep"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise RlattrError(f"{name}: must be an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.log_text_k, int) or self.log_text_k < 0:
            raise RlattrError(f"log_text_k: must be an int >= 0, got {self.log_text_k!r}")
        self.selection = self.rule or NegBottom(self.p, min_keep=self.min_keep)


def _loss_config(trainer: Any) -> SequenceLossConfig:
    """Check the trainer's settings against what :mod:`rlattr.rl.sequence` mirrors; build its loss config."""
    if isinstance(trainer, GRPOTrainer):
        if trainer.loss_type not in GRPO_LOSS_TYPES:
            raise RlattrError(
                f"loss_type: got {trainer.loss_type!r}; the attribution hook mirrors GRPO loss types "
                f"{GRPO_LOSS_TYPES}"
            )
        unsupported = {
            "use_vllm=True": trainer.use_vllm,
            "top_entropy_quantile<1": trainer.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold": trainer.off_policy_mask_threshold is not None,
            "an entropy bonus (entropy_coef / adaptive entropy)": trainer._entropy_bonus_enabled,
        }
        if any(unsupported.values()):
            names = [k for k, v in unsupported.items() if v]
            raise RlattrError(f"args: the attribution hook does not mirror {names}; turn them off")
        return SequenceLossConfig(
            loss_type=trainer.loss_type,
            epsilon_low=trainer.epsilon_low,
            epsilon_high=trainer.epsilon_high,
            delta=getattr(trainer.args, "delta", None),
            beta=trainer.beta,
            bias_correction_kl=bool(getattr(trainer.args, "use_bias_correction_kl", False)),
            importance_sampling_level=trainer.importance_sampling_level,
            temperature=trainer.temperature,
        )
    if isinstance(trainer, RLOOTrainer):
        if trainer.use_vllm:
            raise RlattrError("args: the attribution hook does not mirror use_vllm=True; turn it off")
        return SequenceLossConfig(
            loss_type="rloo",
            epsilon_low=trainer.epsilon_low,
            epsilon_high=trainer.epsilon_high,
            temperature=trainer.temperature,
        )
    raise TypeError(
        f"trainer: {type(trainer).__name__} is not supported; supported: {SUPPORTED_TRAINERS} and subclasses"
    )


@contextmanager
def _metrics_restored(trainer: Any) -> Iterator[dict[str, float]]:
    """Run TRL's generation for the held-out prompts without leaving traces in its logs."""
    metrics, logs = copy.deepcopy(trainer._metrics), copy.deepcopy(trainer._logs)
    seen = trainer.state.num_input_tokens_seen
    found: dict[str, float] = {}
    try:
        yield found
        rewards = trainer._metrics["train"].get("reward", [])
        if len(rewards) > len(metrics["train"].get("reward", [])):
            found["target_reward"] = float(rewards[-1])
    finally:
        trainer._metrics, trainer._logs = metrics, logs
        trainer.state.num_input_tokens_seen = seen


@contextmanager
def _functorch_safe(model: torch.nn.Module) -> Iterator[None]:
    """Lift transformers' ``make_inputs_require_grads`` hook (gradient checkpointing) for a while.

    It calls ``requires_grad_`` inside the forward, which torch.func transforms refuse; the scores
    do not need it (the tracked parameters are the differentiated inputs).
    """
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    saved = dict(emb._forward_hooks) if emb is not None else {}
    if emb is not None:
        for key, fn in saved.items():
            if getattr(fn, "__name__", "") == "make_inputs_require_grads":
                del emb._forward_hooks[key]
    try:
        yield
    finally:
        if emb is not None:
            emb._forward_hooks.clear()
            emb._forward_hooks.update(saved)


class AttributionMixin:
    """Mixin for ``GRPOTrainer`` / ``RLOOTrainer`` subclasses: ``attribution=AttributionConfig(...)``."""

    # provided by the TRL trainer this mixin is combined with
    accelerator: Any
    args: Any
    state: Any
    model: Any
    num_generations: Any
    max_completion_length: Any
    add_callback: Any

    def __init__(self, *args: Any, attribution: AttributionConfig | None = None, **kwargs: Any) -> None:
        if not isinstance(attribution, AttributionConfig):
            raise TypeError(f"attribution: expected an AttributionConfig, got {type(attribution).__name__}")
        super().__init__(*args, **kwargs)
        self.attribution = attribution
        self._attr_loss = _loss_config(self)
        self._attr_task: Task | None = None
        self._attr_direction: dict[str, Tensor] | None = None
        self._attr_round = 0
        self._attr_target_reward = float("nan")
        self.attribution_history: list[dict[str, Any]] = []
        self.attribution_logger = AttributionLogger(log_dir=attribution.log_dir)
        self.attribution_logger.bind(self)
        self.add_callback(self.attribution_logger)

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)  # type: ignore[misc]
        if not self.model.training:
            return out
        return self._attribute_generation_batch(out)

    def _target_rows(self) -> list[dict[str, Any]]:
        rows = self.attribution.target_prompts
        procs, rank = self.accelerator.num_processes, self.accelerator.process_index
        per = len(rows) // procs
        if per == 0:
            raise RlattrError(f"target_prompts: {len(rows)} prompts cannot be split over {procs} processes")
        shard = rows[rank * per : (rank + 1) * per]
        return [copy.copy(r) for r in shard for _ in range(self.num_generations)]

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Sample the held-out completions from a stream of their own; the global RNG is left as it was.

        So a score-only run (``drop=False``) trains exactly like the plain trainer, and the arms of a
        study differ only by what they drop.
        """
        device = self.accelerator.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            seed = (int(self.args.seed) * 1_000_003 + self._attr_round) * 131 + self.accelerator.process_index
            torch.manual_seed(seed % (2**63))
            yield

    def _target_direction(self, task: Task, target_out: dict[str, Any] | None) -> dict[str, Tensor]:
        if target_out is None:
            raise RuntimeError("attribution: no held-out generation to build f_seq from")
        direction = target_direction(task, pair_batch(target_out))
        if self.accelerator.num_processes > 1:
            names = list(direction)
            flat = torch.cat([direction[k].reshape(-1) for k in names])
            flat = self.accelerator.reduce(flat, reduction="mean")
            parts = torch.split(flat, [direction[k].numel() for k in names])
            direction = {k: v.view_as(direction[k]) for k, v in zip(names, parts, strict=True)}
        return direction

    def _pair_scales(self, out: dict[str, Any], loss_mask: Tensor) -> Tensor:
        return pair_scales(
            self._attr_loss.loss_type,
            loss_mask,
            micro_batch_size=self.args.per_device_train_batch_size,
            grad_accum_steps=self.args.gradient_accumulation_steps,
            steps_per_generation=self.args.steps_per_generation,
            num_processes=self.accelerator.num_processes,
            max_completion_length=self.max_completion_length,
            num_items_in_batch=out.get("num_items_in_batch"),
        ).to(loss_mask.device)

    def _score_local(self, out: dict[str, Any]) -> tuple[Tensor, float]:
        """Local pair scores ``Tensor[n_local]`` and the seconds spent on the target."""
        model = self.accelerator.unwrap_model(self.model)
        if self._attr_task is None:
            self._attr_task = sequence_task(model, self._attr_loss)
        task = self._attr_task
        t0 = time.perf_counter()
        target_out = None
        if self._attr_direction is None or self._attr_round % self.attribution.target_every == 0:
            with _metrics_restored(self) as found, self._own_rng():  # train mode: TRL's sampling settings
                target_out = super()._generate_and_score_completions(self._target_rows())  # type: ignore[misc]
            self._attr_target_reward = found.get("target_reward", float("nan"))
        was_training = model.training
        model.eval()  # scores of the loss without dropout (identical to TRL's with disable_dropout=True)
        try:
            with torch.enable_grad(), _functorch_safe(model):
                direction = self._attr_direction
                if target_out is not None or direction is None:
                    direction = self._attr_direction = self._target_direction(task, target_out)
                t_target = time.perf_counter() - t0
                batch = pair_batch(out, self._attr_loss.beta)
                batch["scale"] = self._pair_scales(out, batch["loss_mask"])
                scores = pair_scores(task, batch, direction, method=self.attribution.method)
        finally:
            model.train(was_training)
        return scores.float(), t_target

    def _attribute_generation_batch(self, out: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        local, t_target = self._score_local(out)
        n_local, rank = local.numel(), self.accelerator.process_index
        scores = self.accelerator.gather(local.to(self.accelerator.device)).cpu()
        result = self.attribution.selection(scores) if self.attribution.drop else None
        keep = result.keep.clone() if result is not None else torch.ones(scores.numel(), dtype=torch.bool)
        notes = [result.note] if result is not None and result.note else []
        mine = slice(rank * n_local, (rank + 1) * n_local)
        # every rank applies the same rule to the same gathered scores, so decisions agree across ranks
        n_rule = int(keep.sum())
        for r in range(self.accelerator.num_processes):
            part = slice(r * n_local, (r + 1) * n_local)
            keep[part] = fit_to_micro_batches(keep[part], scores[part], self.args.steps_per_generation)
        if int(keep.sum()) > n_rule:
            notes.append(
                f"kept {int(keep.sum()) - n_rule} more pair(s) than the rule so that each process's kept "
                f"pairs split into steps_per_generation={self.args.steps_per_generation} equal micro-batches"
            )
        rows = top_bottom_rows(self, out, scores, mine, self.attribution.log_text_k)
        advantages = self.accelerator.gather(out["advantages"].float()).cpu()
        if not bool(keep.all()):
            counts = [
                int(keep[r * n_local : (r + 1) * n_local].sum())
                for r in range(self.accelerator.num_processes)
            ]
            out = compact_rows(out, keep[mine], max(counts))
            if "num_items_in_batch" in out:
                loss_mask = pair_batch(out)["loss_mask"]
                out["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        record = {
            "round": self._attr_round,
            "global_step": self.state.global_step,
            "scores": scores,
            "keep": keep,
            "advantages": advantages,
            "group_size": self.num_generations,
            "target_reward": self._attr_target_reward,
            "seconds": time.perf_counter() - t0,
            "seconds_target": t_target,
            "note": "; ".join(notes),
            "text": rows,
        }
        self.attribution_history.append(record)
        self.attribution_logger.record(record)
        self._attr_round += 1
        return out


def with_attribution(trainer_cls: type) -> type:
    """A subclass of ``trainer_cls`` (GRPOTrainer, RLOOTrainer or a subclass) taking ``attribution=...``."""
    if not isinstance(trainer_cls, type) or not issubclass(trainer_cls, (GRPOTrainer, RLOOTrainer)):
        raise TypeError(f"trainer_cls: got {trainer_cls!r}; supported: {SUPPORTED_TRAINERS} and subclasses")
    return type(f"IIF{trainer_cls.__name__}", (AttributionMixin, trainer_cls), {"__module__": __name__})


class IIFGRPOTrainer(AttributionMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with per-completion attribution and (optionally) IIF filtering."""


class IIFRLOOTrainer(AttributionMixin, RLOOTrainer):
    """``trl.RLOOTrainer`` with per-completion attribution and (optionally) IIF filtering."""


__all__ = [
    "AttributionConfig",
    "AttributionLogger",
    "AttributionMixin",
    "IIFGRPOTrainer",
    "IIFRLOOTrainer",
    "fit_to_micro_batches",
    "compact_rows",
    "keep_rows",
    "pair_batch",
    "with_attribution",
]
