"""Reproduce the IIF sample-efficiency table (Hu et al. 2025, Algorithm 1) with SB3 PPO.

For each config (configs/iif/*.yaml) this runs standard PPO, IIF (neg-bottom p) and the
random-drop baseline for N seeds in parallel processes, evaluates every round's policy on
stochastic episodes, and writes into ``<out>/<name>/``::

    seed_runs/<method>_seed<k>.json   one run (skipped when it exists: the study is resumable)
    results.json                 SE_ave, SE_peak, RT_peak with bootstrap CIs, config, versions, commit
    curves.png                   seed-mean learning curves with 95 % bootstrap bands
    table.md                     the Markdown table

Examples::

    python experiments/iif_sample_efficiency.py configs/iif/frozenlake.yaml --seeds 5 --workers 2
    python experiments/iif_sample_efficiency.py configs/iif/*.yaml --report-only --table docs/t.md
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from iif_envs import ARM_FORMS, OPTIMIZERS, adaptive_f, arm_order, run_one, weighting  # noqa: E402

from rlattr.core.store import atomic_write_bytes, save_json  # noqa: E402
from rlattr.eval.efficiency import bootstrap_efficiency, efficiency, mean_and_band  # noqa: E402
from rlattr.provenance import provenance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {"name", "env_id", "rounds", "ppo", "optimizer", "policy", "iif", "eval"}
OPTIONAL = {"env_kwargs", "wrapper", "n_envs", "net_arch", "image_scale", "metric", "log_every", "notes"}
PAPER = {  # SE_ave, SE_peak, RT_peak in % (mean +- std over 5 seeds), REFERENCE.md section 1
    "FrozenLake-v1": ("34.0 ± 2.0", "19.2 ± 5.9", "29.5 ± 2.9"),
    "Acrobot-v1": ("36.7 ± 6.5", "48.5 ± 0.8", "55.2 ± 1.0"),
    "MiniGrid-Empty-8x8-v0": ("65.8 ± 3.3", "61.7 ± 4.1", "69.1 ± 1.7"),
    "highway-v0": ("37.7 ± 6.1", "55.1 ± 2.9", "59.9 ± 0.7"),
    "LunarLander-v3": ("26.0 ± 1.8", "39.7 ± 3.7", "44.9 ± 2.5"),
    "BipedalWalker-v3": ("31.0 ± 8.7", "26.2 ± 8.0", "29.2 ± 0.7"),
}


def load_config(path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Read and check a YAML config; ``overrides`` (rounds, n_steps, eval episodes) win."""
    cfg = yaml.safe_load(Path(path).read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path}: expected a mapping at the top level, got {type(cfg).__name__}")
    unknown = set(cfg) - REQUIRED - OPTIONAL
    missing = REQUIRED - set(cfg)
    if unknown or missing:
        raise ValueError(f"config {path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    if cfg["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"config {path}: optimizer {cfg['optimizer']!r}; supported: {sorted(OPTIMIZERS)}")
    if cfg["policy"] not in ("mlp", "minigrid-cnn"):
        raise ValueError(f"config {path}: policy {cfg['policy']!r}; supported: 'mlp', 'minigrid-cnn'")
    cfg.setdefault("n_envs", 1)
    cfg.setdefault("net_arch", [64, 64])
    cfg.setdefault("metric", {"n_levels": 20, "n_boot": 1000})
    cfg["eval"].setdefault("n_envs", 16)
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "episodes":
            cfg["eval"]["episodes"] = value
        elif key == "n_steps":
            cfg["ppo"]["n_steps"] = value
        else:
            cfg[key] = value
    return cfg


def _run_file(out: Path, method: str, seed: int) -> Path:
    return out / "seed_runs" / f"{method}_seed{seed}.json"


def _worker(cfg: dict[str, Any], method: str, seed: int, path: str) -> str:
    import time

    started = time.time()
    result = run_one(cfg, method, seed)
    result.update(config=cfg, provenance=provenance(), started=started, finished=time.time())
    save_json(path, result)
    return path


def run_study(cfg: dict[str, Any], out: Path, seeds: list[int], methods: list[str], workers: int) -> None:
    """Run every missing (method, seed) of the study, at most ``workers`` processes at a time."""
    todo = [(m, s) for s in seeds for m in methods if not _run_file(out, m, s).exists()]
    done = len(seeds) * len(methods) - len(todo)
    print(f"[{cfg['name']}] {len(todo)} runs to do, {done} already done", flush=True)
    if not todo:
        return
    if workers == 1:
        for m, s in todo:
            _worker(cfg, m, s, str(_run_file(out, m, s)))
            print(f"[{cfg['name']}] finished {m} seed {s}", flush=True)
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_worker, cfg, m, s, str(_run_file(out, m, s))): (m, s) for m, s in todo}
        for fut in as_completed(futures):
            m, s = futures[fut]
            fut.result()
            print(f"[{cfg['name']}] finished {m} seed {s}", flush=True)


def _ordered(methods: list[str] | dict[str, Any]) -> list[str]:
    """Study arms in table order: METHODS first, then the parameterised arms by their number."""
    return sorted(methods, key=arm_order)


def _stack(runs: list[dict[str, Any]], key: str) -> np.ndarray:
    n = min(len(r[key]) for r in runs)
    return np.array([r[key][:n] for r in runs], dtype=float)


def _load_runs(out: Path) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((out / "seed_runs").glob("*.json")):
        run = json.loads(path.read_text())
        # Runs written before "started"/"finished" were recorded: the file time ends the run.
        run.setdefault("finished", path.stat().st_mtime)
        run.setdefault("started", run["finished"] - run["seconds"][-1] - run.get("eval_seconds", 0.0))
        runs.setdefault(run["method"], []).append(run)
    return {m: sorted(group, key=lambda r: r["seed"]) for m, group in runs.items()}


def _timing(group: list[dict[str, Any]], base: list[dict[str, Any]]) -> str:
    """Which clock RT_peak may use: "wall" when every seed's pair ran side by side (same load),
    else "cpu" when every run recorded process CPU time, else "none"."""

    def overlap(a: dict[str, Any], b: dict[str, Any]) -> float:
        shared = min(a["finished"], b["finished"]) - max(a["started"], b["started"])
        return shared / max(1e-9, min(a["finished"] - a["started"], b["finished"] - b["started"]))

    if all(overlap(a, b) >= 0.5 for a, b in zip(group, base, strict=True)):
        return "wall"
    if all("cpu_seconds" in r for r in [*group, *base]):
        return "cpu"
    return "none"


def compare(
    group: list[dict[str, Any]],
    ppo: list[dict[str, Any]],
    metric: dict[str, Any],
    smooth: int = 1,
    clock_runs: list[dict[str, Any]] | None = None,
    clock_name: str = "iif",
) -> dict[str, Any]:
    """Paired efficiency of a method against PPO on their common seeds (bootstrap over seeds).

    ``clock_runs``: take the method's seconds from these runs (same seeds) instead of its own: an
    adaptive arm does the same work per round as IIF (one scoring pass, a different cut), so IIF's
    stored clock, measured beside PPO, stands in when the arm itself ran on a busier machine.
    ``clock_name`` labels that clock in the result (``"iif"``, ``"ppo+scoring"``).
    """
    seeds = {r["seed"] for r in group} & {r["seed"] for r in ppo}
    if clock_runs is not None:
        seeds &= {r["seed"] for r in clock_runs}
    common = sorted(seeds)
    mine = [r for r in group if r["seed"] in common]
    base = [r for r in ppo if r["seed"] in common]
    timed = mine if clock_runs is None else [r for r in clock_runs if r["seed"] in common]
    timing = _timing(timed, base)
    clock = "cpu_seconds" if timing == "cpu" else "seconds"
    eff = bootstrap_efficiency(
        _stack(mine, "curve"),
        _stack(base, "curve"),
        method_seconds=_stack(timed, clock) if timing != "none" else None,
        base_seconds=_stack(base, clock) if timing != "none" else None,
        n_levels=int(metric.get("n_levels", 20)),
        n_boot=int(metric.get("n_boot", 1000)),
        paired=True,
        smooth=smooth,
    )
    return {
        **eff,
        "seeds": common,
        "timing": timing,
        "smooth": smooth,
        "clock": clock_name if clock_runs else "own",
    }


def ppo_clock_plus_scoring(group: list[dict[str, Any]], ppo: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Clock runs for an arm that trains on as many minibatches as PPO (``weighting`` ``"refill"`` or
    ``"soft"``): the PPO run of the same seed, with the arm's own scoring seconds of rounds 0..k
    added to its seconds (wall and CPU) at round k. The arm's own clock carries the machine's load;
    its work per round is PPO's plus one scoring pass, which is what this clock counts (the scoring
    seconds as measured, loaded or not)."""
    by_seed = {r["seed"]: r for r in ppo}
    out = []
    for run in group:
        base = by_seed.get(run["seed"])
        if base is None:
            continue
        extra = np.cumsum(run.get("score_seconds") or [0.0])
        n = min(len(base["seconds"]), len(extra))
        timed = {**base, "seconds": list(np.asarray(base["seconds"][:n]) + extra[:n])}
        if "cpu_seconds" in base:
            timed["cpu_seconds"] = list(np.asarray(base["cpu_seconds"][:n]) + extra[:n])
        out.append(timed)
    return out


def aggregate(cfg: dict[str, Any], out: Path) -> dict[str, Any] | None:
    """Metrics of every method against PPO from the finished runs; writes results.json, PNG, table."""
    runs = _load_runs(out)
    if "ppo" not in runs:
        return None
    metric = cfg["metric"]
    base = _stack(runs["ppo"], "curve")
    results: dict[str, Any] = {"name": cfg["name"], "env_id": cfg["env_id"], "config": cfg, "methods": {}}
    for method, group in runs.items():
        curves, secs = _stack(group, "curve"), _stack(group, "seconds")
        entry: dict[str, Any] = {
            "seeds": [r["seed"] for r in group],
            "peak_of_mean_curve": float(curves.mean(0).max()),
            "final_mean": float(curves[:, -5:].mean()),
            "train_seconds_mean": float(secs[:, -1].mean()),
            "kept_fraction_mean": float(np.mean([np.mean(r["kept_fraction"]) for r in group]))
            if group[0]["kept_fraction"]
            else 1.0,
        }
        if method != "ppo":
            entry["efficiency_vs_ppo"] = compare(group, runs["ppo"], metric)
            window = int(metric.get("smooth", 5))
            entry["efficiency_vs_ppo_smoothed"] = compare(group, runs["ppo"], metric, smooth=window)
        if method not in ("ppo", "iif") and "iif" in runs:
            # the variant against the paper's IIF on their common seeds (paired bootstrap)
            entry["efficiency_vs_iif"] = compare(group, runs["iif"], metric)
            # the paper's IIF against PPO on this arm's seeds only, the row to read the arm beside
            mine = {r["seed"] for r in group}
            entry["iif_vs_ppo_same_seeds"] = compare(
                [r for r in runs["iif"] if r["seed"] in mine], runs["ppo"], metric
            )
        if method.startswith("iif-adaptive") and weighting(method) == "drop" and "iif" in runs:
            entry["efficiency_vs_ppo_iif_clock"] = compare(group, runs["ppo"], metric, clock_runs=runs["iif"])
        if weighting(method) != "drop":
            entry["efficiency_vs_ppo_ppo_clock"] = compare(
                group,
                runs["ppo"],
                metric,
                clock_runs=ppo_clock_plus_scoring(group, runs["ppo"]),
                clock_name="ppo+scoring",
            )
        dropped = [n for r in group for n in r.get("n_dropped", [])]
        if dropped:
            entry["dropped_per_round_mean"] = float(np.mean(dropped))
        epoch_kept = [k for r in group for k in r.get("epoch_kept_fraction", [])]
        if epoch_kept:  # rescore="epoch[-fresh]": the share of records the average epoch trained on
            entry["epoch_kept_fraction_mean"] = float(np.mean(epoch_kept))
            later = [sum(d) for r in group for d in r.get("epoch_dropped", [])]
            entry["epoch_dropped_per_round_mean"] = float(np.mean(later))
            per_epoch = [n for r in group for d in r.get("epoch_dropped", []) for n in d]
            entry["epoch_dropped_per_epoch_mean"] = float(np.mean(per_epoch))
        tails = [t for r in group for t in r.get("score_tails", [])]
        if tails:
            entry["score_tails_mean"] = {k: float(np.nanmean([t[k] for t in tails])) for k in tails[0]}
        results["methods"][method] = entry
    results["noise_floor"] = noise_floor(base, n_levels=int(metric.get("n_levels", 20)))
    results["provenance"] = provenance()
    save_json(out / "results.json", results)
    plot_curves(runs, out / "curves.png", cfg)
    atomic_write_bytes(out / "table.md", markdown_table([results]).encode())
    return results


def noise_floor(base: np.ndarray, *, n_levels: int) -> dict[str, float] | None:
    """SE of one half of the PPO seeds against the other half: what seed noise alone produces.

    ``base``: ``float[n_seeds, n_rounds]``; even-indexed seeds against odd-indexed ones, both ways.
    """
    if len(base) < 2:
        return None
    even, odd = base[0::2].mean(0), base[1::2].mean(0)
    a, b = efficiency(even, odd, n_levels=n_levels), efficiency(odd, even, n_levels=n_levels)
    return {"se_ave_even_vs_odd": a.se_ave, "se_ave_odd_vs_even": b.se_ave, "se_peak_even_vs_odd": a.se_peak}


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path, cfg: dict[str, Any]) -> None:
    """Seed-mean learning curves with 95 % bootstrap bands, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in _ordered(runs):
        band = mean_and_band(_stack(runs[method], "curve"))
        x = np.arange(1, band.shape[1] + 1)
        ax.plot(x, band[0], label=f"{method} ({len(runs[method])} seeds)")
        ax.fill_between(x, band[1], band[2], alpha=0.25)
    ax.set_xlabel("round")
    episodes = int(cfg["eval"]["episodes"])
    source = f"{episodes} stochastic episodes" if episodes else "episodes of the next rollout"
    ax.set_ylabel(f"mean return ({source})")
    ax.set_title(cfg["env_id"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(stats: dict[str, float]) -> str:
    v, sd = 100 * stats["value"], 100 * stats["std"]
    return f"{v:.1f} ± {sd:.1f} [{100 * stats['lo']:.0f}, {100 * stats['hi']:.0f}]"


def markdown_table(all_results: list[dict[str, Any]]) -> str:
    """Our SE_ave / SE_peak / RT_peak (value ± bootstrap std [95 % CI], %) beside the paper's."""
    lines = [
        "| env | method | seeds | SE_ave % | SE_peak % | RT_peak % | levels reached | kept | paper SE_ave / SE_peak / RT_peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in all_results:
        paper = " / ".join(PAPER.get(res["env_id"], ("-", "-", "-")))
        keys = (
            "efficiency_vs_ppo",
            "efficiency_vs_ppo_smoothed",
            "efficiency_vs_iif",
            "efficiency_vs_ppo_iif_clock",
            "efficiency_vs_ppo_ppo_clock",
        )
        rows = [(m, k) for m in _ordered(res["methods"]) if m != "ppo" for k in keys]
        for method, key in rows:
            entry = res["methods"].get(method)
            if entry is None or key not in entry:
                continue
            eff = entry[key]
            label = (
                method if eff.get("smooth", 1) == 1 else f"{method}, curves smoothed ({eff['smooth']} rounds)"
            )
            if key == "efficiency_vs_iif":
                label = f"{method} **vs iif** (paired, not vs PPO)"
            if key == "efficiency_vs_ppo_iif_clock":
                label = f"{method}, RT_peak on IIF's clock"
            if key == "efficiency_vs_ppo_ppo_clock":
                label = f"{method}, RT_peak on PPO's clock plus its scoring"
            rt = _fmt(eff["rt_peak"]) + (" (cpu)" if eff["timing"] == "cpu" else "")
            if eff["timing"] == "none":
                rt = "n/a (not run beside PPO)"
            kwargs = res["config"].get("env_kwargs") or {}
            env = res["env_id"] + "".join(f" {k}={v}" for k, v in kwargs.items())
            lines.append(
                f"| {env} | {label} | {len(eff['seeds'])} | {_fmt(eff['se_ave'])} | "
                f"{_fmt(eff['se_peak'])} | {rt} | {100 * eff['levels_reached']['value']:.0f} % | "
                f"{100 * entry['kept_fraction_mean']:.0f} % | {paper if label == 'iif' else ''} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", type=Path, help="configs/iif/*.yaml")
    ap.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument(
        "--methods",
        default="ppo,iif,random",
        help=f"comma-separated arms: {ARM_FORMS}",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=2,
        help="parallel processes (torch uses 1 thread each); 1 runs in this process",
    )
    ap.add_argument("--out", type=Path, default=REPO / "results" / "iif")
    ap.add_argument("--rounds", type=int, help="override the config's rounds")
    ap.add_argument("--n-steps", type=int, help="override PPO n_steps (smoke tests)")
    ap.add_argument("--episodes", type=int, help="override the evaluation episodes per round")
    ap.add_argument("--report-only", action="store_true", help="aggregate finished runs, run nothing")
    ap.add_argument("--table", type=Path, help="also write one Markdown table over all configs here")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = []
    for m in methods:
        try:
            adaptive_f({"iif": {}}, m)
        except ValueError:
            bad.append(m)
    if bad or args.seeds < 1 or args.workers < 1:
        ap.error(f"--methods {bad} not in {ARM_FORMS}, or --seeds/--workers < 1")
    overrides = {"rounds": args.rounds, "n_steps": args.n_steps, "episodes": args.episodes}
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    collected = []
    for path in args.configs:
        cfg = load_config(path, overrides)
        out = args.out / cfg["name"]
        if not args.report_only:
            run_study(cfg, out, seeds, methods, args.workers)
        res = aggregate(cfg, out)
        if res is None and args.report_only and (out / "results.json").is_file():
            # results made before per-seed runs were kept in the repository: show them as stored
            res = json.loads((out / "results.json").read_text())
            commit = str(res.get("provenance", {}).get("git_commit", "unknown"))[:10]
            print(f"[{cfg['name']}] no per-seed runs in {out / 'seed_runs'}: stored results.json ({commit})")
        if res is not None:
            collected.append(res)
            print((out / "table.md").read_text(), flush=True)
    if args.report_only and not collected:
        raise SystemExit(
            f"--report-only: no finished PPO run under {args.out}/<name>/seed_runs/ for "
            f"{[str(p) for p in args.configs]}; run the study first (without --report-only), "
            "or point --out at the folder that holds its runs"
        )
    if args.table is not None and collected:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.table, markdown_table(collected).encode())


if __name__ == "__main__":
    main()
