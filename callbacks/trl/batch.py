"""TRL's generation-batch dicts, row by row: convert to pair batches, drop rows, keep ranks equal.

Pure functions on the dict that ``GRPOTrainer`` / ``RLOOTrainer._generate_and_score_completions``
returns (``prompt_ids``, ``prompt_mask``, ``completion_ids``, ``completion_mask``, ``advantages``,
optional per-token tensors and ``num_items_in_batch``); used by :mod:`rlattr.callbacks.trl.trainer`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlattr.errors import RlattrError


def pair_batch(out: dict[str, Any], beta: float = 0.0) -> dict[str, Tensor]:
    """TRL's generation-batch dict -> the pair batch of :mod:`rlattr.rl.sequence` (scale not included)."""
    if any(k in out for k in ("pixel_values", "image_grid_thw", "num_images")):
        raise RlattrError("inputs: multimodal batches are not supported by the attribution hook")
    adv = out["advantages"]
    if adv.dim() != 1:
        raise RlattrError(f"advantages: expected Tensor[n] (one per completion), got {tuple(adv.shape)}")
    loss_mask = out["completion_mask"]
    if "tool_mask" in out:
        loss_mask = loss_mask * out["tool_mask"]
    batch = {
        "input_ids": torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1),
        "attention_mask": torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1),
        "loss_mask": loss_mask,
        "advantages": adv,
    }
    old = out.get("old_per_token_logps", out.get("old_logps"))
    if old is not None:
        batch["old_logps"] = old
    if beta != 0.0:
        batch["ref_logps"] = out["ref_per_token_logps"]
    return batch


def keep_rows(out: dict[str, Any], keep: Tensor) -> dict[str, Any]:
    """``out`` with only the rows where ``keep`` (``Tensor[n]`` bool) holds; 0-d tensors stay as they are."""
    n = keep.numel()
    idx = torch.nonzero(keep).flatten()
    kept: dict[str, Any] = {}
    for key, value in out.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
            kept[key] = value[idx.to(value.device)]
        elif isinstance(value, list) and len(value) == n:
            kept[key] = [value[i] for i in idx.tolist()]
        else:
            kept[key] = value
    return kept


_DEAD_ZERO_KEYS = ("advantages", "completion_mask", "tool_mask", "old_logps")


def compact_rows(out: dict[str, Any], keep: Tensor, n_rows: int) -> dict[str, Any]:
    """The kept rows of ``out``, followed by ``n_rows - n_kept`` dead rows when ``n_rows`` is larger.

    With several processes TRL gathers per-row tensors in ``compute_loss`` (its clip-ratio metrics),
    which requires every rank to hold the same number of rows. A dead row is a dropped row with its
    advantage, completion mask (and tool mask, and RLOO's old log-prob) set to zero: it contributes
    no gradient and no loss token, but a row-mean loss (grpo, dr_grpo, luspo, rloo) counts it as a row.
    """
    kept = keep_rows(out, keep)
    n_dead = n_rows - int(keep.sum())
    if n_dead <= 0:
        return kept
    dropped = torch.nonzero(~keep).flatten()[:n_dead]
    dead = keep_rows(out, torch.zeros_like(keep).index_fill_(0, dropped, True))
    for key in _DEAD_ZERO_KEYS:
        if isinstance(dead.get(key), Tensor):
            dead[key] = torch.zeros_like(dead[key])
    merged: dict[str, Any] = {}
    for key, value in kept.items():
        other = dead[key]
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == int(keep.sum()):
            merged[key] = torch.cat([value, other])
        elif isinstance(value, list) and len(value) == int(keep.sum()):
            merged[key] = value + other
        else:
            merged[key] = value
    return merged


def fit_to_micro_batches(keep: Tensor, scores: Tensor, steps: int) -> Tensor:
    """Add back the best-scored dropped rows until the kept count is a positive multiple of ``steps``.

    TRL splits a generation batch into ``steps_per_generation`` equal micro-batches and discards the
    remainder (``split_tensor_dict``), so a kept count that is not a multiple would lose rows.
    """
    keep = keep.clone()
    k = int(keep.sum())
    need = max(steps, -(-k // steps) * steps) - k
    if need > 0:
        order = torch.argsort(torch.where(keep, -torch.inf, scores.double()), descending=True, stable=True)
        keep[order[:need]] = True
    return keep


__all__ = ["compact_rows", "fit_to_micro_batches", "keep_rows", "pair_batch"]
