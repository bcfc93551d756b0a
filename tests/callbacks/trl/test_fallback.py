"""The slow per-row path for trainable layers without a capture handler (here: LayerNorm unregistered)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("trl")

from trl import GRPOTrainer  # noqa: E402
from trl.trainer.utils import split_tensor_dict  # noqa: E402

from rlattr.callbacks.trl.trainer import AttributionConfig, IIFGRPOTrainer, keep_rows  # noqa: E402
from rlattr.core import ghost_layers  # noqa: E402
from rlattr.errors import RlattrError  # noqa: E402
from rlattr.rl.filtering import BottomFraction  # noqa: E402
from tests.callbacks.trl.test_fused import _f_seq_grad, _train_micro_batches, _trainer, micro_batch_of  # noqa: E402
from tests.callbacks.trl.test_trainer import PROMPTS, TARGET, N, _generate, _grad, make  # noqa: E402


@pytest.fixture
def no_layernorm_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every LayerNorm (ln_1, ln_2, ln_f of each block) becomes a layer the fused path does not cover."""
    monkeypatch.delitem(ghost_layers._HANDLERS, nn.LayerNorm)


def _slow_trainer(tmp_path: Path, loss_type: str, steps: int, attribution: AttributionConfig) -> Any:
    with pytest.warns(
        UserWarning, match=r"no gradient-capture handler for modules .*ln_f.*one extra forward"
    ):
        t = _trainer(tmp_path, loss_type, steps, attribution)
    assert t._attr_plan.fused and t._attr_slow
    assert all(".ln_" in n for n in t._attr_slow) and len(t._attr_slow) == 2 * (2 * 2 + 1)
    return t


@pytest.mark.parametrize(("loss_type", "steps"), [("grpo", 2), ("dapo", 2), ("bnpo", 2)])
def test_scores_with_uncovered_layers_equal_per_row_autograd_of_trl_loss(
    tmp_path: Path, no_layernorm_handler: None, loss_type: str, steps: int
) -> None:
    t = _slow_trainer(tmp_path, loss_type, steps, AttributionConfig(TARGET, drop=False))
    out, target_out = _generate(t, PROMPTS[:2]), _generate(t, TARGET)
    gf = _f_seq_grad(t, target_out)
    t._attr_direction = t._target_direction(target_out)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    _train_micro_batches(t, out, steps, order)
    scores = t.attribution_history[-1]["scores"]
    # oracle: every trainable parameter, TRL's own loss on each row alone, weighted into its micro-batch
    size, mask = N // steps, out["completion_mask"].float()
    micro_of = micro_batch_of(order, size)
    ln = torch.cat([torch.full((p.numel(),), ".ln_" in n) for n, p in t.model.named_parameters()])
    expected, without_ln = [], []
    for i in range(N):
        g = _grad(t, t._compute_loss(t.model, keep_rows(out, torch.arange(N) == i)))
        if loss_type == "dapo":
            w = 1.0
        elif loss_type == "bnpo":  # its micro-batch's loss tokens
            w = float(mask[i].sum() / mask[micro_of == micro_of[i]].sum())
        else:
            w = 1.0 / size
        expected.append(-w * (gf @ g))
        without_ln.append(-w * (gf[~ln] @ g[~ln]))
    expected_t = torch.stack(expected)
    torch.testing.assert_close(scores, expected_t, rtol=1e-5, atol=1e-6)
    # the LayerNorm parameters' part (about 2e-4 here) is far above that tolerance: without the slow
    # path this test fails
    slow_part = (expected_t - torch.stack(without_ln)).abs().max()
    assert slow_part > 1e-5 and slow_part > 50 * (scores - expected_t).abs().max()


@pytest.mark.parametrize(("loss_type", "steps"), [("grpo", 2), ("dapo", 1)])
def test_iif_with_uncovered_layers_leaves_exactly_trl_gradient_on_kept_rows(
    tmp_path: Path, no_layernorm_handler: None, loss_type: str, steps: int
) -> None:
    t = _slow_trainer(tmp_path, loss_type, steps, AttributionConfig(TARGET, rule=BottomFraction(0.25)))
    out, target_out = _generate(t, PROMPTS[:2]), _generate(t, TARGET)
    t._attr_direction = t._target_direction(target_out)
    t.model.zero_grad()
    _train_micro_batches(t, out, steps, torch.randperm(N, generator=torch.Generator().manual_seed(5)))
    keep = t.attribution_history[-1]["keep"]
    assert int(keep.sum()) == N - 2
    after = torch.cat([p.grad.reshape(-1) for p in t.model.parameters() if p.requires_grad])
    kept = keep_rows(out, keep)
    if "num_items_in_batch" in kept:
        kept["num_items_in_batch"] = kept["completion_mask"].sum()
    reference = torch.zeros_like(after)
    for chunk in split_tensor_dict(kept, steps):
        reference += _grad(t, t._compute_loss(t.model, chunk))
    torch.testing.assert_close(after, reference, rtol=1e-4, atol=1e-7)


def test_score_only_with_uncovered_layers_trains_exactly_like_plain_grpo(
    tmp_path: Path, no_layernorm_handler: None
) -> None:
    plain = make(GRPOTrainer, tmp_path / "plain")
    plain.train()
    with pytest.warns(UserWarning, match="slow path"):
        hooked = make(IIFGRPOTrainer, tmp_path / "hooked", AttributionConfig(TARGET, drop=False))
    hooked.train()
    for a, b in zip(plain.model.parameters(), hooked.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(hooked.attribution_history) == 2
    assert all(torch.isfinite(r["scores"]).all() for r in hooked.attribution_history)


def test_slow_path_refuses_settings_it_cannot_score(tmp_path: Path, no_layernorm_handler: None) -> None:
    with pytest.raises(
        RlattrError, match=r"model: .*'transformer.ln_f'.*cannot score an entropy mask.*supported"
    ):
        _trainer(tmp_path, "grpo", 1, AttributionConfig(TARGET, drop=False), top_entropy_quantile=0.5)
