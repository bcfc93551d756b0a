"""The RLHF unit of attribution: one prompt-completion pair, under a GRPO / RLOO training loss.

An offline reference: the TRL trainers no longer use it (they score pairs from TRL's own loss
backward, :mod:`rlattr.callbacks.trl.fused`); it serves attribution of saved batches outside TRL.
Framework-free (torch only). A :class:`SequenceLossConfig` mirrors the per-token loss of TRL's
``GRPOTrainer._compute_loss`` (``loss_type`` grpo, bnpo, dr_grpo, dapo, cispo, luspo) and the
per-sequence loss of ``RLOOTrainer._compute_loss`` (``"rloo"``); :func:`pair_scales` reproduces each
loss type's normaliser as one weight per pair, so that the per-pair losses of a generation batch sum
to the loss the trainer back-propagates for it. :func:`sequence_task` wraps both, plus the sequence
target of REFERENCE.md section 1,

    f_seq(theta) = mean over held-out pairs (x, y) of log pi_theta(y | x) * A(x, y),

into a core :class:`~rlattr.core.task.Task`; :func:`pair_scores` scores every pair by
``<grad f_seq, -grad L_i>`` (positive = the pair helps f_seq).

Batches are dicts of tensors sharing the leading pair dimension n:

* ``input_ids``, ``attention_mask``: ``Tensor[n, P + C]``, prompt (left-padded) then completion;
* ``loss_mask``: ``Tensor[n, C]``, 1 on the completion tokens the loss counts;
* ``advantages``: ``Tensor[n]``;
* training batches also carry ``scale`` (``Tensor[n]``, from :func:`pair_scales`) and optionally
  ``old_logps`` (``Tensor[n, C]``; ``Tensor[n]`` for rloo) and ``ref_logps`` (``Tensor[n, C]``).
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from rlattr.core.grads import directional_scores, group_dots, per_record_grads, target_grads
from rlattr.core.task import GroupSpec, Params, ParamSelector, Task
from rlattr.errors import RlattrError

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo")
LOSS_TYPES = (*GRPO_LOSS_TYPES, "rloo")
IS_LEVELS = ("token", "sequence")
SCORE_METHODS = ("auto", "jvp", "loop")


@dataclass(frozen=True)
class SequenceLossConfig:
    """The trainer's loss, as far as one pair's gradient depends on it.

    Args:
        loss_type: one of :data:`LOSS_TYPES` (TRL's GRPO ``loss_type`` values, or ``"rloo"``).
        epsilon_low: lower clipping range (``1 - epsilon_low``).
        epsilon_high: upper clipping range (``1 + epsilon_high``; cispo's cap).
        delta: optional upper bound on the unclipped ratio (two-sided clipping), GRPO only.
        beta: coefficient of GRPO's per-token KL term against ``ref_logps``.
        bias_correction_kl: multiply the KL term by the importance ratio (GRPO's option).
        importance_sampling_level: ``"token"`` or ``"sequence"`` ratios (GRPO).
        temperature: the logits are divided by it before the log-softmax, as in generation.
    """

    loss_type: str
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    beta: float = 0.0
    bias_correction_kl: bool = False
    importance_sampling_level: str = "token"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise RlattrError(f"loss_type: got {self.loss_type!r}; supported: {LOSS_TYPES}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise RlattrError(
                f"importance_sampling_level: got {self.importance_sampling_level!r}; supported: {IS_LEVELS}"
            )
        for name in ("epsilon_low", "epsilon_high", "beta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise RlattrError(f"{name}: must be a finite number >= 0, got {value!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise RlattrError(f"temperature: must be > 0, got {self.temperature!r}")
        if self.loss_type == "rloo" and (self.beta != 0 or self.importance_sampling_level != "token"):
            raise RlattrError(
                "loss_type='rloo': RLOO puts the KL into the reward and uses sequence ratios; "
                f"beta must be 0 and importance_sampling_level 'token', got {self.beta}, "
                f"{self.importance_sampling_level!r}"
            )


def pair_scales(
    loss_type: str,
    loss_mask: Tensor,
    *,
    micro_batch_size: int,
    grad_accum_steps: int = 1,
    steps_per_generation: int = 1,
    num_processes: int = 1,
    max_completion_length: int | None = None,
    num_items_in_batch: float | Tensor | None = None,
) -> Tensor:
    """One weight per pair: ``L_i = scale_i * sum_t loss_it * mask_it`` (rloo: ``scale_i * loss_i``).

    The weights turn each loss type's normaliser into a per-pair factor, including the division
    by gradient accumulation and the averaging of gradients over ``num_processes`` (DDP). ``bnpo``
    normalises by the tokens of a micro-batch, which TRL forms after shuffling; its weight uses
    the local generation batch's tokens divided by ``steps_per_generation`` (exact when that is 1).

    Args:
        loss_mask: ``Tensor[n, C]``, the local generation batch's loss mask.
        num_items_in_batch: dapo / cispo: the loss tokens of the generation batch over all processes.

    Returns: ``scale``: ``Tensor[n]`` (float32).
    """
    if loss_type not in LOSS_TYPES:
        raise RlattrError(f"loss_type: got {loss_type!r}; supported: {LOSS_TYPES}")
    for name, value in (
        ("micro_batch_size", micro_batch_size),
        ("grad_accum_steps", grad_accum_steps),
        ("steps_per_generation", steps_per_generation),
        ("num_processes", num_processes),
    ):
        if not isinstance(value, int) or value < 1:
            raise RlattrError(f"{name}: must be an int >= 1, got {value!r}")
    mask = loss_mask.float()
    n = mask.shape[0]
    ga, procs = float(grad_accum_steps), float(num_processes)
    ones = torch.ones(n, device=mask.device)
    if loss_type == "grpo":
        return 1.0 / (mask.sum(1).clamp(min=1.0) * micro_batch_size * ga * procs)
    if loss_type == "bnpo":
        per_micro = (mask.sum() / steps_per_generation).clamp(min=1.0)
        return ones / (per_micro * ga * procs)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise RlattrError("max_completion_length: dr_grpo normalises by it; got None")
        return ones / (micro_batch_size * max_completion_length * ga * procs)
    if loss_type in ("dapo", "cispo"):
        if num_items_in_batch is None:
            raise RlattrError(f"num_items_in_batch: {loss_type} normalises by it; got None")
        items = torch.as_tensor(num_items_in_batch, dtype=torch.float32).clamp(min=1.0).item()
        return ones * (steps_per_generation / (items * ga))
    return ones / (micro_batch_size * ga * procs)  # luspo, rloo: a mean over the micro-batch's rows


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def completion_logprobs(
    model: nn.Module,
    params: Params,
    batch: dict[str, Tensor],
    temperature: float,
    *,
    trim: bool | None = None,
) -> Tensor:
    """``log pi(y_t | x, y_<t)`` of every completion token: ``Tensor[n, C]`` (float32).

    Calls ``model(input_ids=..., attention_mask=...)`` with the tracked ``params`` swapped in; the
    output is the logits ``Tensor[n, P + C, V]`` or an object with a ``logits`` attribute. ``trim``
    passes ``logits_to_keep`` (transformers models) so only the completion's logits are formed;
    ``None`` asks the model's signature.
    """
    ids, n_comp = batch["input_ids"], batch["loss_mask"].shape[1]
    kwargs: dict[str, Tensor | int] = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
    if _accepts(model, "logits_to_keep") if trim is None else trim:
        kwargs["logits_to_keep"] = n_comp + 1
    out = functional_call(model, params, (), kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    logits = logits[:, -(n_comp + 1) : -1, :].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, -n_comp:, None]).squeeze(-1)


def _grpo_token_loss(cfg: SequenceLossConfig, logp: Tensor, batch: dict[str, Tensor], mask: Tensor) -> Tensor:
    """GRPO's per-token loss ``Tensor[n, C]`` (or ``Tensor[n, 1]`` at sequence level, broadcast later)."""
    old = batch.get("old_logps")
    old = logp.detach() if old is None else old
    adv = batch["advantages"].unsqueeze(1)
    log_ratio = logp - old
    if cfg.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    if cfg.loss_type == "cispo":
        loss = -torch.clamp(coef_1, max=cfg.epsilon_high).detach() * adv * logp
    else:
        coef_2 = torch.clamp(coef_1, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
        if cfg.delta is not None:
            coef_1 = torch.clamp(coef_1, max=cfg.delta)
        loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if cfg.beta != 0.0:
        ref = batch["ref_logps"]
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        loss = loss + cfg.beta * (kl * coef_1 if cfg.bias_correction_kl else kl)
    return loss


def pair_loss_fn(model: nn.Module, cfg: SequenceLossConfig):
    """The per-pair training loss ``(params, batch) -> Tensor[n]``, ``L_i = scale_i * (...)``."""

    trim = _accepts(model, "logits_to_keep")

    def loss(params: Params, batch: dict[str, Tensor]) -> Tensor:
        mask = batch["loss_mask"].float()
        logp = completion_logprobs(model, params, batch, cfg.temperature, trim=trim)
        if cfg.loss_type == "rloo":
            seq_logp = (logp * mask).sum(1)
            old = batch.get("old_logps")
            old = seq_logp.detach() if old is None else old
            adv = batch["advantages"]
            coef_1 = torch.exp(seq_logp - old)
            coef_2 = torch.clamp(coef_1, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
            return batch["scale"] * -torch.min(coef_1 * adv, coef_2 * adv)
        per_token = _grpo_token_loss(cfg, logp, batch, mask)
        return batch["scale"] * (per_token * mask).sum(-1)

    return loss


def sequence_target_fn(model: nn.Module, temperature: float = 1.0):
    """``f_seq(params, batch) = mean_i A_i * log pi(y_i | x_i)``: ``Tensor[]`` (a quantity to raise)."""

    trim = _accepts(model, "logits_to_keep")

    def target(params: Params, batch: dict[str, Tensor]) -> Tensor:
        logp = completion_logprobs(model, params, batch, temperature, trim=trim)
        seq_logp = (logp * batch["loss_mask"].float()).sum(1)
        return (seq_logp * batch["advantages"].float()).mean()

    return target


def sequence_task(
    model: nn.Module, cfg: SequenceLossConfig, *, params: ParamSelector = None, groups: GroupSpec = "module"
) -> Task:
    """A Task whose records are prompt-completion pairs and whose target is f_seq (to raise).

    ``params=None`` tracks every parameter with ``requires_grad`` (the LoRA adapters under peft).
    """
    if not isinstance(cfg, SequenceLossConfig):
        raise TypeError(f"cfg: expected a SequenceLossConfig, got {type(cfg).__name__}")
    return Task(
        model=model,
        loss=pair_loss_fn(model, cfg),
        target=sequence_target_fn(model, cfg.temperature),
        target_goal="raise",
        params=params,
        groups=groups,
    )


def target_direction(task: Task, target_batch: dict[str, Tensor]) -> Params:
    """``grad f_seq`` on the tracked parameters: ``dict[name, Tensor[*shape]]``.

    Uses :func:`rlattr.core.grads.target_grads` (torch.func); a model that torch.func transforms
    refuse gets the same gradient from one plain autograd backward pass.
    """
    try:
        return {name: g[0] for name, g in target_grads(task, target_batch).items()}
    except (RuntimeError, NotImplementedError):
        leaves = {k: v.clone().requires_grad_(True) for k, v in task.tracked_params().items()}
        value = task.require_target()(leaves, target_batch)
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        return {
            k: torch.zeros_like(v) if g is None else g
            for (k, v), g in zip(leaves.items(), grads, strict=True)
        }


def _loop_scores(task: Task, batch: dict[str, Tensor], direction: Params) -> Tensor:
    grads = per_record_grads(task, batch, method="loop", chunk_size=16)
    return group_dots(task, grads, direction).sum(1)


def pair_scores(task: Task, batch: dict[str, Tensor], direction: Params, *, method: str = "auto") -> Tensor:
    """Score of every pair, ``sign * <direction, grad L_i>``: ``Tensor[n]``; positive = helps the target.

    ``direction`` is the target's gradient (:func:`target_direction`, all-reduced over processes
    when there are several). ``method="jvp"`` uses one forward-mode pass; ``"loop"`` one backward
    pass per pair; ``"auto"`` tries the JVP, then the JVP with PyTorch's math attention kernel, and
    warns before falling back to the loop.
    """
    if method not in SCORE_METHODS:
        raise RlattrError(f"method: got {method!r}; supported: {SCORE_METHODS}")
    sign = task.target_sign()  # (+ 0.0 below turns -0.0 into 0.0: a zero score is not negative)
    if method == "loop":
        return sign * _loop_scores(task, batch, direction) + 0.0
    try:
        return sign * directional_scores(task, batch, direction) + 0.0
    except (RuntimeError, NotImplementedError) as err:
        if method == "jvp":
            raise
        first = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return sign * directional_scores(task, batch, direction) + 0.0
    except (RuntimeError, NotImplementedError, ImportError):
        pass
    warnings.warn(
        f"pair_scores: forward-mode JVP cannot run this model ({first}); falling back to one "
        "backward pass per pair (exact, slower). Loading the model with attn_implementation='eager' "
        "usually restores the fast path.",
        RuntimeWarning,
        stacklevel=2,
    )
    return sign * _loop_scores(task, batch, direction) + 0.0


__all__ = [
    "GRPO_LOSS_TYPES",
    "LOSS_TYPES",
    "SequenceLossConfig",
    "completion_logprobs",
    "pair_loss_fn",
    "pair_scales",
    "pair_scores",
    "sequence_target_fn",
    "sequence_task",
    "target_direction",
]
