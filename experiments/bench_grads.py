"""Benchmark of the gradient engine: autograd loop vs vmap per-record gradients vs JVP directional scores.

Each (setting, method) runs in a fresh process pinned to one torch thread, so its peak resident
memory (ru_maxrss above the process's level after setup) is its own. Records per second are the
median of ``--repeats`` runs. The score is the online-RL one: ``<grad f, grad L_i>`` for every
record i of a buffer, with L_i a per-record policy-gradient loss ``-A_i log pi(a_i | s_i)``.

    python experiments/bench_grads.py            # the table, also written to experiments/out/
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch
from fresh_process import run_in_fresh_process
from torch import nn
from torch.func import functional_call

from rlattr.provenance import provenance

SETTINGS = {
    # name: (obs dim, hidden sizes, actions)
    "sb3-mlp-64x64": (8, (64, 64), 4),
    "mlp-1M": (512, (1024, 512), 4),
}


def _policy_task(obs_dim: int, hidden: tuple[int, ...], n_act: int, n: int):
    from rlattr.core import Task

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    width = obs_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.Tanh()]
        width = h
    model = nn.Sequential(*layers, nn.Linear(width, n_act))
    batch = {"obs": torch.randn(n, obs_dim), "act": torch.randint(0, n_act, (n,)), "adv": torch.randn(n)}

    def logp(params, b):
        logits = functional_call(model, params, (b["obs"],))
        return torch.log_softmax(logits, -1).gather(1, b["act"][:, None])[:, 0]

    def loss(params, b):
        return -b["adv"] * logp(params, b)

    def target(params, b):
        return (logp(params, b) * b["adv"]).mean()

    return Task(model, loss, target=target, target_goal="raise"), batch


def _run_method(method: str, setting: str, n: int, loop_records: int) -> dict[str, float]:
    from rlattr.core import directional_scores, group_dots, iter_per_record_grads, target_grads

    torch.set_num_threads(1)
    task, batch = _policy_task(*SETTINGS[setting], n)
    tg = {k: v[0] for k, v in target_grads(task, batch).items()}
    if method == "loop":  # the loop is slow: time a prefix and report the rate
        from rlattr.core import slice_batch as _slice

        batch, n = _slice(batch, 0, loop_records), loop_records
    from rlattr.core import slice_batch

    def score(b):
        if method == "jvp":
            return directional_scores(task, b, tg)
        chunk = 256 if setting == "sb3-mlp-64x64" else 64
        # per-tensor dots (no flattening copy): the cheapest way to use materialised gradients
        parts = [
            group_dots(task, g, tg).sum(1)
            for _, _, g in iter_per_record_grads(task, b, chunk_size=chunk, method=method)
        ]
        return torch.cat(parts)

    score(slice_batch(batch, 0, 32))  # warm-up: torch.func's first call traces; a training run pays it once
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    scores = score(batch)
    seconds = time.perf_counter() - t0
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    assert scores.shape == (n,)
    return {"records_per_s": n / seconds, "seconds": seconds, "peak_mb": peak_mb, "records": n}


def _measure(method: str, setting: str, n: int, loop_records: int) -> dict[str, float]:
    return run_in_fresh_process(_run_method, method, setting, n, loop_records)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=2048)
    parser.add_argument("--loop-records", type=int, default=256, help="records timed for the slow loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="experiments/out/bench_grads.json")
    args = parser.parse_args()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for setting in SETTINGS:
        results[setting] = {}
        for method in ("loop", "vmap", "jvp"):
            runs = [_measure(method, setting, args.records, args.loop_records) for _ in range(args.repeats)]
            results[setting][method] = {
                "records_per_s": statistics.median(r["records_per_s"] for r in runs),
                "peak_mb": statistics.median(r["peak_mb"] for r in runs),
                "records_timed": runs[0]["records"],
            }
    from rlattr.core.task import Task  # noqa: F401  (import check only)

    print(
        f"\nper-record score <grad f, grad L_i>, {args.records} records, torch {torch.__version__}, 1 thread"
    )
    print(
        f"{'setting':<16}{'params':>10}{'loop r/s':>12}{'vmap r/s':>12}{'jvp r/s':>12}"
        f"{'vmap/loop':>11}{'jvp/vmap':>10}{'MB vmap':>9}{'MB jvp':>8}"
    )
    for setting, res in results.items():
        task, _ = _policy_task(*SETTINGS[setting], 2)
        loop, vm, jv = (res[m]["records_per_s"] for m in ("loop", "vmap", "jvp"))
        print(
            f"{setting:<16}{task.num_params:>10,}{loop:>12,.0f}{vm:>12,.0f}{jv:>12,.0f}"
            f"{vm / loop:>10.1f}x{jv / vm:>9.1f}x{res['vmap']['peak_mb']:>9.0f}{res['jvp']['peak_mb']:>8.0f}"
        )
    out = Path(args.out)
    from rlattr.core.store import save_json

    save_json(
        out,
        {
            "results": results,
            "args": vars(args),
            "provenance": provenance(),
        },
    )
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
