"""Overhead of the TRL attribution hook per GRPO step, on CPU, against the step's own time.

For each model size the same GRPO run (same seed, data and settings) is timed twice: plain
``GRPOTrainer`` and ``IIFGRPOTrainer(drop=False)`` (scores every completion, drops none, so both
runs update on identical batch sizes). Reported per step, after ``--warmup`` steps:

* ``step s``: TRL's own ``step_time`` metric of the plain run (generation + loss + backward);
* ``hook s``: the hook's time (held-out generation, f_seq gradient, per-pair JVP scores, gathers);
* ``target s`` and ``scores s``: its two parts; overhead = hook s / step s.

Run: ``python experiments/bench_trl_hook.py --sizes tiny 10m --steps 8``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rlattr.callbacks.trl.trainer import AttributionConfig, IIFGRPOTrainer  # noqa: E402
from rlattr.testing.tiny_lm import addition_closeness_reward, addition_pairs, char_tokenizer, tiny_gpt2  # noqa: E402

SIZES = {
    "tiny": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 32},
    "10m": {"n_embd": 320, "n_layer": 8, "n_head": 8, "n_positions": 64},
}


def run(size: str, hook: bool, args: argparse.Namespace, target_every: int = 1) -> dict:
    tok = char_tokenizer()
    train, held = addition_pairs(9)
    model = tiny_gpt2(tok, **SIZES[size])
    cfg = GRPOConfig(
        output_dir=f"/tmp/bench_trl_hook/{size}",
        per_device_train_batch_size=args.batch,
        num_generations=args.generations,
        max_completion_length=args.completion_len,
        max_steps=args.steps,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    kw = {"model": model, "reward_funcs": addition_closeness_reward, "args": cfg, "processing_class": tok}
    kw["train_dataset"] = Dataset.from_dict({"prompt": train})
    if hook:
        att = AttributionConfig(held[: args.target_prompts], drop=False, target_every=target_every)
        trainer = IIFGRPOTrainer(**kw, attribution=att)
    else:
        trainer = GRPOTrainer(**kw)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    w = args.warmup
    steps = [h["step_time"] for h in trainer.state.log_history if "step_time" in h][w:]
    hist = getattr(trainer, "attribution_history", [])[w:]
    hook_s = [r["seconds"] for r in hist]
    target_s = [r["seconds_target"] for r in hist]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": float(np.mean(steps)),
        "hook_s": float(np.mean(hook_s)) if hook_s else 0.0,
        "target_s": float(np.mean(target_s)) if target_s else 0.0,
        "scores_s": float(np.mean(np.subtract(hook_s, target_s))) if hook_s else 0.0,
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "10m"], choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--completion-len", type=int, default=16)
    p.add_argument("--target-prompts", type=int, default=1)
    p.add_argument("--out", default="runs/bench_trl_hook.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for size in args.sizes:
        plain = run(size, False, args)
        per_refresh = 0.0
        for every in (1, 10):
            hooked = run(size, True, args, target_every=every)
            if every == 1:
                per_refresh = hooked["target_s"]
            # the warm-up window may hold no refresh at all: amortise the measured cost of one refresh
            amortised = hooked["scores_s"] + per_refresh / every
            row = {
                "size": size,
                "params": plain["params"],
                "target_every": every,
                "plain step s": plain["step_s"],
                "target s / refresh": per_refresh,
                "scores s": hooked["scores_s"],
                "hook s (amortised)": amortised,
                "overhead %": 100 * amortised / plain["step_s"],
                "scores only %": 100 * hooked["scores_s"] / plain["step_s"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
