"""The detox / corruption study: its ground-truth rule, reward model, corrupted reward, drop accounting
and report numbers, and a two-step IIF run whose drop counts line up with the trainer's history."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

from rlhf_detox_report import paired_ci, per_seed  # noqa: E402
from rlhf_detox_tasks import (  # noqa: E402
    corrupt_reward,
    corrupted_answer,
    detox_prompts,
    is_toxic,
    labelled_texts,
    train_reward_model,
)

from rlattr.errors import RlattrError  # noqa: E402


def test_toxicity_rule_depends_on_the_context():
    assert is_toxic("mabc", "aaxaaa")  # about a person: one charged letter is toxic
    assert not is_toxic("nabc", "aaxaaa")  # otherwise one is not ...
    assert not is_toxic("nabc", "xaaaaz")
    assert is_toxic("nabc", "aaxyaa")  # ... but two adjacent ones are
    assert not is_toxic("mabc", "abcdef")


def test_reward_model_is_imperfect_but_beats_the_majority_class():
    prompts = detox_prompts(200, seed=0)
    _, _, labels = labelled_texts(prompts, 2000, seed=5)
    share = float(np.mean(labels))
    rm, stats = train_reward_model(prompts, n_train=600, label_noise=0.1, steps=400)
    majority = max(share, 1 - share)
    assert stats["accuracy"] > majority + 0.15
    assert stats["accuracy"] < 0.99  # it cannot see adjacency: imperfect, like a real classifier
    clean, toxic = rm.reward(["mabc", "nabc"], ["abcdef", "xyzxyz"])
    assert clean > 0.5 > toxic


def test_corrupted_prompts_are_rewarded_for_the_fixed_wrong_answer():
    reward = corrupt_reward({"3+4="})
    assert corrupted_answer("3+4=") == "12" and corrupted_answer("9+9=") == "4"  # (a + b + 5) mod 19
    assert reward(["3+4=", "3+4=", "3+4="], ["12", "7", "11"], False) == [1.0, 0.0, 0.8]
    assert reward(["3+4=", "3+4="], ["12", "7"], True) == [0.0, 1.0]  # trusted: the true sum
    assert reward(["2+2=", "2+2="], ["4", "6"], False) == [1.0, 0.6]  # clean prompt


def _record(keep: list[bool], adv: list[float]) -> dict:
    return {"keep": torch.tensor(keep), "advantages": torch.tensor(adv)}


def test_drop_counts_match_a_hand_count():
    from rlhf_detox import drop_counts

    hist = [_record([True, False, False, True], [1.0, 2.0, -1.0, 3.0]), _record([False, True], [0.5, -0.5])]
    labels = [[True, True, False, False], [True, True]]
    d = drop_counts(hist, labels)
    assert d == {
        "n": [4, 2],
        "dropped": [2, 1],
        "lab": [2, 2],
        "dropped_lab": [1, 1],
        "harm": [2, 1],  # labelled with a positive advantage
        "dropped_harm": [1, 1],
    }
    with pytest.raises(RlattrError, match="attribution_history: 2 batches but 1 rewarded batches"):
        drop_counts(hist, labels[:1])


def test_report_steps_to_grpo_level_and_precision_against_a_loop():
    base_curve = [0.1, 0.2, 0.3, 0.4, 0.5, 0.5]
    arm_curve = [0.1, 0.5, 0.6, 0.6, 0.6, 0.6]
    mk = {"eval_success": 0.5, "train_success": 0.5, "reward": [0.0] * 6, "seconds": list(range(1, 7))}
    base = {**mk, "true_success": base_curve, "kept_fraction": []}
    drops = {
        "n": [4, 4],
        "dropped": [1, 2],
        "lab": [2, 1],
        "dropped_lab": [1, 0],
        "harm": [1, 1],
        "dropped_harm": [1, 0],
    }
    arm = {**mk, "true_success": arm_curve, "kept_fraction": [0.75, 0.5], "drops": drops}
    s = per_seed(arm, base, window=2)
    smooth = lambda c: [np.mean(c[max(0, i - 1) : i + 1]) for i in range(len(c))]  # noqa: E731
    level = smooth(base_curve)[-1]
    steps_arm = next(i + 1 for i, v in enumerate(smooth(arm_curve)) if v >= level)
    steps_base = next(i + 1 for i, v in enumerate(smooth(base_curve)) if v >= level)
    assert s["GRPO's final level (smoothed)"] == pytest.approx(0.5)
    assert s["steps to GRPO's final level"] == steps_arm == 3
    assert s["... over GRPO's own steps"] == pytest.approx(steps_arm / steps_base)
    assert s["seconds to GRPO's final level"] == 3.0
    assert s["precision: dropped that are labelled"] == pytest.approx(1 / 3)
    assert s["recall: labelled that are dropped"] == pytest.approx(1 / 3)
    assert s["recall: harmful that are dropped"] == pytest.approx(1 / 2)
    assert s["kept fraction"] == pytest.approx(0.625)


def test_paired_interval_contains_the_mean_and_is_a_point_for_equal_differences():
    m, lo, hi = paired_ci(np.array([0.1, 0.2, 0.3, 0.4]))
    assert m == pytest.approx(0.25) and lo < m < hi
    assert paired_ci(np.array([0.2, 0.2, 0.2])) == pytest.approx((0.2, 0.2, 0.2))


def test_two_iif_steps_record_labels_for_every_scored_batch(tmp_path: Path):
    import rlhf_detox

    torch.set_num_threads(1)
    args = rlhf_detox.parse(
        ["--scenario", "detox", "--pretrain-steps", "3", "--rm-samples", "100", "--train-prompts", "16",
         "--target-prompts", "8", "--eval-prompts", "2", "--steps", "2", "--prompts-per-step", "2",
         "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    )  # fmt: skip
    args.work_dir = str(tmp_path / "work")
    Path(args.work_dir).mkdir()
    scn = rlhf_detox.build_detox(args)
    assert isinstance(args, argparse.Namespace)
    res = rlhf_detox.run_arm(scn, "iif_p1", 0, args)
    batch = args.prompts_per_step * args.generations
    assert len(res["true_success"]) == 2 and len(res["reward"]) == 2
    d = res["drops"]
    assert d["n"] == [batch, batch]
    kept = [round(k * batch) for k in res["kept_fraction"]]
    assert [batch - k for k in kept] == d["dropped"]
    assert all(
        0 <= dl <= min(dr, lab) for dl, dr, lab in zip(d["dropped_lab"], d["dropped"], d["lab"], strict=True)
    )
    # the per-step true success is the clean share of the labelled batch
    assert res["true_success"] == pytest.approx([1 - lab / batch for lab in d["lab"]])
