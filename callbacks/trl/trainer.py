"""Attribution and IIF for TRL's ``GRPOTrainer`` and ``RLOOTrainer``.

TrainerCallbacks never see TRL's generation batch, so the hook is a mixin that wraps
``_generate_and_score_completions``: right after TRL has generated, rewarded and given advantages
to a generation batch, the mixin

1. (every ``target_every`` batches) samples completions for a held-out prompt set through the
   trainer's own generation and takes the gradient of ``f_seq = mean A(x, y) * log pi(y | x)`` on
   the trainable parameters (LoRA adapters under peft), with TRL's own log-probs, capturing each
   layer's inputs and output gradients (:mod:`rlattr.callbacks.trl.fused`);
2. scores every prompt-completion pair by ``<grad f_seq, -grad L_i>``, L_i the pair's share of TRL's
   own loss as TRL back-propagates it (any ``loss_type``, importance-sampling corrections, entropy
   and off-policy masks, KL): the layers of TRL's ``compute_loss`` are captured and each pair's score
   is a per-layer ghost dot product after the micro-batch's backward (no extra pass);
3. optionally drops pairs chosen by a selection rule (default: every negative pair): after the last
   micro-batch of the generation batch, before the optimizer step, their gradient contributions are
   subtracted and the normaliser rescaled to the kept pairs' (gradient surgery). Where that cannot
   be exact (:func:`~rlattr.callbacks.trl.fused.scoring_plan`: several processes, several optimizer
   steps per generation batch, bnpo over several micro-batches, entropy mask / bonus) the scores
   come from a pass through TRL's own loss before the update and the dropped rows are removed from
   the batch, so every normaliser counts only kept rows and tokens.

Use ``IIFGRPOTrainer(..., args=IIFGRPOConfig(..., attr_target_prompts=[...]))`` (the ``attr_*`` fields
also parse from the command line with ``TrlParser``), or the shortcut
``IIFGRPOTrainer(..., attribution=AttributionConfig(target_prompts=[...]))``; likewise ``IIFRLOOTrainer``
with ``IIFRLOOConfig``, or :func:`with_attribution` on a subclass of either. Scores, drop decisions and
timings are kept in ``trainer.attribution_history``; :class:`AttributionLogger` adds the ``attr/*``
scalars to TRL's own logged metrics and saves every scored batch under ``{output_dir}/rlattr``.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from trl import GRPOTrainer, RLOOTrainer

from rlattr.callbacks.trl.batch import compact_rows, fit_to_micro_batches, keep_rows, pair_batch
from rlattr.callbacks.trl.config import AttributionConfig, IIFGRPOConfig, IIFRLOOConfig, resolve_attribution
from rlattr.callbacks.trl.fused import (
    PendingBatch,
    TrlCapture,
    kept_factor,
    micro_batch_scores,
    pair_target,
    remove_rows,
    row_weights,
    scoring_plan,
    slow_path_refusal,
    slow_row_grads,
    slow_scores,
)
from rlattr.callbacks.trl.logs import AttributionLogger, run_info, top_bottom_rows
from rlattr.core.ghost import GhostTarget
from rlattr.errors import RlattrError

SUPPORTED_TRAINERS = ("trl.GRPOTrainer", "trl.RLOOTrainer")


def _check_trainer(trainer: Any) -> None:
    if not isinstance(trainer, (GRPOTrainer, RLOOTrainer)):
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
    temperature: float
    current_gradient_accumulation_steps: int

    def __init__(self, *args: Any, attribution: AttributionConfig | None = None, **kwargs: Any) -> None:
        # settings from attribution= or from args=IIFGRPOConfig(attr_...); checked before TRL's heavy init
        attribution = resolve_attribution(kwargs.get("args", args[2] if len(args) > 2 else None), attribution)
        super().__init__(*args, **kwargs)
        self.attribution = attribution
        _check_trainer(self)
        self._attr_plan = scoring_plan(self, attribution.drop)
        self._attr_capture = TrlCapture(self.accelerator.unwrap_model(self.model), self.temperature)
        self._attr_slow = self._slow_params()
        self._attr_direction: GhostTarget | None = None
        self._attr_pending: PendingBatch | None = None
        self._attr_round = 0
        self._attr_target_reward = float("nan")
        self.attribution_history: list[dict[str, Any]] = []
        self.attribution_logger = AttributionLogger(
            log_dir=attribution.log_dir, save=attribution.save, run_info=run_info(self, attribution.to_dict())
        )
        self.attribution_logger.bind(self)
        self.add_callback(self.attribution_logger)

    def _slow_params(self) -> dict[str, Tensor]:
        """Trainable parameters of layers without a handler: scored per row by autograd (warns once)."""
        uncovered = set(self._attr_capture.uncovered)
        if not uncovered:
            return {}
        modules = sorted({n.rpartition(".")[0] or "<model>" for n in uncovered})
        why = slow_path_refusal(self, self._attr_plan.loss_type)
        if why:
            raise RlattrError(
                f"model: trainable parameters in layers without a gradient-capture handler ({modules[:5]}) "
                f"need the per-row autograd path, which cannot score {why}; supported: nn.Linear, "
                "nn.Embedding, nn.LayerNorm, transformers Conv1D, peft LoRA, or a handler registered with "
                "rlattr.core.ghost.register_handler"
            )
        warnings.warn(
            f"attribution: no gradient-capture handler for modules {modules}; their parameters are scored "
            "by a slow path that costs one extra forward and backward per pair (register a handler with "
            "rlattr.core.ghost.register_handler to avoid it)",
            stacklevel=3,
        )
        model = self.accelerator.unwrap_model(self.model)
        return {n: p for n, p in model.named_parameters() if n in uncovered}

    def _slow_part(self, inputs: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Slow-path scores ``Tensor[B]`` of a micro-batch and its per-row gradients (by name).

        Each row's loss is TRL's own ``compute_loss`` on that row alone (TRL's metrics and the global
        RNG left as they were), weighted into the row's share of the micro-batch loss.
        """
        model = self.accelerator.unwrap_model(self.model)
        base = super().compute_loss  # type: ignore[misc]
        scaled = getattr(self, "loss_is_scaled_for_ga", False)
        ga = 1 if scaled else int(self.current_gradient_accumulation_steps)
        weights = row_weights(self._attr_plan.loss_type, inputs, ga)
        device = self.accelerator.device
        with (
            _metrics_restored(self),
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.enable_grad(),
        ):
            grads = slow_row_grads(
                lambda rows: base(model, keep_rows(inputs, rows)), weights, self._attr_slow
            )
        assert self._attr_direction is not None
        return slow_scores(grads, self._attr_direction), grads

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

    def _target_generation(self) -> dict[str, Any] | None:
        """TRL's own generation batch for the held-out prompts when f_seq is due for a refresh, else None.

        It goes through the trainer's ``_generate_and_score_completions`` (in train mode, so with TRL's
        sampling settings, its reward functions and its vLLM client when ``use_vllm=True``), on a RNG
        stream of its own, and leaves TRL's metrics and completion logs as they were.
        """
        if self._attr_direction is not None and self._attr_round % self.attribution.target_every != 0:
            return None
        with _metrics_restored(self) as found, self._own_rng():
            out = super()._generate_and_score_completions(self._target_rows())  # type: ignore[misc]
        self._attr_target_reward = found.get("target_reward", float("nan"))
        return out

    def _target_direction(self, target_out: dict[str, Any] | None) -> GhostTarget:
        """grad f_seq on the held-out generation batch, with the layer features of its ghost form."""
        if target_out is None:
            raise RuntimeError("attribution: no held-out generation to build f_seq from")
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()  # f_seq without dropout
        try:
            return pair_target(self, self._attr_capture, model, target_out)
        finally:
            model.train(was_training)

    def _refresh_target(self) -> float:
        """Refresh grad f_seq when due (every ``target_every`` generation batches); the seconds spent."""
        t0 = time.perf_counter()
        target_out = self._target_generation()
        if target_out is not None or self._attr_direction is None:
            self._attr_direction = self._target_direction(target_out)
        return time.perf_counter() - t0

    def _score_local(self, out: dict[str, Any]) -> Tensor:
        """Pair scores ``Tensor[n_local]`` from a pass through TRL's own loss before the update.

        The fallback where the training backward cannot give them (see :func:`scoring_plan`): the
        generation batch in ``steps_per_generation`` micro-batches, TRL's ``compute_loss`` on each,
        one captured backward whose parameter gradients are thrown away; TRL's metrics and the
        global RNG (dropout) are left as they were.
        """
        model = self.accelerator.unwrap_model(self.model)
        n, steps = out["advantages"].shape[0], self.args.steps_per_generation
        size = n // steps  # TRL's split_tensor_dict floors too; the remainder is never trained on
        scores = torch.zeros(n, dtype=torch.float64)
        params = [p for p in model.parameters() if p.requires_grad]
        device = self.accelerator.device
        direction = self._attr_direction
        assert direction is not None
        with (
            _metrics_restored(self),
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        ):
            for start in range(0, size * steps, size):
                rows = torch.zeros(n, dtype=torch.bool)
                rows[start : start + size] = True
                with self._attr_capture.recording(rows=size) as records:
                    loss = super().compute_loss(model, keep_rows(out, rows))  # type: ignore[misc]
                if not getattr(self, "loss_is_scaled_for_ga", False):  # RLOO: the HF Trainer divides
                    loss = loss / self.current_gradient_accumulation_steps
                torch.autograd.grad(loss, params, allow_unused=True)
                part = micro_batch_scores(self._attr_capture, records, direction)
                if self._attr_slow:
                    part = part + self._slow_part(keep_rows(out, rows))[0].to(part)
                scores[start : start + size] = part.cpu().double()
        return (scores / self.accelerator.num_processes).float()

    def _attribute_generation_batch(self, out: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        pair_batch(out)  # input checks: one advantage per completion, no multimodal batch
        t_target = self._refresh_target()
        if self._attr_plan.fused:  # scored inside TRL's own training steps (compute_loss / training_step)
            out["attr_row"] = torch.arange(out["advantages"].shape[0], device=out["advantages"].device)
            self._attr_pending = PendingBatch(
                out,
                steps=self.args.steps_per_generation,
                keep_records=self.attribution.drop,
                seconds=time.perf_counter() - t0,
                seconds_target=t_target,
            )
            return out
        scores, keep, notes = self._decide(self._score_local(out))
        n_local, rank = out["advantages"].shape[0], self.accelerator.process_index
        self._record(out, scores, keep, notes, time.perf_counter() - t0, t_target)
        if not bool(keep.all()):
            counts = [
                int(keep[r * n_local : (r + 1) * n_local].sum())
                for r in range(self.accelerator.num_processes)
            ]
            out = compact_rows(out, keep[rank * n_local : (rank + 1) * n_local], max(counts))
            if "num_items_in_batch" in out:
                loss_mask = pair_batch(out)["loss_mask"]
                out["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        return out

    def compute_loss(
        self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """TRL's own loss; on a micro-batch of a generation batch being scored, with its layers captured."""
        pending = self._attr_pending
        rows = inputs.get("attr_row") if isinstance(inputs, dict) else None
        if pending is None or rows is None or not self.model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        with self._attr_capture.recording(rows=int(rows.numel())) as records:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        pending.current = (rows, records)
        pending.current_inputs = inputs if self._attr_slow else None
        return loss

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Tensor:
        """TRL's step; then the pairs of its micro-batch are scored from the captured backward."""
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        pending = self._attr_pending
        if pending is not None and pending.current is not None:
            self._score_micro_batch(pending)
        return loss

    def _score_micro_batch(self, pending: PendingBatch) -> None:
        t0 = time.perf_counter()
        assert pending.current is not None and self._attr_direction is not None
        rows, records = pending.current
        pending.current = None
        part = micro_batch_scores(self._attr_capture, records, self._attr_direction).cpu().double()
        if self._attr_slow and pending.current_inputs is not None:
            extra, grads = self._slow_part(pending.current_inputs)
            part = part + extra
            if pending.keep_records:
                self._keep_slow_grads(pending, rows, grads)
        pending.current_inputs = None
        pending.scores[rows.cpu()] = part / self.accelerator.num_processes
        if pending.keep_records:
            pending.micro.append((rows, records))
        pending.done += 1
        pending.seconds += time.perf_counter() - t0
        if pending.done == pending.steps:  # the last micro-batch: before the optimizer step
            self._attr_pending = None
            self._finish_fused(pending)

    @staticmethod
    def _keep_slow_grads(pending: PendingBatch, rows: Tensor, grads: dict[str, Tensor]) -> None:
        n = pending.scores.numel()
        for k, g in grads.items():
            if k not in pending.slow:
                pending.slow[k] = g.new_zeros((n, *g.shape[1:]))
            pending.slow[k][rows.to(g.device)] = g

    def _finish_fused(self, pending: PendingBatch) -> None:
        """Decide on the scored generation batch; IIF: take the dropped pairs out of the gradients."""
        t0 = time.perf_counter()
        scores, keep, notes = self._decide(pending.scores.float())
        n_local, rank = pending.scores.numel(), self.accelerator.process_index
        mine = keep[rank * n_local : (rank + 1) * n_local]
        if not bool(mine.all()):
            factor = kept_factor(self._attr_plan.loss_type, pending.out, mine)
            model = self.accelerator.unwrap_model(self.model)
            remove_rows(self._attr_capture, model, pending.micro, ~mine, factor, pending.slow)
        pending.micro.clear()
        pending.slow.clear()
        seconds = pending.seconds + time.perf_counter() - t0
        self._record(pending.out, scores, keep, notes, seconds, pending.seconds_target)

    def _decide(self, local: Tensor) -> tuple[Tensor, Tensor, list[str]]:
        """Gathered scores ``Tensor[n]``, the kept mask ``Tensor[n]`` and notes, the same on every process."""
        n_local = local.numel()
        scores = self.accelerator.gather(local.to(self.accelerator.device)).cpu()
        result = self.attribution.selection(scores) if self.attribution.drop else None
        keep = result.keep.clone() if result is not None else torch.ones(scores.numel(), dtype=torch.bool)
        notes = [result.note] if result is not None and result.note else []
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
        return scores, keep, notes

    def _record(
        self,
        out: dict[str, Any],
        scores: Tensor,
        keep: Tensor,
        notes: list[str],
        seconds: float,
        t_target: float,
    ) -> None:
        n_local, rank = out["advantages"].shape[0], self.accelerator.process_index
        mine = slice(rank * n_local, (rank + 1) * n_local)
        rows = top_bottom_rows(self, out, scores, mine, self.attribution.log_text_k)
        advantages = self.accelerator.gather(out["advantages"].float()).cpu()
        record = {
            "round": self._attr_round,
            "global_step": self.state.global_step,
            "scores": scores,
            "keep": keep,
            "advantages": advantages,
            "group_size": self.num_generations,
            "target_reward": self._attr_target_reward,
            "seconds": seconds,
            "seconds_target": t_target,
            "note": "; ".join(notes),
            "text": rows,
        }
        self.attribution_history.append(record)
        self.attribution_logger.record(record)
        self._attr_round += 1


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
    "IIFGRPOConfig",
    "IIFGRPOTrainer",
    "IIFRLOOConfig",
    "IIFRLOOTrainer",
    "fit_to_micro_batches",
    "compact_rows",
    "keep_rows",
    "pair_batch",
    "with_attribution",
]
