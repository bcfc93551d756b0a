"""Pair scores from TRL's own loss backward: layer captures for transformers models and TRL's fused LM head.

:mod:`rlattr.core.ghost` records the input ``a`` and output gradient ``d`` of every layer that owns
a trainable parameter. This module teaches it what only the TRL side knows:

* transformers' ``Conv1D`` (GPT-2; ``y = x W + b`` with ``W: [in, out]``);
* TRL's fused LM head (``add_fused_lm_head``): the forward TRL's loss uses never calls the
  ``lm_head`` module; it projects the backbone's last hidden states inside one autograd function
  and returns per-token log-probs (and entropies). The head's output gradient is rebuilt from the
  gradients of those outputs: with ``p = softmax(z / T)``, ``z = W h (+ b)``,
  ``dz = (g_logp (e_y - p) - g_H p (log p + H)) / T``;
* peft's LoRA adapters need nothing: ``lora_A`` and ``lora_B`` are ``nn.Linear`` modules.

Then :func:`pair_target` turns the held-out f_seq backward into a
:class:`~rlattr.core.ghost.GhostTarget`, :func:`micro_batch_scores` scores the pairs of one
captured training backward, and :func:`remove_rows` takes dropped pairs out of accumulated
gradients (IIF by gradient surgery). Trainable parameters of layers with no handler (say an
RMSNorm, or any custom layer) go on a slow path instead (:func:`slow_row_grads`): one backward of
TRL's own loss per pair, restricted to those parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rlattr.core.ghost import (
    GhostCapture,
    GhostTarget,
    LayerRecord,
    LinearHandler,
    build_target,
    record_dots,
    register_handler,
    rows_grad_sum,
)
from rlattr.errors import RlattrError

try:  # transformers >= 4.x keeps Conv1D here
    from transformers.pytorch_utils import Conv1D

    register_handler(Conv1D, LinearHandler(transposed=True))
except ImportError:  # pragma: no cover - transformers is a dependency of trl
    pass


class FusedHeadHandler(LinearHandler):
    """TRL's fused LM head: ``a`` = the hidden states ``Tensor[B, T, E]``, ``d`` rebuilt from the log-prob grads."""

    def __init__(self, temperature: float) -> None:
        super().__init__(transposed=False)
        self.temperature = float(temperature)

    def features(self, rec: LayerRecord) -> tuple[Tensor, Tensor]:
        h = rec.a.float()
        weight: Tensor = rec.module.weight  # type: ignore[assignment]
        bias: Tensor | None = getattr(rec.module, "bias", None)
        with torch.no_grad():
            z = h @ weight.detach().float().T
            if bias is not None:
                z = z + bias.detach().float()
            logp = torch.log_softmax(z / self.temperature, dim=-1)
            p = logp.exp()
            g_logp = rec.d.float()
            dz = -p * g_logp.unsqueeze(-1)
            dz.scatter_add_(-1, rec.extra["labels"].unsqueeze(-1), g_logp.unsqueeze(-1))
            g_ent = rec.extra.get("entropy_grad")
            if g_ent is not None:
                ent = -(p * logp).sum(-1, keepdim=True)
                dz = dz - g_ent.float().unsqueeze(-1) * p * (logp + ent)
        return h, dz / self.temperature


def _patched_model(model: nn.Module) -> nn.Module | None:
    """The module whose ``forward`` TRL replaced by its fused-head forward (an instance attribute)."""
    for module in model.modules():
        if "forward" in vars(module) and hasattr(module, "get_output_embeddings"):
            return module
    return None


class TrlCapture(GhostCapture):
    """A :class:`~rlattr.core.ghost.GhostCapture` that also captures TRL's fused LM head."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        top = _patched_model(model)
        head: nn.Module | None = top.get_output_embeddings() if top is not None else None  # type: ignore[operator]
        names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.head_name = names.get(id(head)) if head is not None else None
        super().__init__(model)
        self.top, self.head = top, head
        self.head_handler = FusedHeadHandler(temperature)
        tracked_head = self.head_name is not None and bool(self.param_names.get(self.head_name))
        if tracked_head and top is not None:
            config = getattr(top, "config", None)
            text = (
                config.get_text_config()
                if config is not None and hasattr(config, "get_text_config")
                else config
            )
            for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier"):
                if getattr(text, attr, None) not in (None, 1.0):
                    raise RlattrError(
                        f"model: {attr}={getattr(text, attr)!r} in TRL's fused LM head is not covered by the "
                        "fused scores; supported: heads without logit scaling or soft-capping"
                    )
        self._fused_head = tracked_head and top is not None

    @contextmanager
    def recording(self, rows: int | None = None) -> Iterator[list[LayerRecord]]:
        with super().recording(rows) as sink:
            handles = self._head_hooks() if self._fused_head else []
            try:
                yield sink
            finally:
                for h in handles:
                    h.remove()

    def _head_hooks(self) -> list[Any]:
        assert self.top is not None and self.head is not None and self.head_name is not None
        head = self.head
        state: dict[str, Any] = {}
        backbone = getattr(self.top, "base_model", None)

        def keep_hidden(mod: nn.Module, args: Any, output: Any) -> None:
            state["hidden"] = getattr(output, "last_hidden_state", None)

        def after(mod: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            hidden, state["hidden"] = state.get("hidden"), None
            logp = getattr(output, "log_probs", None)
            if not kwargs.get("fused_lm_head") or hidden is None or logp is None or not logp.requires_grad:
                return
            if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
                return
            shift = kwargs.get("shift_labels")
            labels = shift if shift is not None else kwargs["labels"][:, 1:]
            h = hidden if shift is not None else hidden[:, :-1]
            rec = LayerRecord(self.head_name or "", head, self.head_handler, h.detach())
            rec.extra["labels"] = labels.clamp(min=0).to(h.device)
            entropy = getattr(output, "entropy", None)
            if isinstance(entropy, Tensor) and entropy.requires_grad:
                entropy.register_hook(lambda g: rec.extra.__setitem__("entropy_grad", g.detach()))
            self.add_record(rec, logp)

        handles = [self.top.register_forward_hook(after, with_kwargs=True)]
        if isinstance(backbone, nn.Module):
            handles.append(backbone.register_forward_hook(keep_hidden))
        return handles


def pair_target(
    trainer: Any, capture: TrlCapture, model: nn.Module, target_out: dict[str, Any], *, form: str = "auto"
) -> GhostTarget:
    """grad f_seq, ``f_seq = mean_j A_j * sum_t log pi(y_jt | x_j, y_j<t)``, with TRL's own log-probs.

    One captured forward and backward over the held-out pairs of ``target_out`` (TRL's generation
    batch for them); the gradient is averaged over processes (then the dense form is used).
    """
    ids = torch.cat([target_out["prompt_ids"], target_out["completion_ids"]], dim=1)
    attention = torch.cat([target_out["prompt_mask"], target_out["completion_mask"]], dim=1)
    mask = target_out["completion_mask"]
    if "tool_mask" in target_out:
        mask = mask * target_out["tool_mask"]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.enable_grad(), capture.recording(rows=ids.shape[0]) as records:
        n_comp = target_out["completion_ids"].shape[1]
        logps = trainer._get_per_token_logps_and_entropies(model, ids, attention, n_comp)[0]
        value = ((logps * mask).sum(1) * target_out["advantages"].float()).mean()
        grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    direction = {
        n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads, strict=True)
    }
    procs = trainer.accelerator.num_processes
    if procs > 1:
        names = list(direction)
        flat = trainer.accelerator.reduce(
            torch.cat([direction[k].reshape(-1) for k in names]), reduction="mean"
        )
        parts = torch.split(flat, [direction[k].numel() for k in names])
        direction = {k: v.view_as(direction[k]) for k, v in zip(names, parts, strict=True)}
        form = "dense"  # the ghost factors are this process's alone
    return build_target(capture, records, direction, form=form)


ROW_MEAN_LOSSES = ("grpo", "sapo", "dr_grpo", "luspo", "rloo")  # normalised by the number of pairs
TOKEN_LOSSES = ("bnpo", "dapo", "cispo", "vespo")  # normalised by the number of loss tokens


@dataclass(frozen=True)
class ScoringPlan:
    """Where the scores come from: the training backward itself (``fused``), or a pass before the update.

    ``reason`` says why the fused path is not taken (empty when it is).
    """

    loss_type: str
    fused: bool
    reason: str


def scoring_plan(trainer: Any, drop: bool) -> ScoringPlan:
    """Choose the scoring path for ``trainer``'s settings; refuse what neither path can do.

    Fused scores need one optimizer step per generation batch (``steps_per_generation ==
    gradient_accumulation_steps``, ``num_iterations == 1``). Gradient surgery (IIF) also needs one
    process, a normaliser that one factor rescales (no bnpo over several micro-batches, no entropy
    bonus or MoE aux loss with normalisers of their own) and row losses that do not depend on the
    other rows (no entropy mask: its quantile is over the batch). Elsewhere the scores come from a
    pass through TRL's own loss before the update and dropped pairs are removed from the batch.
    """
    state = trainer.accelerator.state
    if getattr(state, "fsdp_plugin", None) is not None:
        raise RlattrError(
            "args: FSDP shards the parameters the pair scores read; supported: one device, DDP, "
            "DeepSpeed ZeRO-1/2"
        )
    deepspeed = getattr(state, "deepspeed_plugin", None)
    if deepspeed is not None and getattr(deepspeed, "zero_stage", 0) == 3:
        raise RlattrError(
            "args: DeepSpeed ZeRO-3 partitions the parameters the pair scores read; supported: ZeRO-1/2"
        )
    loss_type = getattr(trainer, "loss_type", None) or "rloo"
    args = trainer.args
    why = []
    if args.steps_per_generation != args.gradient_accumulation_steps:
        why.append("steps_per_generation != gradient_accumulation_steps")
    if getattr(trainer, "num_iterations", 1) != 1:
        why.append("num_iterations > 1")
    if drop:
        checks = {
            "several processes": trainer.accelerator.num_processes > 1,
            "DeepSpeed": deepspeed is not None,
            "bnpo over several micro-batches": loss_type == "bnpo" and args.steps_per_generation > 1,
            "an entropy mask": getattr(trainer, "top_entropy_quantile", 1.0) < 1.0,
            "an entropy bonus": bool(getattr(trainer, "_entropy_bonus_enabled", False)),
            "an MoE aux loss": bool(getattr(trainer, "aux_loss_enabled", False)),
        }
        why += [k for k, v in checks.items() if v]
    return ScoringPlan(loss_type, not why, "; ".join(why))


def kept_factor(loss_type: str, out: dict[str, Any], keep: Tensor) -> float:
    """The loss normaliser of all pairs of ``out`` over that of its kept pairs (``keep``: ``Tensor[n]`` bool)."""
    if loss_type in ROW_MEAN_LOSSES:
        return keep.numel() / max(int(keep.sum()), 1)
    mask = out["completion_mask"] * out["tool_mask"] if "tool_mask" in out else out["completion_mask"]
    total = out.get("num_items_in_batch", mask.sum())
    return float(torch.as_tensor(total).clamp(min=1.0)) / float(
        mask[keep.to(mask.device)].sum().clamp(min=1.0)
    )


def micro_batch_scores(capture: GhostCapture, records: list[LayerRecord], target: GhostTarget) -> Tensor:
    """``Tensor[B]``: ``-<grad f_seq, grad L_i>`` for the B pairs of one captured backward (positive helps)."""
    if isinstance(capture, TrlCapture) and capture.head_name and capture.param_names.get(capture.head_name):
        if not any(r.name == capture.head_name and r.d is not None for r in records):
            raise RlattrError(
                f"model: the LM head {capture.head_name!r} is trainable but none of its calls was captured "
                "(e.g. a wrapper that calls the patched forward directly); supported: a frozen head under "
                "such wrappers, or a model called through its module"
            )
    return -record_dots(capture, records, target) + 0.0


@dataclass
class PendingBatch:
    """A generation batch being scored micro-batch by micro-batch inside TRL's training steps."""

    out: dict[str, Any]
    steps: int
    keep_records: bool
    seconds: float
    seconds_target: float
    scores: Tensor = field(init=False)
    micro: list[tuple[Tensor, list[LayerRecord]]] = field(default_factory=list)
    current: tuple[Tensor, list[LayerRecord]] | None = None
    current_inputs: dict[str, Any] | None = None  # the micro-batch, kept for the slow path
    slow: dict[str, Tensor] = field(default_factory=dict)  # slow-path grads, Tensor[n_local, *shape]
    done: int = 0

    def __post_init__(self) -> None:
        self.scores = torch.zeros(self.out["advantages"].shape[0], dtype=torch.float64)


def remove_rows(
    capture: GhostCapture,
    model: nn.Module,
    micro: list[tuple[Tensor, list[LayerRecord]]],
    drop: Tensor,
    factor: float,
    slow: dict[str, Tensor] | None = None,
) -> None:
    """``grad <- (grad - sum of the dropped pairs' contributions) * factor`` on every tracked parameter.

    ``micro``: the captured backwards of the accumulation window with their pair indices; ``drop``:
    ``Tensor[n_local]`` bool; ``factor``: the loss normaliser of all pairs over that of the kept ones;
    ``slow``: the slow-path parameters' per-pair contributions, ``Tensor[n_local, *shape]`` by name.
    """
    removed: dict[str, Tensor] = {name: g[drop.to(g.device)].sum(0) for name, g in (slow or {}).items()}
    for rows, records in micro:
        sel = drop[rows.cpu()]
        if bool(sel.any()):
            for name, g in rows_grad_sum(capture, records, sel).items():
                removed[name] = removed[name] + g if name in removed else g
    for name, param in model.named_parameters():
        if not param.requires_grad or param.grad is None:
            continue
        if name in removed:
            param.grad.sub_(removed[name].to(param.grad.dtype))
        param.grad.mul_(factor)


def slow_path_refusal(trainer: Any, loss_type: str) -> str:
    """Why the per-row slow path cannot score ``trainer``'s settings (empty when it can).

    It needs each pair's loss to be TRL's loss on that pair alone up to a known weight
    (:func:`row_weights`), and loss calls without side effects beyond TRL's metrics.
    """
    why = []
    if loss_type not in (*ROW_MEAN_LOSSES, *TOKEN_LOSSES):
        why.append(f"loss_type {loss_type!r} (its per-pair weight is not known)")
    if getattr(trainer, "top_entropy_quantile", 1.0) < 1.0:
        why.append("an entropy mask (its quantile is over the whole batch)")
    if getattr(trainer, "_entropy_bonus_enabled", False):
        why.append("an entropy bonus (its normaliser and adaptive coefficient change with every loss call)")
    if getattr(trainer, "aux_loss_enabled", False):
        why.append("an MoE aux loss (over the whole batch)")
    if getattr(trainer.args, "use_liger_kernel", False):
        why.append("use_liger_kernel")
    return "; ".join(why)


def row_weights(loss_type: str, inputs: dict[str, Any], ga_divisor: int) -> Tensor:
    """``Tensor[B]``: w_i with (micro-batch loss) = sum_i w_i * (TRL's loss on row i alone).

    Row-mean losses: ``1 / (B * ga_divisor)`` (``ga_divisor``: what the HF Trainer divides the loss
    by, 1 where TRL scales for gradient accumulation itself); token losses normalised by
    ``num_items_in_batch`` keep their normaliser alone: 1; bnpo: the row's share of the loss tokens.
    """
    mask = inputs["completion_mask"].float()
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"].float()
    b = mask.shape[0]
    if loss_type == "bnpo":  # normalised by the micro-batch's own loss tokens
        return (mask.sum(1) / mask.sum().clamp(min=1.0)).double().cpu()
    if loss_type in TOKEN_LOSSES:
        return torch.ones(b, dtype=torch.float64)
    return torch.full((b,), 1.0 / (b * ga_divisor), dtype=torch.float64)


def slow_row_grads(
    row_loss: Callable[[Tensor], Tensor], weights: Tensor, params: dict[str, Tensor]
) -> dict[str, Tensor]:
    """``{name: Tensor[B, *shape]}``: ``w_i * grad_p L_i`` for the B rows, one backward per row.

    ``row_loss(rows)``: TRL's loss on the rows where ``rows`` (``Tensor[B]`` bool) holds; ``weights``:
    ``Tensor[B]`` (:func:`row_weights`); ``params``: the parameters (by name) to differentiate.
    """
    b = weights.numel()
    out = {k: torch.zeros((b, *p.shape), dtype=torch.float64, device=p.device) for k, p in params.items()}
    for i in range(b):
        loss = row_loss(torch.arange(b) == i)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for k, g in zip(params, grads, strict=True):
            if g is not None:
                out[k][i] = g.double() * float(weights[i])
    return out


def slow_scores(grads: dict[str, Tensor], target: GhostTarget) -> Tensor:
    """``Tensor[B]``: ``-<grad f_seq, w_i grad L_i>`` restricted to the slow-path parameters of ``grads``."""
    total: Tensor | None = None
    for k, g in grads.items():
        part = g.reshape(g.shape[0], -1) @ target.direction[k].reshape(-1).to(g)
        total = part if total is None else total + part
    return -total.cpu() if total is not None else torch.zeros(0, dtype=torch.float64)


__all__ = [
    "FusedHeadHandler",
    "PendingBatch",
    "ScoringPlan",
    "TrlCapture",
    "kept_factor",
    "micro_batch_scores",
    "pair_target",
    "remove_rows",
    "row_weights",
    "scoring_plan",
    "slow_path_refusal",
    "slow_row_grads",
    "slow_scores",
]
