"""Ray against one process: sharded featurisation and LDS ground truth, 1 and 2 workers (issue 18).

Two data sets, both under the 64-64-10 tanh MLP of :mod:`rlattr.testing.supervised` (4,810
parameters, float32): the digits split (1,000 training records) and a 50,000-record synthetic set
(64 Gaussian features, labels from a random teacher MLP). For each:

* featurisation: ``GradDot(task, projector=RandomProjection(d, --proj-dim)).cache(train)`` in this
  process (today's path), against :func:`rlattr.scale.sharded_cache` with a
  :class:`rlattr.scale.RayExecutor` of 1 and of 2 workers;
* LDS ground truth: :func:`rlattr.eval.groundtruth.subset_retraining` of ``--subsets`` half
  subsets in this process, in 2 forked processes (today's parallel path) and on Ray (1, 2 workers).

``--only curvature`` instead checks the sharded influence curvature against one process on the
digits MLP (bit for bit, or the max abs differences; no timing, no Ray).

Torch runs one thread everywhere (this process and every task), so results must be bit-identical.
Every configuration runs once untimed (warm-up), then ``--repeats`` rounds run every configuration
in turn (interleaved, so that a shared machine's changing load hits them alike); reported are the
medians of wall-clock and of the CPU seconds of this process and all its descendants (the fork
pool; Ray's GCS, raylet and workers). Ray is started once and its two worker processes are
warmed up (torch imported) before any timing: the start-up is reported on its own. Ray's workers
run at niceness 0 here, as this process does (Ray's default is 15). Take the
timings with both cores free of other benchmarks:

    flock /tmp/rlattr-bench.lock .venv/bin/python experiments/bench_scale.py --json docs/results/scale.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from rlattr.core.methods.influence import InfluenceFunction
from rlattr.core.methods.rif import RescaledInfluence
from rlattr.core.methods.similarity import GradDot
from rlattr.core.projection import RandomProjection
from rlattr.core.store import save_json
from rlattr.eval.groundtruth import subset_masks, subset_retraining
from rlattr.provenance import provenance
from rlattr.scale import RayExecutor, curvature_chunk, require_ray, sharded_cache, sharded_curvature
from rlattr.scale.shards import own_slice
from rlattr.testing.supervised import (
    ce_of_logits,
    classification_task,
    load_digits_split,
    make_model,
    per_record_logits,
    train_classifier,
)


def digits() -> dict[str, Tensor]:
    data = load_digits_split(1000, seed=0)
    return {"x": data.x_train, "y": data.y_train}


def synthetic(n: int, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    teacher = make_model("mlp", seed=seed + 1)
    with torch.no_grad():
        y = (teacher(x) + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)
    return {"x": x, "y": y}


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system, with reaped children) of this process and every live descendant:
    the fork pool, Ray's daemons (GCS, raylet) and its workers. Linux /proc only."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    mine, total = {os.getpid()}, 0.0
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                changed = True
    for pid in mine:
        total += cpu.get(pid, 0.0)
    return total


def interleaved(configs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """Each config once untimed (warm-up), then ``repeats`` rounds of every config in turn, so that
    the load of a shared machine drifts over all of them alike: wall-clock and CPU seconds."""
    out: dict[str, dict[str, Any]] = {name: {"times_s": [], "cpu_s": []} for name in configs}
    for name, fn in configs.items():
        out[name]["value"] = fn()
    for _ in range(repeats):
        for name, fn in configs.items():
            cpu0, start = tree_cpu_seconds(), time.perf_counter()
            fn()
            out[name]["times_s"].append(time.perf_counter() - start)
            out[name]["cpu_s"].append(tree_cpu_seconds() - cpu0)
    for row in out.values():
        row["median_s"] = statistics.median(row["times_s"])
        row["median_cpu_s"] = statistics.median(row["cpu_s"])
    return out


def ray_executors(queued: int) -> dict[str, RayExecutor]:
    """1 and 2 tasks at a time, ``queued`` more submitted ahead (0 by default: a queue made Ray start
    extra worker processes here, each importing torch; with ``queued`` the 1-worker tasks reserve
    both CPUs, so that queued tasks wait instead of running beside it)."""
    return {
        "ray_1": RayExecutor(workers=1, cpus_per_task=2 if queued else 1, queued=queued),
        "ray_2": RayExecutor(workers=2, queued=queued),
    }


def mib(rss: dict[int, int]) -> list[float]:
    return sorted(round(v / 2**20, 1) for v in rss.values())


def finish(row: dict[str, Any], runs: dict[str, dict[str, Any]], executors: dict[str, RayExecutor]) -> None:
    ref = runs["single"].pop("value")
    for name, run in runs.items():
        if name != "single":
            run["identical"] = bool(torch.equal(run.pop("value"), ref))
        if name in executors:
            run["worker_peak_rss_mib"] = mib(executors[name].peak_rss)
        row[name] = run


def bench_features(train: dict[str, Tensor], args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    task = classification_task(model)
    proj = RandomProjection(task.num_params, args.proj_dim, seed=0)
    n = train["y"].shape[0]
    shard = max(args.chunk, (n // args.shards) // args.chunk * args.chunk)
    executors = ray_executors(args.queued)

    def single() -> Tensor:
        return GradDot(task, projector=proj, chunk_size=args.chunk).cache(train)._require_cache()

    def on_ray(ex: RayExecutor) -> Callable[[], Tensor]:
        def run() -> Tensor:
            a = GradDot(task, projector=proj, chunk_size=args.chunk)
            return sharded_cache(a, train, shard_size=shard, executor=ex)._require_cache()

        return run

    row: dict[str, Any] = {"n": n, "params": task.num_params, "proj_dim": args.proj_dim, "shard_size": shard}
    ray = require_ray()
    # the job (Task, model, projection) goes to the object store once; each task gets its own shard
    row["bytes_job_once"] = len(ray.cloudpickle.dumps(GradDot(task, projector=proj, chunk_size=args.chunk)))
    row["bytes_to_each_task"] = len(ray.cloudpickle.dumps(own_slice(train, 0, shard)))
    row["bytes_back_per_shard"] = shard * args.proj_dim * 4
    row["shards"] = -(-n // shard)
    configs = {"single": single, **{name: on_ray(ex) for name, ex in executors.items()}}
    finish(row, interleaved(configs, args.repeats), executors)
    return row


def bench_lds(train: dict[str, Tensor], args: argparse.Namespace, steps: int) -> dict[str, Any]:
    x, y = train["x"], train["y"]
    xq, yq = x[:50], y[:50]

    def retrain(weights: Tensor, seed: int) -> Any:
        return train_classifier(make_model("mlp", seed=seed), x, y, weights=weights, steps=steps)

    def evaluate(model: Any) -> Tensor:
        with torch.no_grad():
            return nn.functional.cross_entropy(model(xq), yq, reduction="none")

    masks = subset_masks(x.shape[0], args.subsets, seed=0)
    executors = ray_executors(args.queued)

    def run(**kwargs: Any) -> Callable[[], Tensor]:
        return lambda: subset_retraining(retrain, evaluate, masks, **kwargs)

    row: dict[str, Any] = {"n": x.shape[0], "subsets": args.subsets, "adam_steps": steps}
    ray = require_ray()
    row["bytes_to_each_task"] = len(ray.cloudpickle.dumps((retrain, evaluate, masks)))
    row["bytes_back_per_job"] = 50 * 4
    configs = {"single": run(), "fork_2": run(processes=2)}
    configs.update({name: run(executor=ex) for name, ex in executors.items()})
    finish(row, interleaved(configs, args.repeats), executors)
    return row


def bench_curvature(args: argparse.Namespace) -> dict[str, Any]:
    """Sharded influence curvature against one process on the digits MLP: equal, or by how much not.

    The exact Hessian (IF, explicit) and the Gauss-Newton matrix (RIF), in shards of one
    single-process chunk (``curvature_chunk``) and of two; the max abs differences of H and of the
    scores of 50 queries. Runs in this process (the sums are the same on Ray, as tests/scale checks).
    """
    data = load_digits_split(1000, seed=0)
    model = make_model("mlp", seed=0)
    train_classifier(model, data.x_train, data.y_train, l2=1e-3, steps=300)
    task = classification_task(model)
    train, query = data.train_batch(), {"x": data.x_test[:50], "y": data.y_test[:50]}
    output = per_record_logits(model)
    makers: dict[str, Callable[[], Any]] = {
        "IF, exact Hessian": lambda: InfluenceFunction(task, l2=1e-3, damping=0.01),
        "RIF, Gauss-Newton": lambda: RescaledInfluence(
            task, l2=1e-3, damping=0.01, output=output, output_loss=ce_of_logits
        ),
    }
    out: dict[str, Any] = {"params": task.num_params, "records": 1000}
    for name, make in makers.items():
        a = make()
        spec = a.curvature_spec(train)
        rows = curvature_chunk(spec, a.curvature_block)
        h_ref = spec.hessian().dense(a.curvature_block)
        s_ref = make().cache(train).attribute(query)
        for shard in (rows, 2 * rows):
            total = sharded_curvature(spec, shard_size=shard, block=a.curvature_block)
            h = spec.hessian().finish_dense(total)
            s = sharded_cache(make(), train, shard_size=256, curvature_shard_size=shard).attribute(query)
            out[f"{name}, shards of {shard}"] = {
                "chunk": rows,
                "H_equal": bool(torch.equal(h, h_ref)),
                "H_max_abs_diff": float((h - h_ref).abs().max()),
                "H_max_abs": float(h_ref.abs().max()),
                "scores_equal": bool(torch.equal(s, s_ref)),
                "scores_max_abs_diff": float((s - s_ref).abs().max()),
                "scores_max_abs": float(s_ref.abs().max()),
            }
            print(name, shard, out[f"{name}, shards of {shard}"], flush=True)
    return out


def start_ray() -> dict[str, float]:
    ray = require_ray()
    # Ray starts its workers at niceness 15; the single-process path runs at 0, and on a shared
    # machine a niced worker yields its core to every other job: time both at the same priority
    os.environ["RAY_worker_niceness"] = "0"
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - start
    start = time.perf_counter()
    # two concurrent tasks that import torch start (and keep) both worker processes
    list(RayExecutor(workers=2).map(lambda j: torch.zeros(1) + j, [0, 1]))
    return {"ray_init_s": init_s, "first_tasks_s": time.perf_counter() - start}


def ray_costs(tasks: int = 17, rows: int = 3072, cols: int = 256) -> dict[str, float]:
    """Ray's own costs here: CPU of its idle processes per second, and the round trip of ``tasks``
    trivial tasks that each return ``rows x cols`` float32 (a featurised shard's size)."""
    time.sleep(2)
    cpu0, start = tree_cpu_seconds(), time.perf_counter()
    time.sleep(10)
    idle = (tree_cpu_seconds() - cpu0) / (time.perf_counter() - start)
    block = torch.zeros(rows, cols)
    ex = RayExecutor(workers=1)
    cpu0, start = tree_cpu_seconds(), time.perf_counter()
    list(ex.map(lambda j: block + j, range(tasks)))
    wall, cpu = time.perf_counter() - start, tree_cpu_seconds() - cpu0
    return {"idle_cpu_per_s": idle, "trivial_tasks": tasks, "trivial_wall_s": wall, "trivial_cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic-n", type=int, default=50_000)
    parser.add_argument("--proj-dim", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--shards", type=int, default=16, help="shards per data set (about)")
    parser.add_argument("--subsets", type=int, default=6)
    parser.add_argument("--digits-steps", type=int, default=300)
    parser.add_argument("--synthetic-steps", type=int, default=10)
    parser.add_argument("--only", choices=["features", "lds", "curvature", "all"], default="all")
    parser.add_argument("--queued", type=int, default=0, help="RayExecutor(queued=): tasks submitted ahead")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {"config": vars(args), "provenance": provenance(), "cpus": os.cpu_count()}
    if args.only == "curvature":
        results["curvature"] = bench_curvature(args)
        if args.json:
            save_json(args.json, results)
        return
    results["startup"] = start_ray()
    results["ray_costs"] = ray_costs()
    results["loadavg_before"] = os.getloadavg()
    sets = {"digits": digits(), "synthetic": synthetic(args.synthetic_n)}
    model = make_model("mlp", seed=0)
    for name, train in sets.items():
        if args.only in ("features", "all"):
            results[f"features_{name}"] = row = bench_features(train, args, model)
            print(f"features {name}: " + _line(row), flush=True)
        if args.only in ("lds", "all"):
            steps = args.digits_steps if name == "digits" else args.synthetic_steps
            results[f"lds_{name}"] = row = bench_lds(train, args, steps)
            print(f"lds {name}: " + _line(row), flush=True)
    results["loadavg_after"] = os.getloadavg()
    results["worker_niceness"] = os.environ["RAY_worker_niceness"]
    if args.json:
        save_json(args.json, results)
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    """The results table of docs/results/scale.md: medians, ratios to one process, identical?"""
    lines = [
        "| stage | records | run | wall-clock | one process / this | CPU seconds, all processes | CPU / one process's | identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "single": "one process",
        "fork_2": "2 forked processes",
        "ray_1": "Ray, 1 worker",
        "ray_2": "Ray, 2 workers",
    }
    for key in ("features_digits", "features_synthetic", "lds_digits", "lds_synthetic"):
        if key not in results:
            continue
        row = results[key]
        base, base_cpu = row["single"]["median_s"], row["single"]["median_cpu_s"]
        for col, label in names.items():
            if col not in row:
                continue
            r = row[col]
            lines.append(
                f"| {key.replace('_', ' ')} | {row['n']:,} | {label} | {r['median_s']:.2f} s | "
                f"{base / r['median_s']:.2f}x | {r['median_cpu_s']:.2f} | {r['median_cpu_s'] / base_cpu:.2f} | "
                f"{r.get('identical', '-')} |"
            )
    return "\n".join(lines)


def _line(row: dict[str, Any]) -> str:
    base = row["single"]["median_s"]
    parts = [f"single {base:.2f}s"]
    for key in ("fork_2", "ray_1", "ray_2"):
        if key in row:
            r = row[key]
            parts.append(
                f"{key} {r['median_s']:.2f}s (x{base / r['median_s']:.2f}, identical={r['identical']})"
            )
    return "; ".join(parts)


if __name__ == "__main__":
    main()
