"""Verifiable attribution study: acceptance of the honest Prover, rejection of the dishonest ones,
Verifier retrainings against n, Verifier wall-clock against the honest Prover's.

    nice -n 10 .venv/bin/python experiments/verify_study.py --out docs/results/verify

Cells (each task: a pool of retrainings on uniform subsets, computed once):

* ``digits``: logistic regression on 100 digits records, target the margin of test image 0
  (:func:`rlattr.eval.verify.tasks.digits_margins`).
* ``CartPole-v1`` / ``Acrobot-v1``: one SB3 PPO round (128 records, recorded with
  RoundRecorder at round 3), re-run from theta(k) on each subset, target the return surrogate on the
  round's buffer (:func:`rlattr.eval.verify.tasks.ppo_round_retrain`).

The honest Prover fits its datamodel by least squares on a *fit* pool; each trial's Verifier
draws its m queries uniformly without replacement from a separate *query* pool (both pools uniform
over {0,1}^n), and its spot checks look values up in the pool. This is a simulation shortcut: every
retraining is computed once, not once per trial; the Verifier's wall-clock is then its number of
retrainings x the measured seconds per retraining, plus the measured time of its statistics. The
``scaling`` cell runs real retrainings (digits, n = 500, 1000, 1796 = all of digits' training
split) to show the Verifier's retrainings do not grow with n.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlattr.core.store import atomic_write_bytes, load_json, save_json
from rlattr.eval.verify import (
    DISHONEST,
    Claim,
    FabricatingProver,
    HonestProver,
    Verifier,
    default_queries,
    excess_statistics,
    fit_datamodel,
    random_scores,
    scaled_down,
    spot_checks_needed,
)
from rlattr.eval.verify.tasks import digits_margins, digits_retrain
from rlattr.provenance import provenance
from rlattr.testing.supervised import load_digits_split

EPSILONS = (0.1, 0.2, 0.3)
DELTA = 0.05


class Pool:
    """Retraining outcomes of uniform subsets, looked up by mask (the study's retraining oracle)."""

    def __init__(self, masks: Tensor, values: Tensor) -> None:
        self.masks, self.values = masks, values.double()
        self.index = {bytes(m.numpy().tobytes()): i for i, m in enumerate(masks)}

    def __call__(self, mask: Tensor) -> float:
        return float(self.values[self.index[bytes(mask.numpy().tobytes())]])


def uniform_masks(count: int, n: int, seed: int) -> Tensor:
    return torch.rand(count, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) < 0.5


def digits_pools(n: int, n_fit: int, n_query: int) -> tuple[Pool, Pool, float]:
    data = load_digits_split(n, dtype=torch.float64)
    fit, query = uniform_masks(n_fit, n, 1), uniform_masks(n_query, n, 2)
    start = time.perf_counter()
    values = torch.cat([digits_margins(data, chunk) for chunk in torch.cat([fit, query]).split(250)])
    per = (time.perf_counter() - start) / (n_fit + n_query)
    return Pool(fit, values[:n_fit]), Pool(query, values[n_fit:]), per


def ppo_pools(env_id: str, n_fit: int, n_query: int, seed: int = 0) -> tuple[Pool, Pool, float, dict]:
    from stable_baselines3 import PPO

    from rlattr.callbacks.sb3.policy import SB3PolicyEval, tracked_param_names
    from rlattr.callbacks.sb3.replay import RoundRecorder
    from rlattr.eval.rl_validity import RoundContext
    from rlattr.eval.verify.tasks import ppo_round_retrain
    from rlattr.rl.replay import max_abs_diff, replay_round

    model = PPO("MlpPolicy", env_id, n_steps=128, batch_size=32, n_epochs=4, seed=seed, device="cpu",
                policy_kwargs={"net_arch": [32, 32]})  # fmt: skip
    recorder = RoundRecorder(rounds={3})
    model.learn(4 * 128, callback=recorder)
    snap = recorder.snapshots[3]
    policy = model.policy
    evaluator = SB3PolicyEval(policy, with_values=True)
    exact = max_abs_diff(replay_round(policy, evaluator, snap).theta, snap.theta_next or {})
    ctx = RoundContext(policy, evaluator, SB3PolicyEval(policy), tracked_param_names(policy), snap)
    retrain = ppo_round_retrain(ctx, seed=0)
    n = len(snap.records)
    fit, query = uniform_masks(n_fit, n, 1), uniform_masks(n_query, n, 2)
    start = time.perf_counter()
    values = torch.tensor([retrain(m) for m in torch.cat([fit, query])], dtype=torch.float64)
    per = (time.perf_counter() - start) / (n_fit + n_query)
    info = {"n_records": n, "replay_max_abs_diff": exact, "optimizer": type(policy.optimizer).__name__}
    return Pool(fit, values[:n_fit]), Pool(query, values[n_fit:]), per, info


def provers(honest: Claim, pool: Pool, trial: int) -> dict[str, Any]:
    out: dict[str, Any] = {"honest": HonestProver(honest, pool)}
    for name, make in DISHONEST.items():
        out[name] = HonestProver(make(honest, trial), pool, name=name)
    out["fabricated_answers"] = FabricatingProver(random_scores(honest, trial))
    return out


def run_cell(fit: Pool, query: Pool, per_retrain: float, trials: int) -> dict[str, Any]:
    """Decision rates per epsilon and Prover, over ``trials`` Verifier runs on the query pool."""
    honest = fit_datamodel(fit.masks, fit.values)
    n = honest.n
    variance = float(query.values.var())
    reference = {
        name: excess_statistics(query.masks, query.values, p.claim(), DELTA)["excess"] / variance
        for name, p in provers(honest, query, 0).items()
        if name != "fabricated_answers"
    }
    cells: dict[str, Any] = {}
    for eps in EPSILONS:
        m = min(default_queries(n, eps, DELTA), len(query.values))
        accepted: dict[str, list[bool]] = {}
        retrainings: list[int] = []
        stat_seconds: list[float] = []
        for trial in range(trials):
            gen = np.random.default_rng(1000 * trial + int(100 * eps))
            idx = torch.from_numpy(gen.choice(len(query.values), size=m, replace=False))
            for name, prover in provers(honest, query, trial).items():
                t = Verifier(query, eps, DELTA, queries=m, seed=trial).run(prover, masks=query.masks[idx])
                accepted.setdefault(name, []).append(t.accepted)
                if name == "honest":
                    retrainings.append(t.n_retrainings)
                    stat_seconds.append(t.meta["verifier_seconds"])
        k = spot_checks_needed(eps, DELTA)
        cells[str(eps)] = {
            "queries": m,
            "spot_checks": k,
            "honest_accept_rate": float(np.mean(accepted["honest"])),
            "reject_rate": {
                name: 1.0 - float(np.mean(a)) for name, a in accepted.items() if name != "honest"
            },
            "verifier_retrainings": sorted(set(retrainings)),
            "verifier_seconds": k * per_retrain + float(np.median(stat_seconds)),
            "honest_prover_seconds": (len(fit.values) + m) * per_retrain,
        }
    return {"n": n, "trials": trials, "variance": variance, "seconds_per_retraining": per_retrain,
            "fit_retrainings": len(fit.values), "query_pool": len(query.values),
            "excess_over_variance": reference, "by_epsilon": cells}  # fmt: skip


def power_curve(fit: Pool, query: Pool, eps: float, factors: tuple[float, ...], trials: int) -> list[dict]:
    """Acceptance of claims scaled by each factor (excess near the threshold) at one epsilon."""
    honest = fit_datamodel(fit.masks, fit.values)
    variance = float(query.values.var())
    m = min(default_queries(honest.n, eps, DELTA), len(query.values))
    rows = []
    for factor in factors:
        claim = scaled_down(honest, factor)
        excess = excess_statistics(query.masks, query.values, claim, DELTA)["excess"] / variance
        accepted = []
        for trial in range(trials):
            idx = torch.from_numpy(
                np.random.default_rng(trial).choice(len(query.values), size=m, replace=False)
            )
            t = Verifier(query, eps, DELTA, queries=m, seed=trial).run(
                HonestProver(claim, query), masks=query.masks[idx]
            )
            accepted.append(t.accepted)
        rows.append(
            {"factor": factor, "excess_over_variance": excess, "accept_rate": float(np.mean(accepted))}
        )
    return rows


def scaling(sizes: tuple[int, ...], eps: float, queries: int) -> list[dict[str, Any]]:
    """Real retrainings on digits at each n: the Verifier's count and seconds, the Prover's seconds."""
    rows = []
    for n in sizes:
        data = load_digits_split(n, dtype=torch.float64)
        retrain = digits_retrain(data)
        zero = Claim(0.0, torch.zeros(n, dtype=torch.float64))
        t = Verifier(retrain, eps, DELTA, queries=queries, seed=n).run(HonestProver(zero, retrain))
        per = t.meta["prover_seconds"] / queries
        rows.append({
            "n": n, "verifier_retrainings": t.n_retrainings, "verifier_seconds": t.meta["verifier_seconds"],
            "queries_default": default_queries(n, eps, DELTA), "seconds_per_retraining": per,
            "honest_prover_seconds_estimate": per * (10 * n + default_queries(n, eps, DELTA)),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


PROVERS = ("scaled_down", "boost_favoured", "permuted", "random", "fabricated_answers")


def tables(results: dict[str, Any]) -> str:
    """Markdown tables of ``results.json``: decision rates, excess of each claim, scaling, power."""
    lines = ["| task | n | epsilon | trials | Prover answers m | Verifier retrainings | honest accepted | "
             + " | ".join(f"{p} rejected" for p in PROVERS) + " | Verifier s | honest Prover s |",
             "|---|---|---|---|---|---|---|" + "---|" * len(PROVERS) + "---|---|"]  # fmt: skip
    for task in ("digits", "CartPole-v1", "Acrobot-v1"):
        cell = results.get(task)
        if not isinstance(cell, dict):
            continue
        for eps, c in cell["by_epsilon"].items():
            rejects = " | ".join(f"{c['reject_rate'][p]:.2f}" for p in PROVERS)
            lines.append(
                f"| {task} | {cell['n']} | {eps} | {cell['trials']} | {c['queries']} | "
                f"{','.join(map(str, c['verifier_retrainings']))} | {c['honest_accept_rate']:.2f} | {rejects} | "
                f"{c['verifier_seconds']:.1f} | {c['honest_prover_seconds']:.0f} |"
            )
    lines += ["", "| task | Var f | s / retraining | " + " | ".join(["honest", *PROVERS[:-1]]) + " |",
              "|---|---|---|" + "---|" * len(PROVERS)]  # fmt: skip
    for task in ("digits", "CartPole-v1", "Acrobot-v1"):
        cell = results.get(task)
        if isinstance(cell, dict):
            ex = cell["excess_over_variance"]
            vals = " | ".join(f"{ex[p]:.3f}" for p in ("honest", *PROVERS[:-1]))
            lines.append(
                f"| {task} | {cell['variance']:.3g} | {cell['seconds_per_retraining']:.3f} | {vals} |"
            )
    scal = results.get("scaling")
    if isinstance(scal, dict):
        lines += ["", "| n | Verifier retrainings | Verifier s | s / retraining | default Prover answers | "
                  "honest Prover s (10 n + m retrainings, estimate) |", "|---|---|---|---|---|---|"]  # fmt: skip
        for r in scal["rows"]:
            lines.append(f"| {r['n']} | {r['verifier_retrainings']} | {r['verifier_seconds']:.1f} | "
                         f"{r['seconds_per_retraining']:.3f} | {r['queries_default']} | "
                         f"{r['honest_prover_seconds_estimate']:.0f} |")  # fmt: skip
    power = results.get("digits", {}).get("power") if isinstance(results.get("digits"), dict) else None
    if isinstance(power, dict):
        lines += ["", f"| scale factor (digits, epsilon {power['epsilon']}) | excess / Var f | accepted |",
                  "|---|---|---|"]  # fmt: skip
        for r in power["rows"]:
            lines.append(f"| {r['factor']} | {r['excess_over_variance']:.3f} | {r['accept_rate']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="docs/results/verify")
    parser.add_argument("--trials", type=int, default=100, help="trials per digits cell")
    parser.add_argument("--ppo-trials", type=int, default=50, help="trials per PPO cell")
    parser.add_argument("--skip", nargs="*", default=[], help="cells to skip: digits ppo scaling")
    parser.add_argument("--report-only", action="store_true", help="only write tables.md from results.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.report_only:
        atomic_write_bytes(out / "tables.md", tables(load_json(out / "results.json")).encode())
        return
    previous = load_json(out / "results.json") if (out / "results.json").is_file() else {}
    for cell in previous.values():  # cells kept from an earlier run keep that run's provenance
        if isinstance(cell, dict) and "by_epsilon" in cell or isinstance(cell, dict) and "rows" in cell:
            cell.setdefault("provenance", previous.get("provenance"))
            cell.setdefault("command", previous.get("command"))
    results: dict[str, Any] = {"delta": DELTA, "epsilons": list(EPSILONS), "provenance": provenance(),
                               "command": "nice -n 10 .venv/bin/python experiments/verify_study.py " +
                               f"--out {args.out} --trials {args.trials} --ppo-trials {args.ppo_trials}" +
                               (f" --skip {' '.join(args.skip)}" if args.skip else "")}  # fmt: skip
    if "digits" not in args.skip:
        fit, query, per = digits_pools(100, 1500, 1500)
        results["digits"] = run_cell(fit, query, per, args.trials)
        factors = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6)
        results["digits"]["power"] = {
            "epsilon": 0.1,
            "rows": power_curve(fit, query, 0.1, factors, args.trials),
        }
        results["digits"]["provenance"] = results["provenance"]
        save_json(out / "digits.json", results["digits"])
        print("digits", results["digits"]["by_epsilon"], flush=True)
    if "ppo" not in args.skip:
        for env_id in ("CartPole-v1", "Acrobot-v1"):
            fit, query, per, info = ppo_pools(env_id, 1200, 700)
            results[env_id] = {**run_cell(fit, query, per, args.ppo_trials), **info}
            results[env_id]["provenance"] = results["provenance"]
            save_json(out / f"{env_id}.json", results[env_id])
            print(env_id, results[env_id]["by_epsilon"], flush=True)
    if "scaling" not in args.skip:
        rows = scaling((500, 1000, 1796), 0.2, 40)
        results["scaling"] = {
            "epsilon": 0.2,
            "queries": 40,
            "rows": rows,
            "provenance": results["provenance"],
        }
        save_json(out / "scaling.json", results["scaling"])
    save_json(out / "results.json", {**previous, **results})
    atomic_write_bytes(out / "tables.md", tables({**previous, **results}).encode())


if __name__ == "__main__":
    main()
