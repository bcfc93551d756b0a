"""The IIF study's arms and statistics: adaptive arm names, score tail statistics, IIF's clock."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

from iif_envs import (  # noqa: E402
    adaptive_f,
    arm_order,
    epoch_kept_fraction,
    tail_stats,
    validation_steps,
    weighting,
)
from iif_sample_efficiency import compare  # noqa: E402

from rlattr.eval.efficiency import efficiency  # noqa: E402
from rlattr.rl.filtering import make_rule  # noqa: E402


def test_adaptive_arm_names_carry_their_fraction() -> None:
    assert adaptive_f({"iif": {}}, "iif-adaptive-0.8") == 0.8
    assert adaptive_f({"iif": {"f": 0.7}}, "iif-adaptive") == 0.7
    assert adaptive_f({"iif": {}}, "iif-adaptive") == 0.5
    assert adaptive_f({"iif": {}}, "iif") is None
    for bad in ("iif-adaptive-x", "iif-adaptive-1.5", "iif-adaptive-0", "iff"):
        with pytest.raises(ValueError, match=f"method: got '{bad}'"):
            adaptive_f({"iif": {}}, bad)


def test_validation_arm_names_carry_their_steps() -> None:
    assert validation_steps({"iif": {}}, "iif-val-2048") == 2048
    assert validation_steps({"iif": {"validation_steps": 64}}, "iif-val") == 64
    assert validation_steps({"iif": {}}, "iif-val") == 256
    assert validation_steps({"iif": {}}, "iif-refill") is None
    assert adaptive_f({"iif": {}}, "iif-val-2048") is None  # a valid arm, no adaptive fraction
    for bad in ("iif-val-0", "iif-val-x", "iif-val--5"):
        with pytest.raises(ValueError, match=f"method: got '{bad}'"):
            validation_steps({"iif": {}}, bad)
        with pytest.raises(ValueError, match=f"method: got '{bad}'"):
            adaptive_f({"iif": {}}, bad)
    arms = ["iif-val-2048", "iif-adaptive-0.9-refill", "iif-adaptive-0.9", "iif-soft", "ppo"]
    arms += ["iif-val-512", "iif-adaptive-0.5", "iif"]
    assert sorted(arms, key=arm_order) == [
        "ppo",
        "iif",
        "iif-soft",
        "iif-adaptive-0.5",
        "iif-adaptive-0.9",
        "iif-adaptive-0.9-refill",
        "iif-val-512",
        "iif-val-2048",
    ]


def test_weighting_of_each_arm() -> None:
    assert adaptive_f({"iif": {}}, "iif-adaptive-0.9-refill") == 0.9
    expected = {
        "iif": "drop",
        "iif-adaptive-0.9": "drop",
        "iif-refill": "refill",
        "iif-adaptive-0.9-refill": "refill",
        "iif-soft": "soft",
        "iif-epoch-fresh": "drop",
    }
    assert {arm: weighting(arm) for arm in expected} == expected
    for bad in ("iif-adaptive-refill", "iif-adaptive-0.9-soft", "iif-val-64-refill"):
        with pytest.raises(ValueError, match=f"method: got '{bad}'"):
            adaptive_f({"iif": {}}, bad)


def test_tail_stats_by_hand() -> None:
    # negatives, most negative first: -5 -4 -3 -2 -1 -0.5 (mass 15.5); cumulative shares
    # 0.32 0.58 0.77 0.90 0.97 1: half the mass in 2 of 6, 90 % in 4 of 6 (0.9032 >= 0.9)
    scores = torch.tensor([2, -5, 0.5, -1, -3, 3, -4, -2, 1, -0.5])
    stats = tail_stats(scores)
    assert stats["neg_fraction"] == pytest.approx(0.6)
    assert stats["top10_share"] == pytest.approx(5 / 15.5)
    assert stats["m50"] == pytest.approx(2 / 6) and stats["m90"] == pytest.approx(4 / 6)
    assert tail_stats(torch.tensor([1.0, 2.0]))["m90"] == 0.0


@pytest.mark.parametrize("f", [0.5, 0.9])
def test_tail_stats_count_what_the_adaptive_rule_drops(f: float) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.randn(200, generator=gen, dtype=torch.float64) ** 3  # heavy tails
        n_neg = int((scores < 0).sum())
        dropped = make_rule("adaptive", f=f).__call__(scores).n_dropped
        key = "m50" if f == 0.5 else "m90"
        assert dropped == round(tail_stats(scores)[key] * n_neg)


def test_epoch_kept_fraction_by_hand() -> None:
    # 100 records, 80 kept in epoch 1, then 10, 0 and 5 dropped: epochs train on 80, 70, 70, 65
    entry = {
        "n_records": 100,
        "n_kept": 80,
        "epoch_drops": [[[0, i, 0] for i in range(10)], [], [[0, 1, 0]] * 5],
    }
    assert epoch_kept_fraction(entry) == pytest.approx((80 + 70 + 70 + 65) / 4 / 100)
    # rescore="epoch-fresh": each later epoch drops from all 100 records: 80, 90, 100, 95
    assert epoch_kept_fraction(entry, fresh=True) == pytest.approx((80 + 90 + 100 + 95) / 4 / 100)


def _run(seed: int, curve: list[float], seconds: list[float]) -> dict:
    return {
        "seed": seed,
        "curve": curve,
        "seconds": seconds,
        "cpu_seconds": seconds,
        "started": 0.0 + 1000 * seed,
        "finished": 1.0 + 1000 * seed,
    }


def test_iif_clock_replaces_the_arm_own_seconds() -> None:
    rounds = np.arange(1, 11, dtype=float)
    ppo = [_run(s, list(np.minimum(rounds / 10, 1)), list(rounds * 10)) for s in (0, 1)]
    arm = [_run(s, list(np.minimum(rounds / 6, 1)), list(rounds * 40)) for s in (0, 1)]
    iif = [_run(s, list(np.minimum(rounds / 7, 1)), list(rounds * 12)) for s in (0, 1, 2)]
    metric = {"n_levels": 5, "n_boot": 50}
    on_iif_clock = compare(arm, ppo, metric, clock_runs=iif)
    by_hand = [
        {**a, "seconds": i["seconds"], "cpu_seconds": i["cpu_seconds"]}
        for a, i in zip(arm, iif[:2], strict=True)
    ]
    expected = compare(by_hand, ppo, metric)
    assert on_iif_clock["seeds"] == [0, 1] and on_iif_clock["clock"] == "iif"
    assert on_iif_clock["rt_peak"]["value"] == pytest.approx(expected["rt_peak"]["value"])
    assert on_iif_clock["se_ave"]["value"] == pytest.approx(compare(arm, ppo, metric)["se_ave"]["value"])
    assert on_iif_clock["rt_peak"]["value"] != pytest.approx(compare(arm, ppo, metric)["rt_peak"]["value"])


def test_ppo_clock_adds_the_arm_scoring_seconds() -> None:
    from iif_sample_efficiency import ppo_clock_plus_scoring

    rounds = np.arange(1, 6, dtype=float)
    ppo = [_run(s, list(rounds / 5), list(rounds * 10)) for s in (0, 1)]
    arm = [
        {**_run(s, list(rounds / 4), list(rounds * 99)), "score_seconds": [1.0, 2.0, 0.5, 0.5, 1.0]}
        for s in (1, 2)
    ]
    clocked = ppo_clock_plus_scoring(arm, ppo)
    assert [r["seed"] for r in clocked] == [1]  # seed 2 has no PPO run
    # PPO's seconds 10, 20, .., 50 plus the arm's cumulative scoring 1, 3, 3.5, 4, 5
    assert clocked[0]["seconds"] == pytest.approx([11.0, 23.0, 33.5, 44.0, 55.0])
    assert clocked[0]["cpu_seconds"] == pytest.approx([11.0, 23.0, 33.5, 44.0, 55.0])
    assert ppo[1]["seconds"] == pytest.approx(list(rounds * 10))  # PPO's own run untouched


@pytest.mark.parametrize("arm", ["iif-epoch", "iif-epoch-fresh"])
def test_epoch_arm_records_its_later_drops(tmp_path: Path, arm: str) -> None:
    import iif_sample_efficiency as study
    from iif_variants_table import rows

    config = Path(study.REPO) / "configs" / "iif" / "frozenlake_noslip.yaml"
    argv = [
        str(config),
        "--seeds",
        "1",
        "--methods",
        f"ppo,{arm}",
        "--workers",
        "1",
        "--out",
        str(tmp_path),
    ]
    study.main([*argv, "--rounds", "2", "--n-steps", "256", "--episodes", "2"])
    out = tmp_path / "frozenlake-noslip"
    run = json.loads((out / "seed_runs" / f"{arm}_seed0.json").read_text())
    n_epochs = int(run["config"]["ppo"]["n_epochs"])
    assert [len(d) for d in run["epoch_dropped"]] == [n_epochs - 1] * 2
    for dropped, later, share in zip(
        run["n_dropped"], run["epoch_dropped"], run["epoch_kept_fraction"], strict=True
    ):
        trained = [256 - dropped]  # records trained on in each epoch, by hand
        for d in later:  # fresh: each later epoch drops out of all 256 records
            trained.append((256 if arm == "iif-epoch-fresh" else trained[-1]) - d)
        assert min(trained) >= 64 and share == pytest.approx(sum(trained) / n_epochs / 256)
    entry = json.loads((out / "results.json").read_text())["methods"][arm]
    assert entry["epoch_kept_fraction_mean"] == pytest.approx(np.mean(run["epoch_kept_fraction"]))
    assert entry["epoch_dropped_per_round_mean"] == pytest.approx(
        np.mean([sum(d) for d in run["epoch_dropped"]])
    )
    assert entry["epoch_dropped_per_epoch_mean"] == pytest.approx(
        np.mean([n for d in run["epoch_dropped"] for n in d])
    )
    (row,) = rows(json.loads((out / "results.json").read_text()))
    later = " per later epoch |" if arm == "iif-epoch-fresh" else " later |"
    assert f"| {arm} | 1 |" in row and "epoch mean" in row and later in row


def test_per_seed_se_ave_by_hand(tmp_path: Path) -> None:
    from iif_variants_table import per_seed, per_seed_lines

    runs = {
        # PPO first reaches the top at round 4 on both seeds
        ("ppo", 0): [0, 0, 0, 1, 1, 1],
        ("ppo", 1): [0, 0, 0, 1, 1, 1],
        ("iif", 0): [0, 1, 1, 1, 1, 1],  # round 2: 1 - 2/4 = 50 %
        ("iif", 1): [0, 0, 1, 1, 1, 1],  # round 3: 25 %
        ("arm", 0): [1, 1, 1, 1, 1, 1],  # round 1: 75 %
        ("arm", 1): [0, 0, 0, 1, 1, 1],  # round 4: 0 %
        ("arm", 2): [1, 1, 1, 1, 1, 1],  # no PPO seed 2: left out
    }
    (tmp_path / "seed_runs").mkdir()
    for (method, seed), curve in runs.items():
        run = {"method": method, "seed": seed, "curve": curve}
        (tmp_path / "seed_runs" / f"{method}_seed{seed}.json").write_text(json.dumps(run))
    table = per_seed(tmp_path, n_levels=5)
    assert table == {"arm": {0: pytest.approx(75.0), 1: pytest.approx(0.0)}, "iif": {0: 50.0, 1: 25.0}}
    lines = per_seed_lines(tmp_path)
    assert lines[1] == "  arm: s0 75.0 s1 0.0  (ahead of IIF on 1 of 2 seeds)"


def test_level_terms_by_hand(tmp_path: Path) -> None:
    from iif_variants_table import level_lines, level_terms

    (tmp_path / "seed_runs").mkdir()
    runs = {
        ("ppo", 0): [0, 0.5, 1, 1],  # levels 0.5 and 1.0 first reached at rounds 2 and 3
        ("fast", 0): [0, 1, 1, 1],  # rounds 2 and 2: terms 0 and 1 - 2/3
        ("short", 0): [0.5, 0.5, 0.5, 0.9],  # round 1, never: censored at 4 rounds, 1 - 4/3
    }
    for (method, seed), curve in runs.items():
        run = {"method": method, "seed": seed, "curve": curve}
        (tmp_path / "seed_runs" / f"{method}_seed{seed}.json").write_text(json.dumps(run))
    terms = level_terms(tmp_path, n_levels=2)
    assert terms["fast"]["ppo_rounds"] == [2, 3] and terms["fast"]["arm_rounds"] == [2, 2]
    assert terms["fast"]["terms"] == pytest.approx([0, 1 / 3])
    assert terms["short"]["arm_rounds"] == [1, 4] and terms["short"]["terms"] == pytest.approx([0.5, -1 / 3])
    # the same SE_ave as the library's metric
    eff = efficiency(np.array(runs[("short", 0)]), np.array(runs[("ppo", 0)]), n_levels=2)
    assert np.mean(terms["short"]["terms"]) == pytest.approx(eff.se_ave)
    assert level_lines(tmp_path)[0].startswith(tmp_path.name)
