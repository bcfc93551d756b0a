"""dattri 0.3.0's influence functions on the protocol of ``bench_solvers.py``, for a same-machine ratio.

The same digits data, trained models (logistic regression and the 64-64-10 tanh MLP, float64,
l2 = 1e-3), 200 queries, LDS against the same retrained half-subsets, one thread, medians of
``--repeats``. dattri's objective is the same: its ``loss_func`` is the mean cross-entropy and
``regularization=l2`` adds ``l2 I`` to its Hessian. It uses the exact Hessian (rlattr's rows use the
Gauss-Newton matrix, equal for logistic regression). dattri's CG runs a fixed ``max_iter`` (no
tolerance), so it is timed at several.

dattri lives in its own virtual environment (it is not a dependency of rlattr). This script, run
with rlattr's venv, prepares the setting, runs a worker copy of itself under ``--python`` (which
imports only torch and dattri), and scores the worker's attributions. Without that interpreter, or
without dattri in it, it prints why and exits 0:

    python3.11 -m venv /tmp/dattri-venv && /tmp/dattri-venv/bin/pip install torch==2.13.0 dattri==0.3.0
    python experiments/bench_dattri.py --python /tmp/dattri-venv/bin/python --json /tmp/dattri.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

L2 = 1e-3
CG_ITERS = (10, 50)


def _model(kind: str) -> torch.nn.Module:
    if kind == "logreg":
        return torch.nn.Sequential(torch.nn.Linear(64, 10))
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))


def _dattri_methods(task: Any) -> dict[str, Any]:
    from dattri.algorithm.influence_function import (
        IFAttributorArnoldi,
        IFAttributorCG,
        IFAttributorExplicit,
    )

    table: dict[str, Any] = {"IF explicit": lambda: IFAttributorExplicit(task, regularization=L2)}
    for iters in CG_ITERS:
        table[f"IF CG ({iters} it)"] = lambda i=iters: IFAttributorCG(
            task, max_iter=i, regularization=L2, mode="rev-fwd"
        )
    table["IF Arnoldi"] = lambda: IFAttributorArnoldi(task, proj_dim=100, max_iter=200, regularization=L2)
    return table


def worker(inp: str, out: str) -> None:
    """Run dattri on the saved setting; write seconds and scores ``Tensor[m, n]`` per method."""
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # dattri's Arnoldi draws its start vector in the default dtype
    s = torch.load(inp, weights_only=True)
    model = _model(s["kind"]).double()
    model.load_state_dict(s["state"])

    def loss_func(params: Any, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = data
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    train = TensorDataset(s["x_train"], s["y_train"])
    test = TensorDataset(s["x_query"], s["y_query"])
    results: dict[str, Any] = {}
    for name, build in _dattri_methods(task).items():
        if s["only"] and name not in s["only"]:
            continue
        seconds, scores = [], torch.empty(0)
        try:
            for _ in range(s["repeats"]):
                t0 = time.perf_counter()
                attributor = build()
                attributor.cache(DataLoader(train, batch_size=len(train)))
                scores = attributor.attribute(
                    DataLoader(train, batch_size=len(train)), DataLoader(test, batch_size=len(test))
                )
                seconds.append(time.perf_counter() - t0)
        except (RuntimeError, MemoryError) as err:  # e.g. the memory cap: record it, go on
            print(f"  dattri {name}: failed ({str(err).splitlines()[0][:160]})", flush=True)
            results[name] = {"failed": str(err).splitlines()[0][:300]}
            continue
        results[name] = {"seconds": seconds, "scores": scores.T.detach().double().contiguous()}
        print(f"  dattri {name}: {statistics.median(seconds):.2f} s", flush=True)
    torch.save(results, out)


def _dattri_version(python: str) -> str | None:
    """dattri's version under ``python``, or None when it cannot be imported there."""
    try:
        done = subprocess.run(
            [python, "-c", "import importlib.metadata as m, dattri; print(m.version('dattri'))"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _memory_cap(gigabytes: float) -> Callable[[], None]:
    """A ``preexec_fn`` capping the worker's address space: torch.func.hessian on the MLP
    materialises d tangents at once, and the machine is shared."""

    def cap() -> None:
        import resource

        limit = int(gigabytes * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return cap


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="/tmp/dattri-venv/bin/python", help="interpreter with dattri")
    parser.add_argument("--models", nargs="+", default=["logreg", "mlp"])
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="method names to run (default: all)")
    parser.add_argument("--out", default="runs/bench_solvers", help="retraining cache (shared)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--mem-cap-gb", type=float, default=8.0, help="address-space cap of the worker")
    args = parser.parse_args(argv)
    version = _dattri_version(args.python)
    if version is None:
        print(f"bench_dattri: skipped, dattri cannot be imported by {args.python} (see the docstring)")
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_solvers import ground_truth, setting

    from rlattr.eval.metrics import lds
    from rlattr.provenance import provenance

    results: dict[str, Any] = {
        "config": vars(args),
        "dattri": version,
        "provenance": provenance(),
        "rows": {},
    }
    for kind in args.models:
        s = setting(kind, 1000, 200)
        masks, targets = ground_truth(s, args.subsets, Path(args.out))
        with tempfile.TemporaryDirectory() as tmp:
            inp, out = f"{tmp}/in.pt", f"{tmp}/out.pt"
            state = {k: v.detach() for k, v in s["model"].state_dict().items()}
            data = {"x_train": s["train"]["x"], "y_train": s["train"]["y"]}
            data |= {"x_query": s["queries"]["x"], "y_query": s["queries"]["y"]}
            torch.save(
                {"kind": kind, "state": state, "repeats": args.repeats, "only": args.only, **data}, inp
            )
            env = {**os.environ, "TQDM_DISABLE": "1"}  # dattri's progress bars
            done = subprocess.run(
                [args.python, __file__, "--worker", inp, out],
                env=env,
                preexec_fn=_memory_cap(args.mem_cap_gb),
            )
            if done.returncode != 0:
                print(
                    f"{kind}: the dattri worker failed (exit {done.returncode}; memory cap {args.mem_cap_gb} GB)"
                )
                results["rows"][f"{kind}/dattri"] = {"failed": done.returncode, "mem_cap_gb": args.mem_cap_gb}
                continue
            rows = torch.load(out, weights_only=True)
        for name, row in rows.items():
            if "failed" in row:
                results["rows"][f"{kind}/dattri {name}"] = {
                    "failed": row["failed"],
                    "mem_cap_gb": args.mem_cap_gb,
                }
                continue
            entry = {
                "seconds": row["seconds"],
                "median_s": statistics.median(row["seconds"]),
                "lds": float(lds(row["scores"], masks, targets)),
            }
            results["rows"][f"{kind}/dattri {name}"] = entry
            print(
                f"{kind:6s} dattri {name:18s} {entry['median_s']:8.2f} s  LDS {entry['lds']:.3f}", flush=True
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
