"""The IIF variants table of docs/results/iif.md from the study's results.json files (issue 20).

One row per arm and environment: SE_ave, SE_peak and RT_peak against PPO (paired bootstrap over
the arm's seeds, 95 % interval), the paper's IIF against PPO on the same seeds, the arm against IIF
(paired), the kept fraction, records dropped per round and how concentrated the negative scores
are (m90: the fraction of the negatives, most negative first, that carries 90 % of their sum).

    python experiments/iif_sample_efficiency.py configs/iif/frozenlake_noslip.yaml \
        configs/iif/acrobot.yaml --report-only
    python experiments/iif_variants_table.py results/iif/frozenlake-noslip results/iif/acrobot
    python experiments/iif_variants_table.py --per-seed results/iif/acrobot   # each seed against its PPO seed
    python experiments/iif_variants_table.py --levels results/iif/acrobot     # SE_ave level by level
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from rlattr.eval.efficiency import efficiency, level_rounds


def _ci(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "-"
    return f"{100 * stats['value']:.1f} [{100 * stats['lo']:.0f}, {100 * stats['hi']:.0f}]"


def _rt(eff: dict[str, Any] | None) -> str:
    if eff is None or eff["timing"] == "none":
        return "-"
    return _ci(eff["rt_peak"]) + (" cpu" if eff["timing"] == "cpu" else " wall")


def _borrowed(entry: dict[str, Any]) -> str:
    """RT_peak on a clock the arm borrows: IIF's (adaptive arms) or PPO's plus the arm's scoring
    (``weighting`` refill / soft), marked ``+scoring``."""
    if "efficiency_vs_ppo_ppo_clock" in entry:
        return _rt(entry["efficiency_vs_ppo_ppo_clock"]) + " (PPO's +scoring)"
    return _rt(entry.get("efficiency_vs_ppo_iif_clock"))


def rows(results: dict[str, Any]) -> list[str]:
    """Markdown rows of one environment's results.json (every arm but PPO)."""
    kwargs = results["config"].get("env_kwargs") or {}
    env = results["env_id"] + "".join(f" {k}={v}" for k, v in kwargs.items())
    out = []
    for method, entry in results["methods"].items():
        if method == "ppo":
            continue
        eff = entry["efficiency_vs_ppo"]
        same = entry.get("iif_vs_ppo_same_seeds")
        vs_iif = entry.get("efficiency_vs_iif")
        tails = entry.get("score_tails_mean") or {}
        dropped = entry.get("dropped_per_round_mean")
        m90 = f"{100 * tails['m90']:.0f} %" if "m90" in tails else "-"
        kept = f"{100 * entry['kept_fraction_mean']:.0f} %"
        if "epoch_kept_fraction_mean" in entry:  # rescore="epoch[-fresh]": epoch 1, then the epoch average
            kept += f" (epoch mean {100 * entry['epoch_kept_fraction_mean']:.0f} %)"
            if method == "iif-epoch-fresh":  # each later epoch drops from all the round's records
                dropped_txt = (
                    f"{dropped:.0f}, then {entry['epoch_dropped_per_epoch_mean']:.0f} per later epoch"
                )
            else:
                dropped_txt = f"{dropped:.0f} + {entry['epoch_dropped_per_round_mean']:.0f} later"
        else:
            dropped_txt = f"{dropped:.0f}" if dropped else "-"
        out.append(
            f"| {env} | {method} | {len(eff['seeds'])} | {_ci(eff['se_ave'])} | "
            f"{_ci(same['se_ave']) if same else '-'} | {_ci(vs_iif['se_ave']) if vs_iif else '-'} | "
            f"{_ci(eff['se_peak'])} | {_rt(eff)} | {_borrowed(entry)} | "
            f"{kept} | {dropped_txt} | "
            f"{m90} |"
        )
    return out


def per_seed(folder: Path, n_levels: int = 20) -> dict[str, dict[int, float]]:
    """SE_ave (%) of every arm's run against the PPO run of the same seed, from ``seed_runs/``:
    ``{arm: {seed: se_ave}}``, arms and seeds in sorted order (runs without a PPO seed are left out)."""
    runs = _curves(folder)
    ppo = runs.pop("ppo", {})
    return {
        arm: {
            s: 100 * efficiency(np.asarray(c), np.asarray(ppo[s]), n_levels=n_levels).se_ave
            for s, c in sorted(curves.items())
            if s in ppo
        }
        for arm, curves in sorted(runs.items())
    }


def per_seed_lines(folder: Path) -> list[str]:
    """One line per arm: its per-seed SE_ave against PPO, and how often it beats IIF's same seed."""
    table = per_seed(folder)
    iif = table.get("iif", {})
    out = [f"{folder.name}:"]
    for arm, by_seed in table.items():
        cells = " ".join(f"s{s} {v:.1f}" for s, v in by_seed.items())
        common = [s for s in by_seed if s in iif]
        if arm != "iif" and common:
            ahead = sum(by_seed[s] > iif[s] for s in common)
            cells += f"  (ahead of IIF on {ahead} of {len(common)} seeds)"
        out.append(f"  {arm}: {cells}")
    return out


def _curves(folder: Path) -> dict[str, dict[int, list[float]]]:
    runs: dict[str, dict[int, list[float]]] = {}
    for path in sorted((folder / "seed_runs").glob("*_seed*.json")):
        run = json.loads(path.read_text())
        runs.setdefault(str(run["method"]), {})[int(run["seed"])] = run["curve"]
    return runs


def level_terms(folder: Path, n_levels: int = 20) -> dict[str, dict[str, list[float]]]:
    """SE_ave's terms level by level, on the seed-mean curves of each arm and PPO over their common
    seeds: ``{arm: {"ppo_rounds", "arm_rounds", "terms"}}`` with ``terms[l] = 1 - m_arm / m_ppo``
    (a level the arm never reaches is censored at its budget, as in :func:`efficiency`)."""
    runs = _curves(folder)
    ppo = runs.pop("ppo", {})
    out = {}
    for arm, curves in sorted(runs.items()):
        seeds = sorted(set(curves) & set(ppo))
        if not seeds:
            continue
        mine = np.mean([curves[s] for s in seeds], axis=0)
        base = np.mean([ppo[s] for s in seeds], axis=0)
        m_base, m_arm, _ = level_rounds(mine, base, n_levels)
        out[arm] = {
            "ppo_rounds": m_base.tolist(),
            "arm_rounds": m_arm.tolist(),
            "terms": (1 - m_arm / m_base).tolist(),
        }
    return out


def level_lines(folder: Path) -> list[str]:
    """Per arm: SE_ave's 20 level terms (%), and SE_ave without the top level."""
    out = [f"{folder.name}: level terms 1 - m_arm / m_ppo (%), levels 1..20 of PPO's seed-mean curve"]
    for arm, t in level_terms(folder).items():
        terms = 100 * np.asarray(t["terms"])
        out.append(
            f"  {arm}: "
            + " ".join(f"{v:.0f}" for v in terms)
            + f"  | SE_ave {terms.mean():.1f}, without the top level {terms[:-1].mean():.1f}"
        )
    return out


HEADER = (
    "| env | arm | seeds | SE_ave % vs PPO | IIF's SE_ave %, same seeds | SE_ave % vs IIF (paired) | "
    "SE_peak % | RT_peak % (own clock) | RT_peak % (IIF's clock, or PPO's +scoring) | kept | dropped / round | m90 |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="results/iif/<env> folders with results.json")
    ap.add_argument(
        "--per-seed", action="store_true", help="each run's SE_ave against the PPO run of its seed instead"
    )
    ap.add_argument("--levels", action="store_true", help="SE_ave's terms level by level instead")
    args = ap.parse_args(argv)
    if args.levels:
        print("\n".join(line for folder in args.folders for line in level_lines(folder)))
        return
    if args.per_seed:
        print("\n".join(line for folder in args.folders for line in per_seed_lines(folder)))
        return
    lines = [HEADER]
    for folder in args.folders:
        lines += rows(json.loads((folder / "results.json").read_text()))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
