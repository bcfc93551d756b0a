"""Cost of the TRL attribution hook per GRPO step, against the step's own time (medians, one thread).

For each model size the same GRPO run (same seed, data and settings) is timed as

* ``plain``: ``GRPOTrainer``;
* ``score``: ``IIFGRPOTrainer(drop=False)``: pair scores from the training step's own backward;
* ``iif``: ``IIFGRPOTrainer(drop=True)``: the same, and the dropped pairs' gradient removed before
  the optimizer step;

with f_seq refreshed every ``target_every`` = 1 and 10 generation batches. Per step, after
``--warmup`` steps (medians): ``step s`` is TRL's own ``step_time`` (generation, loss, backward;
the hook runs inside it), ``target s`` the f_seq refresh (held-out generation + one captured
backward, measured where it ran), ``scores s`` the rest of the hook (ghost dot products after each
micro-batch's backward, the decision, the gradient surgery, logging). The overhead reported is
``scores s + target s / target_every`` over the plain step; ``step ratio`` is the hooked run's
median step over the plain run's (noisier: it compares two runs; it also holds what ``scores s``
leaves out: the capture hooks inside forward / backward and the logger's metrics and run folder).
The reward counts digits, so that an untrained model's completions get varied advantages.

Run: ``python experiments/bench_trl_hook.py --sizes tiny 10m --steps 10``. Nothing is downloaded.
On a GPU: ``python experiments/bench_trl_hook.py --sizes 125m --device cuda --steps 10``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rlattr.callbacks.trl.trainer import AttributionConfig, IIFGRPOTrainer  # noqa: E402
from rlattr.core.store import save_json  # noqa: E402
from rlattr.provenance import provenance  # noqa: E402
from rlattr.testing.tiny_lm import addition_pairs, char_tokenizer, tiny_gpt2  # noqa: E402

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 32},
    "10m": {"n_embd": 320, "n_layer": 8, "n_head": 8, "n_positions": 64},
    "30m": {"n_embd": 512, "n_layer": 10, "n_head": 8, "n_positions": 64},
    # GPT-2 small's shape (768 x 12 layers); ~85M parameters with the character vocabulary
    "125m": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 64},
}
MODES = ("plain", "score", "iif")


def digit_reward(completions: list[str], **kwargs: object) -> list[float]:
    """Digits in the completion: an untrained model earns varied rewards, so advantages (and drops) are real."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def run(size: str, mode: str, args: argparse.Namespace, target_every: int = 1) -> dict:
    tok = char_tokenizer()
    train, held = addition_pairs(9)
    model = tiny_gpt2(tok, **SIZES[size])  # type: ignore[arg-type]
    out_dir = tempfile.mkdtemp(prefix=f"bench_trl_hook_{size}_{mode}_")
    cfg = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch,
        num_generations=args.generations,
        max_completion_length=args.completion_len,
        max_steps=args.steps,
        logging_steps=1,
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=False,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    kw: dict[str, Any] = {"model": model, "reward_funcs": digit_reward, "args": cfg}
    kw["processing_class"] = tok
    kw["train_dataset"] = Dataset.from_dict({"prompt": train})
    if mode == "plain":
        trainer = GRPOTrainer(**kw)
    else:
        att = AttributionConfig(
            [{"prompt": p} for p in held[: args.target_prompts]],
            drop=mode == "iif",
            target_every=target_every,
        )
        trainer = IIFGRPOTrainer(**kw, attribution=att)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    w = args.warmup
    steps = [h["step_time"] for h in trainer.state.log_history if "step_time" in h][w:]
    hist = getattr(trainer, "attribution_history", [])[w:]
    refresh = [
        r["seconds_target"]
        for r in getattr(trainer, "attribution_history", [])
        if r["round"] % target_every == 0
    ]
    plan = getattr(trainer, "_attr_plan", None)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": statistics.median(steps),
        "target_s": statistics.median(refresh) if refresh else 0.0,
        "scores_s": statistics.median([r["seconds"] - r["seconds_target"] for r in hist]) if hist else 0.0,
        "kept": statistics.mean([float(r["keep"].float().mean()) for r in hist]) if hist else 1.0,
        "fused": bool(plan.fused) if plan is not None else None,
        "wall_s": wall,
    }


def _median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parts(size: str, args: argparse.Namespace, repeats: int = 5) -> dict:
    """Where the hook's time goes, measured piece by piece on one generation batch (medians).

    ``fwd_bwd``: TRL's ``compute_loss`` + backward on the batch (one micro-batch); ``captured``: the
    same with the layers captured; ``dots``: the per-pair scores from the captures (dense and ghost
    forms); ``surgery``: removing half of the pairs from the gradient; ``target_gen`` and
    ``target_bwd``: the f_seq refresh's held-out generation and its captured backward.
    """
    from rlattr.callbacks.trl.fused import micro_batch_scores, pair_target, remove_rows
    from rlattr.core.ghost import build_target

    tok = char_tokenizer()
    train, held = addition_pairs(9)
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_parts_"),
        per_device_train_batch_size=args.batch,
        num_generations=args.generations,
        max_completion_length=args.completion_len,
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=False,
        seed=0,
    )
    att = AttributionConfig([{"prompt": p} for p in held[: args.target_prompts]], drop=True, save=False)
    model = tiny_gpt2(tok, **SIZES[size])  # type: ignore[arg-type]
    t = IIFGRPOTrainer(
        model=model,
        reward_funcs=digit_reward,
        args=cfg,
        processing_class=tok,
        train_dataset=Dataset.from_dict({"prompt": train}),
        attribution=att,
    )
    t.current_gradient_accumulation_steps = 1
    t.model.train()
    n_prompts = args.batch // args.generations
    out = GRPOTrainer._generate_and_score_completions(
        t, [{"prompt": p} for p in train[:n_prompts] for _ in range(8)]
    )
    capture = t._attr_capture
    res: dict[str, Any] = {"size": size, "pairs": out["advantages"].numel()}

    def fwd_bwd() -> None:
        GRPOTrainer.compute_loss(t, t.model, out).backward()

    def captured() -> list:
        with capture.recording(rows=out["advantages"].numel()) as recs:
            loss = GRPOTrainer.compute_loss(t, t.model, out)
        loss.backward()
        return recs

    res["fwd_bwd s"] = _median_time(fwd_bwd, repeats)
    res["captured fwd_bwd s"] = _median_time(captured, repeats)
    res["target_gen s"] = _median_time(lambda: t._target_generation(), max(2, repeats // 2))
    target_out = t._target_generation()
    assert target_out is not None
    res["target_bwd s"] = _median_time(lambda: pair_target(t, capture, t.model, target_out), repeats)
    recs = captured()
    for form in ("dense", "auto"):
        target = pair_target(t, capture, t.model, target_out)
        target = build_target(capture, [], target.direction) if form == "dense" else target
        res[f"dots {form} s"] = _median_time(lambda g=target: micro_batch_scores(capture, recs, g), repeats)
    drop = torch.arange(out["advantages"].numel()) % 2 == 0
    res["surgery s"] = _median_time(
        lambda: remove_rows(capture, t.model, [(torch.arange(drop.numel()), recs)], drop, 1.0), repeats
    )
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "10m"], choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--completion-len", type=int, default=16)
    p.add_argument("--target-prompts", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="runs/bench_trl_hook.json")
    p.add_argument("--parts", action="store_true", help="time the hook's pieces on one batch instead")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.parts:
        found = [parts(size, args) for size in args.sizes]
        for r in found:
            print(json.dumps(r), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_json(Path(args.out), {"args": vars(args), "provenance": provenance(), "parts": found})
        return
    rows = []
    for size in args.sizes:
        plain = run(size, "plain", args)
        for mode in MODES[1:]:
            for every in (1, 10):
                hooked = run(size, mode, args, target_every=every)
                amortised = hooked["scores_s"] + hooked["target_s"] / every
                row = {
                    "size": size,
                    "params": plain["params"],
                    "mode": mode,
                    "target_every": every,
                    "plain step s": plain["step_s"],
                    "target s / refresh": hooked["target_s"],
                    "scores s": hooked["scores_s"],
                    "overhead %": 100 * amortised / plain["step_s"],
                    "scores only %": 100 * hooked["scores_s"] / plain["step_s"],
                    "step ratio": hooked["step_s"] / plain["step_s"],
                    "kept": hooked["kept"],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    info = {**provenance(), "threads": torch.get_num_threads(), "device": args.device}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_json(Path(args.out), {"args": vars(args), "provenance": info, "rows": rows})
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
