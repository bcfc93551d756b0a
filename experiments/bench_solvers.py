"""Solver speed on digits: wall-clock of cache + attribute per influence method, one thread.

The protocol of issue 19: 1,000 training records, 200 test queries, float64; multinomial logistic
regression (650 parameters, L-BFGS) and a 64-64-10 tanh MLP (4,810, 500 Adam steps), both minimising
mean cross-entropy + (l2 / 2) ||theta||^2 with l2 = 1e-3. Every curvature is the Gauss-Newton
matrix (the Hessian for logistic regression), as in ``experiments/tda_benchmark.py``. Each method
is timed ``--repeats`` times (median reported); LDS against ``--subsets`` retrained half-subsets
(cached under ``--out``, shared by a run of this script at an older commit) checks that a faster
solver did not lose quality. Methods the checked-out rlattr lacks are skipped, so the same script
times the commit before the change:

    python experiments/bench_solvers.py --json docs/results/bench_solvers.json
    git worktree add /tmp/before <commit>; cp experiments/bench_solvers.py /tmp/before/experiments/
    PYTHONPATH=/tmp/before python /tmp/before/experiments/bench_solvers.py --json /tmp/before.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlattr.core.methods import STRATEGIES, InfluenceFunction, NewtonStep, RescaledInfluence
from rlattr.core.methods.solvers import strategy_options
from rlattr.eval.groundtruth import leave_one_out, subset_masks, subset_retraining
from rlattr.eval.metrics import lds, loo_correlation
from rlattr.provenance import provenance
from rlattr.testing.supervised import (
    ce_of_logits,
    classification_task,
    load_digits_split,
    make_model,
    model_sampled_batch,
    per_record_ce,
    per_record_logits,
    train_classifier,
)

L2 = 1e-3
# minus the smallest eigenvalue of the digits MLP's exact loss Hessian (no l2) at the trained
# parameters: torch.linalg.eigvalsh(ObjectiveHessian(task, train).dense())[0] = -0.001722
MLP_LOWEST = 0.001722


def setting(kind: str, n_train: int, n_queries: int) -> dict[str, Any]:
    data = load_digits_split(n_train, seed=0, dtype=torch.float64)
    train = data.train_batch()
    queries = {"x": data.x_test[:n_queries], "y": data.y_test[:n_queries]}
    steps = None if kind == "logreg" else 500

    def fit(weights: torch.Tensor) -> torch.nn.Module:
        model = make_model(kind, seed=0).double()  # type: ignore[arg-type]
        return train_classifier(model, train["x"], train["y"], weights=weights, l2=L2, steps=steps)

    model = fit(torch.ones(n_train))
    return {"kind": kind, "train": train, "queries": queries, "model": model, "fit": fit}


def ground_truth(s: dict[str, Any], subsets: int, out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    n = s["train"]["y"].shape[0]
    masks = subset_masks(n, subsets, 0.5, seed=0)

    def retrain(weights: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in s["fit"](weights.double()).named_parameters()}

    def query_loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return per_record_ce(s["model"])(params, s["queries"])

    config = {"kind": s["kind"], "n": n, "m": s["queries"]["y"].shape[0], "l2": L2}
    values = subset_retraining(retrain, query_loss, masks, out_dir=out / s["kind"] / "lds", config=config)
    return masks, -values


def loo_truth(s: dict[str, Any], k: int, out: Path) -> tuple[list[int], torch.Tensor]:
    """Leave-one-out effects on the query losses, ``Tensor[m, k]``, for k fixed random records."""
    n = s["train"]["y"].shape[0]
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:k].tolist()

    def retrain(weights: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        return {name: v.detach() for name, v in s["fit"](weights.double()).named_parameters()}

    def query_loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return per_record_ce(s["model"])(params, s["queries"])

    config = {"kind": s["kind"], "n": n, "m": s["queries"]["y"].shape[0], "l2": L2}
    effects = leave_one_out(retrain, query_loss, n, idx, out_dir=out / s["kind"] / f"loo{k}", config=config)
    return idx, effects.T


def methods(s: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    task = classification_task(s["model"], groups="tensor")
    curv: dict[str, Any] = {"output": per_record_logits(s["model"]), "output_loss": ce_of_logits}
    fisher = model_sampled_batch(s["model"], s["train"], 5, seed=0)

    def influence(strategy: str, **opts: Any) -> Callable[[], Any]:
        return lambda: InfluenceFunction(task, strategy=strategy, l2=L2, **curv, **opts)

    table = {
        "IF explicit": influence("explicit"),
        "IF CG": influence("cg", max_iter=500, tol=1e-6),
        "IF EK-FAC": lambda: InfluenceFunction(task, strategy="ekfac", l2=L2, hessian_data=fisher),
        "RIF": lambda: RescaledInfluence(task, l2=L2, **curv),
    }
    if "precondition" in strategy_options("cg"):  # the same CG without its Nyström preconditioner
        table["IF CG (no preconditioner)"] = influence("cg", max_iter=500, tol=1e-6, precondition=0)
    if "arnoldi" in STRATEGIES:
        table["IF Arnoldi"] = influence("arnoldi", rank=100, iterations=200)
    newton = inspect.signature(NewtonStep).parameters
    if "output" in newton and s["kind"] == "logreg":
        table["Newton step (Woodbury)"] = lambda: NewtonStep(task, l2=L2, **curv)
    if "hessian" in newton and s["kind"] == "mlp":
        # the MLP's exact Hessian is indefinite at l2 = 1e-3 (smallest eigenvalue l2 - MLP_LOWEST):
        # a Gauss-Newton H, or the exact H damped by MLP_LOWEST (its smallest eigenvalue lifted to l2)
        table["Newton step (Woodbury, GN H)"] = lambda: NewtonStep(
            task, l2=L2, hessian="gauss_newton", **curv
        )
        table["Newton step (Woodbury, damped H)"] = lambda: NewtonStep(
            task, l2=L2, damping=MLP_LOWEST, **curv
        )
    return table


def time_method(
    build: Callable[[], Any], s: dict[str, Any], repeats: int
) -> tuple[list[float], torch.Tensor, Any]:
    seconds, scores, attributor = [], torch.empty(0), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        attributor = build()
        scores = attributor.cache(s["train"]).attribute(s["queries"]).detach()
        seconds.append(time.perf_counter() - t0)
    return seconds, scores, attributor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["logreg", "mlp"])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-queries", type=int, default=200)
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="method names to run (default: all)")
    parser.add_argument("--loo", type=int, default=0, help="LOO correlation on this many records (0: none)")
    parser.add_argument("--out", default="runs/bench_solvers")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, Any] = {"config": vars(args), "provenance": provenance(), "rows": {}}
    for kind in args.models:
        s = setting(kind, args.n_train, args.n_queries)
        masks, targets = ground_truth(s, args.subsets, Path(args.out))
        loo = loo_truth(s, args.loo, Path(args.out)) if args.loo else None
        for name, build in methods(s).items():
            if args.only is not None and name not in args.only:
                continue
            seconds, scores, attributor = time_method(build, s, args.repeats)
            row: dict[str, Any] = {
                "seconds": seconds,
                "median_s": statistics.median(seconds),
                "lds": float(lds(scores.double(), masks, targets)),
            }
            if loo is not None:
                row["loo"] = float(loo_correlation(scores.double()[:, loo[0]], loo[1]))
            if hasattr(getattr(attributor, "solver", None), "iterations"):
                row["iterations"] = attributor.solver.iterations
            results["rows"][f"{kind}/{name}"] = row
            extra = f"  LOO {row['loo']:.3f}" if "loo" in row else ""
            print(f"{kind:6s} {name:34s} {row['median_s']:8.2f} s  LDS {row['lds']:.3f}{extra}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
