"""Counterfactual validity of RL attribution scores: local LDS per scorer at early, middle and late
PPO rounds on CartPole-v1, Acrobot-v1 and LunarLander-v3, plus the paper's intervention test.

    nice -n 5 .venv/bin/python experiments/rl_attribution_validity.py --config configs/validity.yaml

Per environment: train SB3 PPO (paper settings) with a :class:`RoundRecorder` on the stage rounds;
per stage: check the exact replay, score the buffer with every scorer against two return targets
(the round's own buffer, the paper's choice; and held-out transitions collected with theta(k)),
re-run the round on M random 50% subsets (local ground truth), LDS with bootstrap intervals, a
second-seed re-run of some subsets (noise ceiling), and the intervention (drop IIF's bottom records
vs as many random ones, re-run, evaluate). Each finished stage is saved at once (``stage_*.json``)
and skipped on a re-run; the end writes ``results.json``, plots and ``docs/results/validity.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.vec_env import DummyVecEnv

from rlattr.callbacks.sb3.policy import SB3PolicyEval, tracked_param_names
from rlattr.callbacks.sb3.replay import RoundRecorder
from rlattr.core.store import load_json, save_json
from rlattr.eval.metrics import spearman
from rlattr.eval.rl_validity import (
    SCORERS,
    RoundContext,
    intervention_thetas,
    local_ground_truth,
    local_lds,
    params_loaded,
    retrain_targets,
)
from rlattr.eval.schema import check_stage, validity_document
from rlattr.rl.replay import RoundSnapshot, max_abs_diff, replay_round
from rlattr.rl.targets import ReturnTarget

sys.path.insert(0, str(Path(__file__).parent))
from iif_envs import build_model, env_factory, evaluate  # noqa: E402

TARGETS = {"buffer": ReturnTarget("buffer"), "validation": ReturnTarget("validation")}


class RolloutReturns(BaseCallback):
    """Mean return of the last 100 finished episodes at each rollout end (SB3's ep_info_buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_round: list[float] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        buf = self.model.ep_info_buffer
        self.by_round.append(float(np.mean([e["r"] for e in buf])) if buf else float("nan"))


def train_and_record(
    env_cfg: dict[str, Any], cfg: dict[str, Any]
) -> tuple[Any, dict[int, RoundSnapshot], list]:
    """Train PPO up to the last stage round, recording the stage rounds with validation data."""
    model_cfg = {
        "env_id": env_cfg["env_id"],
        "policy": "mlp",
        "net_arch": [64, 64],
        "optimizer": "sgd",
        "n_envs": 1,
        "ppo": cfg["ppo"],
    }
    model = build_model(model_cfg, int(cfg["seed"]))
    val_env = DummyVecEnv([env_factory(model_cfg)])
    val_env.seed(int(cfg["seed"]) + 1000)
    rounds = sorted(env_cfg["stages"].values())
    recorder = RoundRecorder(rounds, validation_env=val_env, validation_steps=int(cfg["validation_steps"]))
    returns = RolloutReturns()
    model.learn((rounds[-1] + 1) * model.n_steps, callback=CallbackList([returns, recorder]))
    return model, recorder.snapshots, returns.by_round


def contexts(model: Any, snap: RoundSnapshot) -> dict[str, RoundContext]:
    policy = model.policy
    n_actions = int(model.action_space.n) if hasattr(model.action_space, "n") else None
    base = RoundContext(
        policy,
        SB3PolicyEval(policy, with_values=True),
        SB3PolicyEval(policy),
        tracked_param_names(policy),
        snap,
        n_actions=n_actions,
    )
    return {name: replace(base, target=t) for name, t in TARGETS.items()}


def all_scores(ctxs: dict[str, RoundContext], scorers: list[str]) -> tuple[dict, dict]:
    """``{target: {scorer: Tensor[n]}}`` and ``{target: {scorer: seconds}}``."""
    scores: dict[str, dict[str, torch.Tensor]] = {}
    seconds: dict[str, dict[str, float]] = {}
    for tname, ctx in ctxs.items():
        scores[tname], seconds[tname] = {}, {}
        for s in scorers:
            start = time.perf_counter()
            scores[tname][s] = SCORERS[s](ctx)
            seconds[tname][s] = time.perf_counter() - start
    return scores, seconds


def ground_truth(ctxs: dict[str, RoundContext], cfg: dict[str, Any]) -> dict[str, Any]:
    """Masks, target values ``[M, 2]`` (buffer, validation) and the second-seed noise ceiling."""
    ctx, seed = ctxs["buffer"], int(cfg["seed"])
    start = time.perf_counter()
    masks, values = local_ground_truth(
        ctx, int(cfg["subsets"]), fraction=float(cfg["fraction"]), seed=seed, targets=[TARGETS["validation"]]
    )
    k = int(cfg["noise_subsets"])
    again = retrain_targets(ctx, masks[:k], seed=seed + 10_000, targets=[TARGETS["validation"]])
    ceiling = {t: float(spearman(values[:k, j].numpy(), again[:, j].numpy())) for j, t in enumerate(TARGETS)}
    return {"masks": masks, "values": values, "ceiling": ceiling, "seconds": time.perf_counter() - start}


def intervention(model: Any, ctx: RoundContext, scores: torch.Tensor, env_cfg: dict, cfg: dict) -> dict:
    """Evaluation return (and targets) of the round re-run on all / all-but-bottom / all-but-random."""
    icfg = cfg["intervention"]
    seed = int(cfg["seed"])
    arms = intervention_thetas(
        ctx, scores, p=float(env_cfg["iif_p"]), n_random=int(icfg["random_draws"]), seed=seed
    )
    episodes = int(icfg["episodes"])
    eval_env = DummyVecEnv([env_factory({"env_id": env_cfg["env_id"]})] * int(icfg["eval_n_envs"]))

    def measure(theta: dict[str, torch.Tensor]) -> dict[str, float]:
        with params_loaded(model.policy, theta):
            ret, _ = evaluate(model, eval_env, episodes, seed + 7)
        out = {"return": ret}
        for tname, t in TARGETS.items():
            out[tname] = float(replace(ctx, target=t).target_value(theta)[0])
        return out

    full, bottom = measure(arms["full"]), measure(arms["bottom"])
    randoms = [measure(t) for t in arms["random"]]
    eval_env.close()
    keys = ("return", *TARGETS)
    random_mean = {k: float(np.mean([r[k] for r in randoms])) for k in keys}
    return {
        "n_dropped": arms["n_dropped"],
        "full": full,
        "bottom": bottom,
        "random": randoms,
        "delta_bottom": {k: bottom[k] - full[k] for k in keys},
        "delta_random": {k: random_mean[k] - full[k] for k in keys},
    }


def run_stage(model: Any, snap: RoundSnapshot, env_cfg: dict, cfg: dict) -> dict[str, Any]:
    if snap.theta_next is None:
        raise SystemExit(
            f"round {snap.records.round_index}: recorded without theta(k+1); cannot check replay"
        )
    ctxs = contexts(model, snap)
    t0 = time.perf_counter()
    replayed = replay_round(model.policy, ctxs["buffer"].policy_eval, snap)
    replay = {
        "max_abs_diff": max_abs_diff(replayed.theta, snap.theta_next),
        "seconds": time.perf_counter() - t0,
    }
    scores, seconds = all_scores(ctxs, list(cfg["scorers"]))
    gt = ground_truth(ctxs, cfg)
    lds = {
        t: local_lds(ctxs[t], scores[t], gt["masks"], gt["values"][:, j], n_boot=int(cfg["n_boot"]), seed=0)
        for j, t in enumerate(TARGETS)
    }
    names = list(cfg["scorers"])
    corr = np.corrcoef(np.stack([scores["buffer"][s].numpy() for s in names])).round(4).tolist()
    iv_scores = scores["buffer"][cfg["intervention"]["scorer"]]
    return {
        "replay": replay,
        "lds": lds,
        "ceiling": gt["ceiling"],
        "ground_truth_seconds": gt["seconds"],
        "target_spread": {t: float(gt["values"][:, j].std()) for j, t in enumerate(TARGETS)},
        "score_seconds": seconds,
        "score_correlation": {"scorers": names, "pearson": corr},
        "intervention": intervention(model, ctxs["buffer"], iv_scores, env_cfg, cfg),
        "n_records": len(snap.records),
        "n_validation": len(snap.validation) if snap.validation is not None else 0,
    }


def _load_stage(path: Path) -> dict[str, Any]:
    """A finished stage saved by an earlier run, checked against the library's schema."""
    row = load_json(path)
    check_stage(path.name, row)
    return row


def run_env(env_cfg: dict[str, Any], cfg: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    stage_files = {s: out / f"stage_{env_cfg['name']}_{s}.json" for s in env_cfg["stages"]}
    if all(f.exists() for f in stage_files.values()):
        return [_load_stage(f) for f in stage_files.values()]
    start = time.perf_counter()
    model, snaps, returns = train_and_record(env_cfg, cfg)
    train_seconds = time.perf_counter() - start
    print(f"[{env_cfg['name']}] trained {len(returns)} rounds in {train_seconds:.0f}s", flush=True)
    rows = []
    for stage, k in env_cfg["stages"].items():
        if stage_files[stage].exists():
            rows.append(_load_stage(stage_files[stage]))
            continue
        t0 = time.perf_counter()
        row = {"env": env_cfg["env_id"], "stage": stage, "round": k, "rollout_return": returns[k]}
        row.update(run_stage(model, snaps[k], env_cfg, cfg))
        row["seconds"], row["train_seconds"] = time.perf_counter() - t0, train_seconds
        save_json(stage_files[stage], row)
        check_stage(stage_files[stage].name, row)
        lds = {s: round(v["lds"], 3) for s, v in row["lds"]["buffer"].items()}
        print(f"[{env_cfg['name']}] {stage} (round {k}): LDS {lds} in {row['seconds']:.0f}s", flush=True)
        rows.append(row)
    model.env.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/validity.yaml")
    parser.add_argument("--out", default="docs/results/validity")
    parser.add_argument("--envs", nargs="*", help="names of the config's envs to run (default: all)")
    parser.add_argument("--subsets", type=int, help="override the config's M (smoke runs)")
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    if args.subsets is not None:
        cfg["subsets"], cfg["noise_subsets"] = args.subsets, min(cfg["noise_subsets"], args.subsets)
    envs = [e for e in cfg["envs"] if not args.envs or e["name"] in args.envs]
    if not envs:
        raise SystemExit(f"--envs: none of {args.envs} in {[e['name'] for e in cfg['envs']]}")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stages = [row for env_cfg in envs for row in run_env(env_cfg, cfg, out)]
    results = validity_document(
        stages, config=cfg, seed=int(cfg["seed"]), seconds=time.perf_counter() - start
    )
    save_json(out / "results.json", results)
    from rlattr.reporting.validity import plot_validity

    plot_validity(results, out)
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
