"""Fused pair scores and IIF gradient surgery against TRL's own loss, row by row (offline, tiny GPT-2)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("trl")

from trl import RLOOTrainer  # noqa: E402
from trl.trainer.utils import split_tensor_dict  # noqa: E402

from rlattr.callbacks.trl.fused import PendingBatch, kept_factor  # noqa: E402
from rlattr.callbacks.trl.trainer import (  # noqa: E402
    AttributionConfig,
    IIFGRPOTrainer,
    IIFRLOOTrainer,
    keep_rows,
)
from rlattr.rl.filtering import BottomFraction  # noqa: E402
from tests.callbacks.trl.test_trainer import PROMPTS, TARGET, N, _generate, _grad, make  # noqa: E402

TOKEN_LOSSES = (
    "dapo",
    "cispo",
    "vespo",
)  # normalised by num_items_in_batch: a row alone keeps the normaliser


def _lora() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False)


def _trainer(tmp_path: Path, loss_type: str, steps: int, attribution: AttributionConfig, **over: Any) -> Any:
    cls = IIFRLOOTrainer if loss_type == "rloo" else IIFGRPOTrainer
    if loss_type != "rloo":
        over["loss_type"] = loss_type
    # steps micro-batches per generation batch, one optimizer step: N / steps pairs each
    return make(
        cls,
        tmp_path,
        attribution,
        per_device_train_batch_size=N // steps,
        gradient_accumulation_steps=steps,
        **over,
    )


def _f_seq_grad(t: Any, target_out: dict[str, Any]) -> torch.Tensor:
    """grad f_seq from TRL's own per-token log-probs, one plain backward."""
    ids = torch.cat([target_out["prompt_ids"], target_out["completion_ids"]], 1)
    am = torch.cat([target_out["prompt_mask"], target_out["completion_mask"]], 1)
    c = target_out["completion_ids"].shape[1]
    logps = t._get_per_token_logps_and_entropies(t.model, ids, am, c)[0]
    return _grad(t, ((logps * target_out["completion_mask"]).sum(1) * target_out["advantages"]).mean())


def micro_batch_of(order: torch.Tensor, size: int) -> torch.Tensor:
    """``Tensor[N]``: the micro-batch each row lands in when rows are taken in ``order``, ``size`` at a time."""
    micro_of = torch.empty(order.numel(), dtype=torch.long)
    micro_of[order] = torch.arange(order.numel()) // size
    return micro_of


def _train_micro_batches(t: Any, out: dict[str, Any], steps: int, order: torch.Tensor) -> None:
    """What TRL's training steps do with a generation batch: shuffle, split, loss, backward; scored as they go."""
    out = dict(out)
    out["attr_row"] = torch.arange(N)
    t._attr_pending = PendingBatch(
        out, steps=steps, keep_records=t.attribution.drop, seconds=0.0, seconds_target=0.0
    )
    shuffled = {k: v[order] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in out.items()}
    for chunk in split_tensor_dict(shuffled, steps):
        loss = t.compute_loss(t.model, chunk)
        if isinstance(t, RLOOTrainer):  # the HF Trainer divides RLOO's row mean by gradient accumulation
            loss = loss / steps
        loss.backward()
        t.current = None
        t._score_micro_batch(t._attr_pending)
    assert t._attr_pending is None  # the last micro-batch finished the generation batch


CASES = [
    ("grpo", 1, False, 0.0),
    ("grpo", 2, False, 0.0),
    ("bnpo", 1, False, 0.0),
    ("dr_grpo", 2, False, 0.0),
    ("dapo", 2, False, 0.0),
    ("cispo", 1, False, 0.0),
    ("sapo", 2, False, 0.0),
    ("luspo", 1, False, 0.0),
    ("vespo", 2, False, 0.0),
    ("rloo", 2, False, 0.0),
    ("dapo", 2, True, 0.0),  # LoRA: only the adapters are tracked
    ("grpo", 1, True, 0.04),  # KL against the reference (the adapter-free base model)
]


@pytest.mark.parametrize(("loss_type", "steps", "lora", "beta"), CASES)
def test_fused_scores_equal_per_row_autograd_of_trl_loss(
    tmp_path: Path, loss_type: str, steps: int, lora: bool, beta: float
) -> None:
    over: dict[str, Any] = {"beta": beta} if beta else {}
    t = _trainer(
        tmp_path,
        loss_type,
        steps,
        AttributionConfig(TARGET, drop=False),
        peft=_lora() if lora else None,
        **over,
    )
    assert t._attr_plan.fused, t._attr_plan.reason
    out, target_out = _generate(t, PROMPTS[:2]), _generate(t, TARGET)
    gf = _f_seq_grad(t, target_out)
    t._attr_direction = t._target_direction(target_out)
    direction = t._attr_direction.direction
    torch.testing.assert_close(
        torch.cat([d.reshape(-1) for d in direction.values()]), gf, rtol=1e-4, atol=1e-6
    )
    order = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    _train_micro_batches(t, out, steps, order)
    scores = t.attribution_history[-1]["scores"]
    # oracle: TRL's own loss on each row alone, weighted into that row's share of its micro-batch's loss
    size, mask = N // steps, out["completion_mask"].float()
    micro_of = micro_batch_of(order, size)
    expected = []
    for i in range(N):
        one = keep_rows(out, torch.arange(N) == i)
        g = _grad(t, t._compute_loss(t.model, one))
        if loss_type in TOKEN_LOSSES:
            w = 1.0
        elif loss_type == "bnpo":
            w = float(mask[i].sum() / mask[micro_of == micro_of[i]].sum())
        else:
            w = 1.0 / size / (steps if loss_type == "rloo" else 1)
        expected.append(-w * (gf @ g))
    expected_t = torch.stack(expected)
    assert expected_t.abs().max() > 1e-5
    torch.testing.assert_close(scores, expected_t, rtol=2e-3, atol=1e-6)


def test_fused_scores_sum_to_the_batch_gradient_with_entropy_mask_and_bonus(tmp_path: Path) -> None:
    """The entropy mask's quantile is over the batch, so rows alone differ; their sum must still be exact."""
    over = {"top_entropy_quantile": 0.5, "entropy_coef": 0.3}
    t = _trainer(tmp_path, "grpo", 1, AttributionConfig(TARGET, drop=False), **over)
    assert t._attr_plan.fused
    out, target_out = _generate(t, PROMPTS[:2]), _generate(t, TARGET)
    gf = _f_seq_grad(t, target_out)
    t._attr_direction = t._target_direction(target_out)
    _train_micro_batches(t, out, 1, torch.arange(N))
    total = _grad(t, t._compute_loss(t.model, out))
    got = t.attribution_history[-1]["scores"].sum()
    torch.testing.assert_close(got, -(gf @ total), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    ("loss_type", "steps"), [("grpo", 2), ("dapo", 1), ("bnpo", 1), ("rloo", 2), ("vespo", 2)]
)
def test_iif_surgery_leaves_exactly_trl_gradient_on_kept_rows(
    tmp_path: Path, loss_type: str, steps: int
) -> None:
    t = _trainer(tmp_path, loss_type, steps, AttributionConfig(TARGET, rule=BottomFraction(0.25)))
    assert t._attr_plan.fused, t._attr_plan.reason
    out, target_out = _generate(t, PROMPTS[:2]), _generate(t, TARGET)
    t._attr_direction = t._target_direction(target_out)
    t.model.zero_grad()
    _train_micro_batches(t, out, steps, torch.randperm(N, generator=torch.Generator().manual_seed(5)))
    keep = t.attribution_history[-1]["keep"]
    assert int(keep.sum()) == N - 2
    params = [p for p in t.model.parameters() if p.requires_grad]
    after = torch.cat([p.grad.reshape(-1) for p in params])
    # reference: TRL on the kept rows alone, as its training step would see them (normaliser recomputed)
    kept = keep_rows(out, keep)
    if "num_items_in_batch" in kept:
        kept["num_items_in_batch"] = kept["completion_mask"].sum()
    reference = torch.zeros_like(after)
    for chunk in split_tensor_dict(kept, steps):
        loss = t._compute_loss(t.model, chunk) / (steps if loss_type == "rloo" else 1)
        reference += _grad(t, loss)
    torch.testing.assert_close(after, reference, rtol=1e-4, atol=1e-7)


def test_scoring_pass_fallback_equals_fused_scores(tmp_path: Path) -> None:
    t = _trainer(tmp_path, "dapo", 2, AttributionConfig(TARGET, drop=False))
    out, target_out = _generate(t, PROMPTS[:2]), _generate(t, TARGET)
    t._attr_direction = t._target_direction(target_out)
    before = {k: list(v) for k, v in t._metrics["train"].items()}
    state = torch.get_rng_state()
    passed = t._score_local(out)
    assert torch.equal(state, torch.get_rng_state()) and all(p.grad is None for p in t.model.parameters())
    assert {k: list(v) for k, v in t._metrics["train"].items()} == before
    _train_micro_batches(t, out, 2, torch.arange(N))
    torch.testing.assert_close(passed, t.attribution_history[-1]["scores"], rtol=1e-4, atol=1e-7)


def test_plan_falls_back_and_refuses_clearly(tmp_path: Path) -> None:
    t = _trainer(tmp_path, "grpo", 2, AttributionConfig(TARGET), steps_per_generation=4)
    assert not t._attr_plan.fused and "steps_per_generation" in t._attr_plan.reason
    t = _trainer(tmp_path, "bnpo", 2, AttributionConfig(TARGET))
    assert not t._attr_plan.fused and "bnpo" in t._attr_plan.reason
    assert _trainer(tmp_path, "bnpo", 2, AttributionConfig(TARGET, drop=False))._attr_plan.fused
    out = {"completion_mask": torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]]), "advantages": torch.zeros(3)}
    keep = torch.tensor([True, False, True])
    assert kept_factor("dapo", out, keep) == pytest.approx(6 / 5)
    assert kept_factor("grpo", out, keep) == pytest.approx(3 / 2)
