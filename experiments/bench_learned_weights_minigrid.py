"""Issue 16: learned parameter-group weights on the MiniGrid CNN policy, for one PPO round.

The policy and PPO settings of the IIF study (``configs/iif/minigrid.yaml``: ImgObsWrapper, conv 16
/ conv 32 / linear 64 extractor, 64-64 heads, SGD lr 5e-3, 2,048 steps, 10 epochs of 64). PPO is
trained for ``--round`` rounds; round ``--round`` is recorded with ``--validation-steps`` held-out
transitions collected at theta(k). The actor's 12 parameter tensors are the groups.

* **Evaluation queries**: return surrogates (``rlattr.eval.rl_weights.parts_return_target``) on the
  round's own buffer (the paper's target) and on ``--parts`` parts of the second half of the
  held-out transitions.
* **Fit queries** (the weights see nothing else): the same surrogate on ``--parts`` parts of the
  first half of the held-out transitions, label-free top-k objective (k = 1% of the records).
* **Ground truth**: the round re-run from theta(k) on ``--subsets`` random halves of its records
  (seeded minibatch order), every query measured at each resulting policy; a second minibatch seed
  on the first ``--noise-subsets`` gives each query's noise ceiling.
* **Bases**: Grad-Dot at theta(k) and TracIn over the round's epoch-start checkpoints; for each,
  the LDS (mean over queries, and the buffer query alone) without and with learned weights, and of
  every group alone.

    nice -n 19 python experiments/bench_learned_weights_minigrid.py   # writes docs/results/lw_minigrid.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.vec_env import DummyVecEnv, VecTransposeImage

from rlattr.callbacks.sb3.policy import SB3PolicyEval, tracked_param_names
from rlattr.callbacks.sb3.replay import RoundRecorder
from rlattr.core.store import save_json
from rlattr.eval.metrics import lds, spearman
from rlattr.eval.rl_validity import RoundContext, local_ground_truth, retrain_targets
from rlattr.eval.rl_weights import learned_weights_round, parts_return_target
from rlattr.provenance import provenance
from rlattr.rl.records import RecordBatch
from rlattr.rl.replay import RoundSnapshot, max_abs_diff, replay_round

sys.path.insert(0, str(Path(__file__).resolve().parent))
from iif_envs import build_model, env_factory  # noqa: E402
from rl_attribution_validity import RolloutReturns  # noqa: E402


def record_round(a: argparse.Namespace) -> tuple[Any, RoundSnapshot, list[float]]:
    """Train PPO through round ``a.round`` and return its snapshot and each round's rollout return."""
    cfg = yaml.safe_load(Path(a.config).read_text())
    cfg.setdefault("net_arch", [64, 64])
    model = build_model(cfg, a.seed)
    val_env = VecTransposeImage(DummyVecEnv([env_factory(cfg)]))  # channel-first, as SB3 wraps the model's
    val_env.seed(a.seed + 1000)
    recorder = RoundRecorder([a.round], validation_env=val_env, validation_steps=a.validation_steps)
    returns = RolloutReturns()
    model.learn((a.round + 1) * model.n_steps, callback=CallbackList([recorder, returns]))
    return model, recorder.snapshots[a.round], returns.by_round


def split(batch: RecordBatch, parts: int) -> list[RecordBatch]:
    return [batch.select(idx) for idx in torch.arange(len(batch)).chunk(parts)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/iif/minigrid.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round", type=int, default=6)
    p.add_argument("--validation-steps", type=int, default=2048)
    p.add_argument("--parts", type=int, default=8)
    p.add_argument("--subsets", type=int, default=64)
    p.add_argument("--noise-subsets", type=int, default=16)
    p.add_argument("--every", type=int, default=1, help="TracIn checkpoint every this many epochs")
    p.add_argument("--json", default="docs/results/lw_minigrid.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, snap, returns = record_round(a)
    print(
        f"trained {a.round + 1} rounds in {time.perf_counter() - t0:.0f} s; rollout returns {returns}",
        flush=True,
    )
    assert snap.validation is not None and snap.theta_next is not None
    half = len(snap.validation) // 2
    held_fit = snap.validation.select(torch.arange(half))
    held_eval = snap.validation.select(torch.arange(half, 2 * half))
    policy = model.policy
    ctx = RoundContext(
        policy, SB3PolicyEval(policy, with_values=True), SB3PolicyEval(policy), tracked_param_names(policy),
        snap, target=parts_return_target([snap.records, *split(held_eval, a.parts)]),
    )  # fmt: skip
    replay_diff = max_abs_diff(replay_round(policy, ctx.policy_eval, snap).theta, snap.theta_next)
    fit_query = parts_return_target(split(held_fit, a.parts)).batch
    assert fit_query is not None
    t0 = time.perf_counter()
    masks, values = local_ground_truth(ctx, a.subsets, fraction=0.5, seed=a.seed)
    again = retrain_targets(ctx, masks[: a.noise_subsets], seed=a.seed + 10_000)
    gt_seconds = time.perf_counter() - t0
    ceiling = [float(spearman(values[: a.noise_subsets, j].numpy(), again[:, j].numpy()))
               for j in range(values.shape[1])]  # fmt: skip
    print(
        f"ground truth {gt_seconds:.0f} s; noise ceiling per query {np.round(ceiling, 2).tolist()}",
        flush=True,
    )
    rows: dict[str, Any] = {}
    for base in ("grad_dot", "tracin"):
        t0 = time.perf_counter()
        wr = learned_weights_round(ctx, base, fit_query, every=a.every, normalize=(False, True))
        rows[base] = {**wr.lds_report(masks, values), "seconds": time.perf_counter() - t0,
                      "fit_loss_first_last": {k: [h[0], h[-1]] for k, h in wr.history.items()}}  # fmt: skip
        for name, scores in (("", wr.base_scores()), *((f"_{v}", wr.weighted_scores(v)) for v in wr.weights)):
            rows[base][f"lds_buffer_query{name}"] = float(lds(scores[:1], masks.double(), values[:, :1]))
        print(base, {k: round(v, 3) for k, v in rows[base].items() if k.startswith("lds")}, flush=True)
        for key in (
            "weights_learned_weights",
            "weights_learned_weights_normalized",
            "group_lds",
            "group_share",
        ):
            print(f"  {key}", {k: round(v, 3) for k, v in rows[base][key].items()}, flush=True)
    save_json(a.json, {
        "config": vars(a), "provenance": provenance(), "results": rows, "rollout_returns": returns,
        "n_records": len(snap.records), "n_queries": int(values.shape[1]), "noise_ceiling": ceiling,
        "ground_truth_s": gt_seconds, "replay_max_abs_diff": replay_diff,
        "target_spread": values.std(0).tolist(),
    })  # fmt: skip


if __name__ == "__main__":
    main()
