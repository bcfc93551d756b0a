"""Benchmark: InfluenceCallback's attribution time per PPO round against the round itself.

For each environment (CartPole-v1, LunarLander-v3), SB3 PPO with the paper's settings (n_steps 2048,
batch 64, 10 epochs, MlpPolicy 64-64) runs ``--rounds`` rounds, ``--repeats`` times (seeds 0, 1,
...), each in a fresh process pinned to one torch thread. Per round we time the rollout (SB3's
``collect_rollouts`` minus the callback's own time), ``train()`` and the attribution (buffer copy,
target gradient, JVP scores of all 2048 records; return target, actor parameters; the variant
"+ TensorBoard + snapshots" also writes the attr/* events and a full snapshot every round, as the
callback does by default when it has a run folder). torch's one-off
forward-AD initialisation (~0.5-1 s per process) is paid in the callback's ``_init_callback`` and
timed apart ("init s"); the first round's attribution is reported apart too, and the table shows
medians over the remaining rounds. Peak memory: the process's peak RSS with the callback against the same
without it. LunarLander needs Box2D (the ``envs`` extra; ``make bench`` installs it).

    python experiments/bench_sb3_attribution.py     # table to stdout and experiments/out/
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from fresh_process import run_in_fresh_process

from rlattr.core.store import atomic_write_bytes, save_json
from rlattr.provenance import provenance

ENVS = ("CartPole-v1", "LunarLander-v3")


def _one_run(env_id: str, seed: int, rounds: int, with_callback: bool, by_group: bool, full: bool = False):
    import tempfile

    import torch

    torch.set_num_threads(1)
    from stable_baselines3 import PPO

    from rlattr.callbacks.sb3.influence import InfluenceCallback

    model = PPO("MlpPolicy", env_id, n_steps=2048, batch_size=64, n_epochs=10, seed=seed, device="cpu")
    times: dict[str, list[float]] = {"collect": [], "train": [], "attr": []}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            times[name].append(time.perf_counter() - start)
            return out

        return wrapper

    model.collect_rollouts = timed("collect", model.collect_rollouts)  # type: ignore[method-assign]
    model.train = timed("train", model.train)  # type: ignore[method-assign]
    callback = None
    if with_callback:
        if full:  # the callback as a user runs it: TensorBoard attr/* events and a snapshot every round
            log_dir = tempfile.mkdtemp(prefix="bench_sb3_attr_")
            callback = InfluenceCallback(target="return", by_group=by_group, log_dir=log_dir)
        else:
            callback = InfluenceCallback(target="return", tensorboard=False, by_group=by_group)
        # the callback's whole per-round cost: scoring, and (full) TensorBoard events and the snapshot
        callback._on_rollout_end = timed("attr", callback._on_rollout_end)  # type: ignore[method-assign]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    init_s = 0.0
    if callback is not None:
        start = time.perf_counter()
        torch.func.jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),))  # what _init_callback pays
        init_s = time.perf_counter() - start
    model.learn(rounds * 2048, callback=callback)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    attr = times["attr"] or [0.0] * len(times["collect"])
    rollout = [c - a for c, a in zip(times["collect"], attr, strict=True)]
    return {
        "rollout": rollout,
        "train": times["train"],
        "attr": attr,
        "init_s": init_s,
        "peak_kib": peak_rss,
        "base_kib": base_rss,
    }


def run_isolated(*args: Any) -> dict[str, Any]:
    return run_in_fresh_process(_one_run, *args)


def summarise(env_id: str, runs: list[dict[str, Any]], plain: dict[str, Any]) -> dict[str, Any]:
    rest = {k: [x for r in runs for x in r[k][1:]] for k in ("rollout", "train", "attr")}
    rounds = [a + b for a, b in zip(rest["rollout"], rest["train"], strict=True)]
    ratios = [a / r for a, r in zip(rest["attr"], rounds, strict=True)]
    return {
        "env": env_id,
        "rounds_measured": len(rounds),
        "rollout_s": statistics.median(rest["rollout"]),
        "train_s": statistics.median(rest["train"]),
        "round_s": statistics.median(rounds),
        "attr_s": statistics.median(rest["attr"]),
        "attr_ratio_pct": 100 * statistics.median(ratios),
        "attr_ratio_max_pct": 100 * max(ratios),
        "first_round_attr_s": statistics.median(r["attr"][0] for r in runs),
        "init_s": statistics.median(r["init_s"] for r in runs),
        "peak_rss_mib_with": max(r["peak_kib"] for r in runs) / 1024,
        "peak_rss_mib_without": plain["peak_kib"] / 1024,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| env | variant | rounds | rollout s | train s | PPO round s | attribution s | attribution / round "
        "| max ratio | 1st-round attr s | init s | peak RSS MiB (with / without) |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['env']} | {r['variant']} | {r['rounds_measured']} | {r['rollout_s']:.2f} | {r['train_s']:.2f} "
            f"| {r['round_s']:.2f} | {r['attr_s']:.4f} | {r['attr_ratio_pct']:.2f}% | {r['attr_ratio_max_pct']:.2f}% "
            f"| {r['first_round_attr_s']:.3f} | {r['init_s']:.2f} "
            f"| {r['peak_rss_mib_with']:.0f} / {r['peak_rss_mib_without']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=list(ENVS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--by-group", action="store_true", help="also time the per-layer breakdown")
    parser.add_argument("--out", default="experiments/out")
    args = parser.parse_args()
    rows = []
    for env_id in args.envs:
        plain = run_isolated(env_id, 0, args.rounds, False, False)
        variants = [("return, actor", False, False), ("+ TensorBoard + snapshots", False, True)]
        if args.by_group:
            variants.append(("return, actor, by layer", True, False))
        for name, by_group, full in variants:
            runs = [
                run_isolated(env_id, seed, args.rounds, True, by_group, full) for seed in range(args.repeats)
            ]
            rows.append({**summarise(env_id, runs, plain), "variant": name})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(f"\nCPU: {platform.processor() or platform.machine()}, torch threads 1\n\n{text}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "bench_sb3_attribution.md", (text + "\n").encode())
    save_json(
        out / "bench_sb3_attribution.json", {"args": vars(args), "provenance": provenance(), "rows": rows}
    )


if __name__ == "__main__":
    main()
