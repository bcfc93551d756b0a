"""RLHF study on CPU, offline: GRPO with and without IIF on a tiny GPT-2 doing addition.

1. Build a character tokenizer and a tiny GPT-2 in-process; pretrain it on ``"a+b=c"`` strings whose
   answer is right only ``--correct-frac`` of the time (so sampling is often wrong).
2. For each seed run TRL's GRPO three ways from the same pretrained weights: plain ``GRPOTrainer``,
   ``IIFGRPOTrainer`` dropping every negative-scored completion (p = 1, the paper's RLHF setting),
   and a random-drop baseline dropping as many completions as IIF would, chosen at random.
3. Record the reward per step (TRL's own ``reward`` metric on the training prompts), wall-clock,
   steps to a reward threshold, SE_ave / SE_peak / RT_peak (rlattr.eval.efficiency) and held-out
   accuracy; write JSON, a PNG of the reward curves (``rlhf_reward.png``) and a Markdown table
   (``rlhf_table.md``) into ``--out``, or into ``--doc-dir`` when given (``docs/results`` for the
   figures that docs/results/rlhf.md shows).

Run: ``python experiments/rlhf_iif.py --seeds 0 1 2 --steps 60``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rlattr.callbacks.trl.trainer import AttributionConfig, IIFGRPOTrainer  # noqa: E402
from rlattr.core.store import atomic_write_bytes, save_json  # noqa: E402
from rlattr.eval.efficiency import efficiency  # noqa: E402
from rlattr.provenance import provenance  # noqa: E402
from rlattr.rl.filtering import make_rule  # noqa: E402
from rlattr.testing.tiny_lm import (  # noqa: E402
    addition_closeness_reward,
    addition_pairs,
    addition_reward,
    char_tokenizer,
    pretrain_addition,
    tiny_gpt2,
)

ARMS = ("grpo", "iif", "random")
MODEL: dict[str, Any] = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 32}


class StepClock(TrainerCallback):
    """Cumulative wall-clock seconds at the end of every optimizer step."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds.append(time.perf_counter() - self.t0)


def sampled_accuracy(
    model: GPT2LMHeadModel, tok: PreTrainedTokenizerFast, prompts: list[str], n: int = 8, seed: int = 0
) -> float:
    """Fraction of ``n`` sampled completions per prompt that are exactly right (temperature 1)."""
    torch.manual_seed(seed)
    model.eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, max_new_tokens=4, num_return_sequences=n)
    comps = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return float(np.mean(addition_reward([p for p in prompts for _ in range(n)], comps)))


def run_arm(
    arm: str,
    seed: int,
    state: dict[str, torch.Tensor],
    tok: PreTrainedTokenizerFast,
    train: list[str],
    held: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    model = tiny_gpt2(tok, **MODEL)
    model.load_state_dict(state)
    cfg = GRPOConfig(
        output_dir=str(Path(args.out) / f"{arm}__seed{seed}"),
        per_device_train_batch_size=args.prompts_per_step * args.generations,
        num_generations=args.generations,
        max_completion_length=4,
        max_steps=args.steps,
        learning_rate=args.lr,
        logging_steps=1,
        report_to="tensorboard",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=seed,
        disable_dropout=True,
        disable_tqdm=True,
    )
    kw: dict[str, Any] = {
        "model": model,
        "reward_funcs": addition_closeness_reward,
        "args": cfg,
        "processing_class": tok,
    }
    kw["train_dataset"] = Dataset.from_dict({"prompt": train})
    if arm == "grpo":
        trainer = GRPOTrainer(**kw)
    else:
        rule = make_rule("neg-bottom" if arm == "iif" else "random", p=1.0, seed=seed)
        pool = held if args.target_from == "heldout" else train[::-1]  # "train": fresh samples, seen prompts
        target = pool[: args.target_prompts]
        trainer = IIFGRPOTrainer(
            **kw, attribution=AttributionConfig(target, rule=rule, target_every=args.target_every)
        )
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    hist = getattr(trainer, "attribution_history", [])
    return {
        "arm": arm,
        "seed": seed,
        "reward": rewards,
        "seconds": clock.seconds,
        "kept_fraction": [float(r["keep"].float().mean()) for r in hist],
        "hook_seconds": [float(r["seconds"]) for r in hist],
        "train_acc": sampled_accuracy(model, tok, train, seed=seed),
        "target_reward": [float(r["target_reward"]) for r in hist],
        "heldout_acc": sampled_accuracy(model, tok, held, seed=seed),
    }


def smooth(x: list[float], w: int) -> np.ndarray:
    """Trailing moving average: ``float[len(x)]``."""
    a = np.asarray(x, dtype=float)
    c = np.cumsum(np.insert(a, 0, 0.0))
    return np.array([(c[i + 1] - c[max(0, i + 1 - w)]) / (i + 1 - max(0, i + 1 - w)) for i in range(a.size)])


def steps_to(curve: np.ndarray, level: float) -> float:
    hit = np.nonzero(curve >= level)[0]
    return float(hit[0] + 1) if hit.size else float("inf")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--target-prompts", type=int, default=4)
    p.add_argument("--target-every", type=int, default=1)
    p.add_argument(
        "--target-from", choices=("heldout", "train"), default="heldout", help="f_seq's prompt pool"
    )
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--correct-frac", type=float, default=0.6)
    p.add_argument("--threshold", type=float, default=0.6, help="reward level for steps-to-threshold")
    p.add_argument("--smooth", type=int, default=5, help="moving-average window for curves")
    p.add_argument("--out", default="runs/rlhf_iif")
    p.add_argument(
        "--doc-dir", default=None, help="folder for rlhf_reward.png and rlhf_table.md (default: --out)"
    )
    p.add_argument("--report-only", action="store_true", help="rewrite the report from <out>/results.json")
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.report_only:
        write_report(json.loads((Path(args.out) / "results.json").read_text()), args)
        return
    torch.set_num_threads(1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tok = char_tokenizer()
    train, held = addition_pairs(9)
    base = tiny_gpt2(tok, **MODEL)
    t0 = time.perf_counter()
    losses = pretrain_addition(base, tok, train, correct_frac=args.correct_frac, steps=args.pretrain_steps)
    pre = {"seconds": time.perf_counter() - t0, "final_loss": losses[-1]}
    pre["train_acc"] = sampled_accuracy(base, tok, train)
    pre["heldout_acc"] = sampled_accuracy(base, tok, held)
    print("pretrained:", pre, flush=True)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    runs = []
    for seed in args.seeds:
        for arm in ARMS:
            res = run_arm(arm, seed, state, tok, train, held, args)
            print(
                arm,
                seed,
                f"final reward {np.mean(res['reward'][-5:]):.3f}",
                f"{res['seconds'][-1]:.1f}s",
                flush=True,
            )
            runs.append(res)
    result = {"args": vars(args), "pretrain": pre, "provenance": provenance(), "runs": runs}
    save_json(Path(args.out) / "results.json", result)  # atomic
    write_report(result, args)


def arm_stats(runs: list[dict], arm: str, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Mean and std over seeds of the per-run summaries of one arm."""
    mine = [r for r in runs if r["arm"] == arm]
    base = {r["seed"]: r for r in runs if r["arm"] == "grpo"}
    rows: dict[str, list[float]] = {}
    for r in mine:
        curve = smooth(r["reward"], args.smooth)
        secs = np.asarray(r["seconds"][: curve.size])
        n = steps_to(curve, args.threshold)
        vals = {
            "final reward (last 5 steps)": float(np.mean(r["reward"][-5:])),
            f"steps to smoothed reward {args.threshold}": n,
            f"seconds to smoothed reward {args.threshold}": float(secs[int(n) - 1])
            if np.isfinite(n)
            else np.inf,
            "wall-clock s (whole run)": float(secs[-1]),
            "kept fraction": float(np.mean(r["kept_fraction"])) if r["kept_fraction"] else 1.0,
            "hook s / step": float(np.mean(r["hook_seconds"])) if r["hook_seconds"] else 0.0,
            "train-prompt accuracy (sampled)": r["train_acc"],
            "held-out accuracy (sampled)": r["heldout_acc"],
        }
        if arm != "grpo":
            b = base[r["seed"]]
            eff = efficiency(
                curve,
                smooth(b["reward"], args.smooth),
                method_seconds=secs,
                base_seconds=np.asarray(b["seconds"][: len(b["reward"])]),
            )
            vals.update(
                {"SE_ave vs GRPO": eff.se_ave, "SE_peak vs GRPO": eff.se_peak, "RT_peak vs GRPO": eff.rt_peak}
            )
        for k, v in vals.items():
            rows.setdefault(k, []).append(v)
    return {k: (float(np.mean(v)), float(np.std(v))) for k, v in rows.items()}


def plot(runs: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for arm in ARMS:
        curves = np.stack([smooth(r["reward"], args.smooth) for r in runs if r["arm"] == arm])
        x = np.arange(1, curves.shape[1] + 1)
        ax.plot(x, curves.mean(0), label=arm)
        ax.fill_between(x, curves.min(0), curves.max(0), alpha=0.2)
    ax.axhline(args.threshold, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(f"train reward ({args.smooth}-step mean)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(result: dict, args: argparse.Namespace) -> None:
    doc_dir = Path(args.doc_dir if args.doc_dir is not None else args.out)
    doc_dir.mkdir(parents=True, exist_ok=True)
    png = doc_dir / "rlhf_reward.png"
    plot(result["runs"], args, png)
    stats = {arm: arm_stats(result["runs"], arm, args) for arm in ARMS}
    keys = list(stats["iif"])
    lines = ["| metric | " + " | ".join(ARMS) + " |", "|---|" + "---|" * len(ARMS)]
    for k in keys:
        cells = [f"{stats[a][k][0]:.3g} +- {stats[a][k][1]:.2g}" if k in stats[a] else "" for a in ARMS]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    atomic_write_bytes(doc_dir / "rlhf_table.md", (table + "\n").encode())
    print(table)


if __name__ == "__main__":
    main()
