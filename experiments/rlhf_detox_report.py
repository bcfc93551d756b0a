"""Tables of the detox / corruption study from the per-run JSON files of ``experiments/rlhf_detox.py``.

For each scenario and seed, the true-success curve (clean share of the training batch for detox, exact
accuracy for corruption) is smoothed with a trailing mean; GRPO's final level is its smoothed value at
the last step. Per arm: steps and seconds to GRPO's final level (censored at the run's length when never
reached), that step count over GRPO's own, SE_ave / SE_peak / RT_peak against GRPO
(:func:`rlattr.eval.efficiency.efficiency`), final true success on held-out prompts, kept fraction, and
precision / recall of the dropped pairs against the ground-truth labels (toxic / corrupted pair), also
restricted to the harmful pairs (labelled, positive advantage). Differences to GRPO and to random drop
get paired bootstrap 95% intervals over seeds.

Run: ``python experiments/rlhf_detox_report.py --out docs/results/rlhf_detox/runs --doc-dir docs/results/rlhf_detox``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from rlattr.core.store import atomic_write_bytes, save_json
from rlattr.eval.efficiency import efficiency, rounds_to_reach, trailing_mean

ARM_ORDER = ("grpo", "iif_p1", "random_p1", "iif_p0.5", "iif_p0.25", "iif_p1_small", "grpo_clean")


def load(out: Path, scenario: str) -> tuple[dict[str, Any], dict[str, dict[int, dict[str, Any]]]]:
    """(setup document, {arm: {seed: run}}) of one scenario."""
    setup = json.loads((out / f"{scenario}__setup.json").read_text())
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(out.glob(f"{scenario}__*__seed*.json")):
        run = json.loads(path.read_text())
        runs.setdefault(run["arm"], {})[int(run["seed"])] = run
    return setup, runs


def per_seed(run: dict[str, Any], base: dict[str, Any], window: int) -> dict[str, float]:
    """The summaries of one arm-seed run against the GRPO run of the same seed."""
    curve = trailing_mean(np.asarray(run["true_success"], float), window)
    bcurve = trailing_mean(np.asarray(base["true_success"], float), window)
    secs, bsecs = np.asarray(run["seconds"], float), np.asarray(base["seconds"], float)
    level = float(bcurve[-1])
    n = float(rounds_to_reach(curve, np.array([level]))[0])
    n_base = float(rounds_to_reach(bcurve, np.array([level]))[0])
    reached = np.isfinite(n)
    n_cens = n if reached else float(curve.size)
    eff = efficiency(curve, bcurve, method_seconds=secs, base_seconds=bsecs)
    out = {
        "final true success, held-out (sampled)": run["eval_success"],
        "final true success, training prompts (sampled)": run["train_success"],
        "true success, last 5 steps (training batch)": float(np.mean(run["true_success"][-5:])),
        "learned/given reward, last 5 steps": float(np.mean(run["reward"][-5:])),
        "GRPO's final level (smoothed)": level,
        "steps to GRPO's final level": n_cens,
        "... over GRPO's own steps": n_cens / n_base,
        "reached GRPO's final level": float(reached),
        "seconds to GRPO's final level": float(secs[int(n_cens) - 1]),
        "wall-clock s (whole run)": float(secs[-1]),
        "SE_ave vs GRPO": eff.se_ave,
        "SE_peak vs GRPO": eff.se_peak,
        "RT_peak vs GRPO": eff.rt_peak,
        "kept fraction": float(np.mean(run["kept_fraction"])) if run["kept_fraction"] else 1.0,
    }
    for key in ("corrupted_success", "clean_train_success"):
        if key in run:
            out[f"final true success, {key.removesuffix('_success')} prompts"] = run[key]
    d = run.get("drops") or {}
    if d:
        tot = {k: float(np.sum(v)) for k, v in d.items()}
        out.update(
            {
                "labelled share of the batch": tot["lab"] / tot["n"],
                "precision: dropped that are labelled": tot["dropped_lab"] / max(tot["dropped"], 1),
                "recall: labelled that are dropped": tot["dropped_lab"] / max(tot["lab"], 1),
                "harmful share of the batch": tot["harm"] / tot["n"],
                "precision: dropped that are harmful": tot["dropped_harm"] / max(tot["dropped"], 1),
                "recall: harmful that are dropped": tot["dropped_harm"] / max(tot["harm"], 1),
            }
        )
    return out


def paired_ci(diffs: np.ndarray, n_boot: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-seed differences and its percentile 95% interval from resampling seeds."""
    d = np.asarray(diffs, float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, (n_boot, d.size))].mean(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi)


def scenario_tables(out: Path, scenario: str, window: int) -> tuple[str, dict[str, Any]]:
    setup, runs = load(out, scenario)
    base = runs["grpo"]
    arms = [a for a in ARM_ORDER if a in runs]
    stats = {
        a: {s: per_seed(r, base[s], window) for s, r in sorted(runs[a].items()) if s in base} for a in arms
    }
    keys = list(dict.fromkeys(k for a in arms for s in stats[a].values() for k in s))
    head = "| metric | " + " | ".join(f"{a} (n={len(stats[a])})" for a in arms) + " |"
    lines = [head, "|---|" + "---|" * len(arms)]
    for k in keys:
        cells = []
        for a in arms:
            v = np.array([s[k] for s in stats[a].values() if k in s], float)
            skip = a == "grpo" and ("vs GRPO" in k or "GRPO's own" in k)
            if skip or v.size == 0:
                cells.append("")
            elif not np.isfinite(
                v
            ).all():  # efficiency is undefined when GRPO's curve never rises above its start
                cells.append(f"n/a ({int((~np.isfinite(v)).sum())} of {v.size} seeds undefined)")
            else:
                cells.append(f"{v.mean():.3g} +- {v.std():.2g}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    diff_keys = [
        "final true success, held-out (sampled)",
        "final true success, training prompts (sampled)",
        "true success, last 5 steps (training batch)",
        "steps to GRPO's final level",
    ] + [k for k in keys if k.startswith("final true success, corrupted")]
    dl = ["| arm | vs | " + " | ".join(diff_keys) + " |", "|---|---|" + "---|" * len(diff_keys)]
    diffs: dict[str, Any] = {}
    for a in arms:
        for ref in ("grpo", "random_p1"):
            if a == ref or ref not in stats or a == "grpo":
                continue
            seeds = sorted(set(stats[a]) & set(stats[ref]))
            cells = []
            for k in diff_keys:
                m, lo, hi = paired_ci(np.array([stats[a][s][k] - stats[ref][s][k] for s in seeds]))
                diffs[f"{a} - {ref}: {k}"] = {"mean": m, "lo": lo, "hi": hi, "seeds": seeds}
                cells.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            dl.append(f"| {a} | {ref} (n={len(seeds)}) | " + " | ".join(cells) + " |")
    text = (
        "\n".join(lines)
        + "\n\nPaired differences (mean over seeds [bootstrap 95% interval]):\n\n"
        + "\n".join(dl)
    )
    return text + "\n", {"setup": setup, "per_seed": stats, "differences": diffs}


def plot(out: Path, scenario: str, window: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, runs = load(out, scenario)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for arm in [a for a in ARM_ORDER if a in runs]:
        curves = np.stack(
            [trailing_mean(np.asarray(r["true_success"], float), window) for r in runs[arm].values()]
        )
        x = np.arange(1, curves.shape[1] + 1)
        ax.plot(x, curves.mean(0), label=f"{arm} ({len(curves)} seeds)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(f"true {'clean share' if scenario == 'detox' else 'accuracy'} ({window}-step mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", default="docs/results/rlhf_detox/runs")
    p.add_argument("--doc-dir", default="docs/results/rlhf_detox")
    p.add_argument("--smooth", type=int, default=5)
    args = p.parse_args()
    doc = Path(args.doc_dir)
    doc.mkdir(parents=True, exist_ok=True)
    for scenario in ("detox", "corrupt"):
        if not (Path(args.out) / f"{scenario}__setup.json").exists():
            continue
        text, summary = scenario_tables(Path(args.out), scenario, args.smooth)
        atomic_write_bytes(doc / f"{scenario}_table.md", text.encode())
        save_json(doc / f"{scenario}_summary.json", summary)
        plot(Path(args.out), scenario, args.smooth, doc / f"{scenario}_true_success.png")
        print(f"## {scenario}\n{text}")


if __name__ == "__main__":
    main()
