"""The TRL hook against TRL's own loss: scores, dropped completions, short training runs, errors.

Everything is offline: a GPT-2 from a tiny config and a character-level tokenizer built in-process.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from rlattr.callbacks.trl.trainer import (  # noqa: E402
    AttributionConfig,
    IIFGRPOTrainer,
    IIFRLOOTrainer,
    compact_rows,
    keep_rows,
    with_attribution,
)
from rlattr.rl.filtering import BottomFraction  # noqa: E402
from rlattr.testing.tiny_lm import char_tokenizer, tiny_gpt2  # noqa: E402

PROMPTS = [f"{a}+{b}=" for a in range(4) for b in range(4)]
TARGET = ["1+2=", "3+1="]
N = 8  # completions per generation batch: 2 prompts x 4 generations


def digits(completions: list[str], **kwargs: object) -> list[float]:
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def make(cls: type, tmp_path: Path, attribution: AttributionConfig | None = None, peft=None, **over: object):
    tok = char_tokenizer()
    rloo = issubclass(cls, RLOOTrainer)
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": N,
        "num_generations": 4,
        "max_completion_length": 6,
        "max_steps": 2,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "learning_rate": 1e-2,
        "seed": 0,
        "temperature": 0.9,
        "bf16": False,  # TRL defaults to bf16 autocast, even on CPU; compare in float32
        **over,
    }
    if rloo:  # RLOO's default beta > 0 makes TRL re-load a reference model by hub id
        settings.setdefault("beta", 0.0)
    args = (RLOOConfig if rloo else GRPOConfig)(**settings)
    kw = {"attribution": attribution} if attribution is not None else {}
    if peft is not None:
        kw["peft_config"] = peft
    data = Dataset.from_dict({"prompt": PROMPTS})
    t = cls(
        model=tiny_gpt2(tok), reward_funcs=digits, args=args, train_dataset=data, processing_class=tok, **kw
    )
    t.current_gradient_accumulation_steps = (
        args.gradient_accumulation_steps
    )  # set by train(); tests call pieces
    return t


def _base(trainer):
    return RLOOTrainer if isinstance(trainer, RLOOTrainer) else GRPOTrainer


def _generate(trainer, prompts: list[str]) -> dict:
    trainer.model.train()
    rows = [{"prompt": p} for p in prompts for _ in range(4)]
    return _base(trainer)._generate_and_score_completions(trainer, rows)


def _grad(trainer, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _single_row_grads(trainer, out: dict, rows: list[int], items: torch.Tensor | None) -> list[torch.Tensor]:
    """Gradient of TRL's own ``_compute_loss`` on each row alone (num_items_in_batch set to ``items``)."""
    grads = []
    for i in rows:
        one = keep_rows(out, torch.arange(N) == i)
        if items is not None:
            one["num_items_in_batch"] = items
        grads.append(_grad(trainer, trainer._compute_loss(trainer.model, one)))
    return grads


# Fused scores against TRL's own loss row by row, for every loss type: tests/callbacks/trl/test_fused.py


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "rloo"])
def test_dropped_completions_give_the_gradient_of_the_batch_without_them(
    tmp_path: Path, loss_type: str
) -> None:
    cls = IIFRLOOTrainer if loss_type == "rloo" else IIFGRPOTrainer
    over = {} if loss_type == "rloo" else {"loss_type": loss_type}
    t = make(cls, tmp_path, AttributionConfig(TARGET, rule=BottomFraction(0.375)), **over)
    out = _generate(t, PROMPTS[:2])
    t._attr_plan = dataclasses.replace(t._attr_plan, fused=False)  # the fallback: score, then drop rows
    filtered = t._attribute_generation_batch(dict(out))
    keep = t.attribution_history[-1]["keep"]
    kept = torch.nonzero(keep).flatten().tolist()
    assert len(kept) == N - 3 and filtered["completion_ids"].shape[0] == N - 3
    step = _grad(t, t.compute_loss(t.model, filtered))
    # reference: TRL's loss of each kept row alone, combined as TRL combines rows of a batch of the kept rows
    mask = out["completion_mask"][kept]
    items = mask.sum() if "num_items_in_batch" in out else None
    rows = _single_row_grads(t, out, kept, items)
    if loss_type == "bnpo":
        lengths = mask.sum(1).float()
        reference = sum(g * n for g, n in zip(rows, lengths, strict=True)) / lengths.sum()
    elif loss_type == "dapo":
        reference = sum(rows)
    else:
        reference = sum(rows) / len(kept)
    torch.testing.assert_close(step, reference, rtol=1e-4, atol=1e-6)
    if items is not None:
        assert int(filtered["num_items_in_batch"]) == int(items)


@pytest.mark.parametrize("cls", [IIFGRPOTrainer, IIFRLOOTrainer])
def test_trainers_train_with_the_hook_and_log_attr_tags(tmp_path: Path, cls: type) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # two micro-batches per generation: the kept count must stay a multiple of 2
    t = make(
        cls,
        tmp_path,
        AttributionConfig(TARGET, log_text_k=2),
        report_to="tensorboard",
        gradient_accumulation_steps=2,
    )
    before = [p.detach().clone() for p in t.model.parameters()]
    t.train()
    assert len(t.attribution_history) == 2
    for rec in t.attribution_history:
        assert rec["scores"].shape == (2 * N,) and torch.isfinite(rec["scores"]).all()
        n_neg_kept = int((rec["keep"] & (rec["scores"] < 0)).sum())
        assert int(rec["keep"].sum()) % 2 == 0 and n_neg_kept <= 1
        assert n_neg_kept == 0 or "steps_per_generation=2" in rec["note"]
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters(), strict=True))
    acc = EventAccumulator(t.attribution_logger.log_dir).Reload()
    # scalars go through TRL's own metrics, so its TensorBoard callback writes them under train/
    assert {"train/attr/kept_fraction", "train/attr/score_mean", "train/attr/seconds"} <= set(
        acc.Tags()["scalars"]
    )
    assert "attr/score_hist" in acc.Tags()["histograms"]
    assert any(tag.startswith("attr/top_completions") for tag in acc.Tags()["tensors"])
    assert str(tmp_path) in t.attribution_logger.log_dir


def test_unsupported_trainer_and_settings_fail_clearly(tmp_path: Path) -> None:
    from trl import SFTTrainer

    with pytest.raises(TypeError, match="trainer_cls: .*SFTTrainer.*supported"):
        with_attribution(SFTTrainer)
    # nothing is mirrored any more: sapo and entropy masks are scored through TRL's own loss
    assert make(IIFGRPOTrainer, tmp_path, AttributionConfig(TARGET), loss_type="sapo")._attr_plan.fused
    with pytest.raises(TypeError, match="attribution: expected an AttributionConfig"):
        make(IIFGRPOTrainer, tmp_path)
    with pytest.raises(ValueError, match="target_prompts"):
        AttributionConfig([])
    with pytest.raises(ValueError, match="p: must be a fraction"):
        AttributionConfig(TARGET, p=1.5)
    sub = with_attribution(type("MyGRPO", (GRPOTrainer,), {}))
    assert sub.__name__ == "IIFMyGRPO" and issubclass(sub, GRPOTrainer)


@pytest.mark.parametrize("loss_type", ["dapo", "rloo"])
def test_dead_rows_for_equal_rank_sizes_add_no_gradient(tmp_path: Path, loss_type: str) -> None:
    cls = IIFRLOOTrainer if loss_type == "rloo" else IIFGRPOTrainer
    over = {} if loss_type == "rloo" else {"loss_type": loss_type}
    t = make(cls, tmp_path, AttributionConfig(TARGET), **over)
    out = _generate(t, PROMPTS[:2])
    keep = torch.tensor([True, False, True, True, False, True, False, True])
    padded = compact_rows(out, keep, N)
    assert padded["completion_ids"].shape[0] == N and int(padded["completion_mask"][5:].sum()) == 0
    plain = keep_rows(out, keep)
    if loss_type == "rloo":  # a row-mean loss: dead rows count as rows, so the loss scales by 5 / 8
        torch.testing.assert_close(
            _grad(t, t.compute_loss(t.model, padded)), _grad(t, t.compute_loss(t.model, plain)) * 5 / 8
        )
    else:  # token-normalised: exactly the gradient of the batch of kept rows
        for d in (padded, plain):
            d["num_items_in_batch"] = plain["completion_mask"].sum()
        torch.testing.assert_close(
            _grad(t, t.compute_loss(t.model, padded)), _grad(t, t.compute_loss(t.model, plain))
        )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["iif", "score"])
def test_two_processes_agree_on_scores_and_drops(tmp_path: Path, mode: str) -> None:
    """torchrun, 2 CPU processes (gloo): same gathered scores and keep masks on both ranks, synced weights.

    IIF over several processes scores in a pass before the update; score-only stays fused.
    """
    import shutil
    import socket
    import subprocess
    import sys

    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    script = os.path.join(os.path.dirname(__file__), "ddp_check.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port: other test runs on this machine may hold a fixed one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(port), script, str(tmp_path), "dapo", mode]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["num_processes"] == 2 and len(r0["scores"]) == 2
    for i, (s0, s1, k0, k1) in enumerate(
        zip(r0["scores"], r1["scores"], r0["keep"], r1["keep"], strict=True)
    ):
        l0, l1 = r0["local"][i], r1["local"][i]
        assert torch.equal(s0, s1) and torch.equal(k0, k1) and r0["note"][i] == r1["note"][i]
        assert torch.equal(s0[: l0.numel()], l0) and torch.equal(s0[l0.numel() :], l1)
        if mode == "score":
            assert bool(k0.all()) and bool((s0 != 0).any())
        else:  # a negative pair survives only when a rank would otherwise be left with no pair at all
            assert not (k0 & (s0 < 0)).any() or "steps_per_generation" in r0["note"][i]
    assert torch.equal(r0["params"], r1["params"])


def test_score_only_run_trains_exactly_like_the_plain_trainer(tmp_path: Path) -> None:
    """drop=False: the hook's held-out sampling uses its own RNG stream, so the update is untouched."""
    plain = make(GRPOTrainer, tmp_path / "plain")
    plain.train()
    hooked = make(IIFGRPOTrainer, tmp_path / "hooked", AttributionConfig(TARGET, drop=False))
    hooked.train()
    for a, b in zip(plain.model.parameters(), hooked.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(hooked.attribution_history) == 2
