"""Does IIF make RLHF faster? GRPO vs IIF vs random drop on two CPU toys shaped like the paper's setting.

Scenarios (both offline, tiny GPT-2 from :mod:`rlattr.testing.tiny_lm`, tasks in ``rlhf_detox_tasks``):

* ``detox``: a tiny GPT-2 pretrained on a synthetic corpus about half of whose continuations are toxic
  by a context-dependent rule; GRPO (KL penalty ``--beta`` to the pretrained model) with a learned,
  imperfect reward model; f_seq over ``--target-prompts`` held-out prompts (at least the generation
  batch); the true toxicity rate measured with the rule itself.
* ``corrupt``: addition with ``--corrupt-frac`` of the training prompts rewarded for a fixed wrong
  answer; f_seq over a small trusted held-out set with the correct reward; true accuracy measured.

Arms, on the same pretrained weights, seeds, prompt order and sampling streams (the hook samples the
held-out completions on an RNG stream of its own): ``grpo`` (plain ``GRPOTrainer``), ``iif_p1`` /
``iif_p0.5`` / ``iif_p0.25`` (``IIFGRPOTrainer`` dropping that fraction of the negative pairs),
``random_p1`` (as many pairs as IIF p=1 would drop, at random) and ``iif_p1_small`` (f_seq over
``--small-target`` prompts only: the ablation); for ``corrupt``, ``grpo_clean`` (plain GRPO with the
correct reward on every prompt: what the corruption costs). Every arm-seed run is written as JSON
into ``--out`` as soon as it finishes (existing ones are skipped, so a stopped study resumes);
``rlhf_detox_report.py`` turns them into the tables of docs/results/rlhf.md.

Run: ``python experiments/rlhf_detox.py --scenario detox --arms grpo iif_p1 random_p1 --seeds 0 1 2 3 4``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from rlhf_detox_tasks import (  # noqa: E402  (run as a script from experiments/, or with it on sys.path)
    ALPHABET,
    COMPLETION_LEN,
    corrupt_reward,
    detox_prompts,
    is_toxic,
    pretrain_detox,
    train_reward_model,
)
from transformers import GPT2LMHeadModel, PrinterCallback, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rlattr.callbacks.trl import AttributionConfig, IIFGRPOTrainer  # noqa: E402
from rlattr.core.store import save_json  # noqa: E402
from rlattr.errors import RlattrError  # noqa: E402
from rlattr.provenance import provenance  # noqa: E402
from rlattr.rl.filtering import NegBottom, RandomDrop  # noqa: E402
from rlattr.testing.tiny_lm import (
    addition_answer,
    addition_pairs,
    char_tokenizer,
    pretrain_addition,
    tiny_gpt2,
)  # noqa: E402

ARMS = ("grpo", "iif_p1", "random_p1", "iif_p0.5", "iif_p0.25", "iif_p1_small", "grpo_clean")
SCENARIOS = ("detox", "corrupt")
MODEL: dict[str, Any] = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 16}


@dataclass
class Scenario:
    """Everything the arms of one scenario share: weights, prompts, reward and the ground-truth rule."""

    name: str
    tok: Any
    state: dict[str, torch.Tensor]
    ref_dir: str  # the pretrained model on disk: TRL builds its KL reference model from config._name_or_path
    train: list[str]
    target: list[str]
    eval_prompts: list[str]
    max_len: int
    reward: Any  # (prompts, completions, trusted) -> list[float]
    label: Any  # (prompt, completion) -> bool: toxic / corrupted pair (ground truth)
    success: Any  # (prompt, completion) -> bool: the quantity the user cares about (clean / right)
    info: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)  # extra prompt sets for the final evaluation


def build_detox(args: argparse.Namespace) -> Scenario:
    tok = char_tokenizer(ALPHABET)
    prompts = detox_prompts(args.train_prompts + args.target_prompts + args.eval_prompts, seed=0)
    train = prompts[: args.train_prompts]
    target = prompts[args.train_prompts : args.train_prompts + args.target_prompts]
    eval_prompts = prompts[args.train_prompts + args.target_prompts :]
    model, info = pretrained(
        "detox", tok, train, args, lambda m: pretrain_detox(m, tok, train, steps=args.pretrain_steps)
    )
    rm, info["reward_model"] = train_reward_model(
        train, n_train=args.rm_samples, label_noise=args.rm_label_noise
    )

    def reward(prompts: list[str], completions: list[str], trusted: bool) -> list[float]:
        return rm.reward(prompts, completions)  # the learned reward everywhere, held-out prompts included

    return _finish(
        Scenario("detox", tok, {}, "", train, target, eval_prompts, COMPLETION_LEN + 1, reward,
                 label=is_toxic, success=lambda p, c: not is_toxic(p, c), info=info),
        model, args,
    )  # fmt: skip


def build_corrupt(args: argparse.Namespace) -> Scenario:
    tok = char_tokenizer()
    train, held = addition_pairs(9)
    n_bad = round(len(train) * args.corrupt_frac)
    corrupted = set(random.Random(0).sample(train, n_bad))
    target, eval_prompts = held[: args.trusted_prompts], held[args.trusted_prompts :]
    model, info = pretrained(
        "corrupt",
        tok,
        train,
        args,
        lambda m: pretrain_addition(m, tok, train, correct_frac=args.correct_frac, steps=args.pretrain_steps),
    )
    info["corrupted_prompts"] = sorted(corrupted)

    reward = corrupt_reward(corrupted)
    scn = _finish(
        Scenario("corrupt", tok, {}, "", train, target, eval_prompts, 4, reward,
                 label=lambda p, c: p in corrupted, success=lambda p, c: c.strip() == addition_answer(p),
                 info=info),
        model, args,
    )  # fmt: skip
    scn.groups = {"corrupted": sorted(corrupted), "clean_train": [p for p in train if p not in corrupted]}
    for name, prompts in scn.groups.items():
        scn.info[f"pretrained_success_{name}"] = sampled_success(model, scn, prompts, seed=0)
    return scn


def pretrained(name: str, tok: Any, train: list[str], args: argparse.Namespace, fit: Any) -> tuple[Any, dict]:
    """The pretrained model of a scenario and its pretraining info; reused from ``--work-dir`` when a
    previous run pretrained with the same settings (pretraining is deterministic), else ``fit(model)``."""
    folder = Path(args.work_dir) / f"{name}_pretrained"
    key = {"model": MODEL, "train": train, "steps": args.pretrain_steps, "correct_frac": args.correct_frac}
    stamp = folder / "rlattr_pretrain.json"
    if stamp.exists():
        doc = json.loads(stamp.read_text())
        if doc.get("key") == key:
            return GPT2LMHeadModel.from_pretrained(folder), {**doc["info"], "reused_from": str(folder)}
    model = tiny_gpt2(tok, **MODEL)
    t0 = time.perf_counter()
    losses = fit(model)
    info = {"pretrain_seconds": time.perf_counter() - t0, "pretrain_final_loss": losses[-1]}
    model.save_pretrained(folder)  # also TRL's source for the KL reference model
    save_json(stamp, {"key": key, "info": info})
    return model, info


def _finish(scn: Scenario, model: Any, args: argparse.Namespace) -> Scenario:
    ref_dir = Path(args.work_dir) / f"{scn.name}_pretrained"
    scn.state = {k: v.clone() for k, v in model.state_dict().items()}
    scn.ref_dir = str(ref_dir)
    scn.info["pretrained_success"] = sampled_success(model, scn, scn.eval_prompts, seed=0)
    scn.info["pretrained_success_train"] = sampled_success(model, scn, scn.train, seed=0)
    return scn


def sampled_success(model: Any, scn: Scenario, prompts: list[str], *, seed: int, n: int = 8) -> float:
    """Share of ``n`` temperature-1 samples per prompt that the ground-truth rule calls a success."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.eval()
        enc = scn.tok(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, max_new_tokens=scn.max_len, num_return_sequences=n)
    comps = scn.tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    reps = [p for p in prompts for _ in range(n)]
    return float(np.mean([scn.success(p, c) for p, c in zip(reps, comps, strict=True)]))


class StepClock(TrainerCallback):
    """Cumulative wall-clock seconds at the end of every optimizer step."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.t0)


class Recorder:
    """The trainer's reward function; keeps, per training generation batch, the ground-truth labels.

    TRL calls it once per generation batch with the rows in the order of the batch the hook scores
    (and once more for the hook's held-out batch, whose rows carry ``split == "target"``).
    """

    def __init__(self, scn: Scenario, *, all_trusted: bool = False) -> None:
        self.scn = scn
        self.all_trusted = all_trusted  # the grpo_clean reference arm: the trusted reward on every prompt
        self.labels: list[list[bool]] = []
        self.success: list[float] = []
        self.__name__ = f"{scn.name}_reward"

    def __call__(
        self, prompts: list[str], completions: list[str], split: list[str], **kw: Any
    ) -> list[float]:
        trusted = split[0] == "target"
        if not trusted:
            pairs = list(zip(prompts, completions, strict=True))
            self.labels.append([bool(self.scn.label(p, c)) for p, c in pairs])
            self.success.append(float(np.mean([self.scn.success(p, c) for p, c in pairs])))
        return self.scn.reward(prompts, completions, trusted or self.all_trusted)


def arm_rule(arm: str, seed: int) -> tuple[Any, bool]:
    """(selection rule, small f_seq?) of a dropping arm."""
    if arm == "random_p1":
        return RandomDrop(NegBottom(1.0), seed=seed), False
    if arm == "iif_p1_small":
        return NegBottom(1.0), True
    return NegBottom(float(arm.removeprefix("iif_p"))), False


def drop_counts(hist: list[dict[str, Any]], labels: list[list[bool]]) -> dict[str, list[int]]:
    """Per generation batch: dropped pairs, labelled pairs, dropped labelled pairs, and the same for the
    harmful pairs (labelled with a positive advantage: the ones that teach the bad behaviour)."""
    if len(hist) != len(labels):
        raise RlattrError(f"attribution_history: {len(hist)} batches but {len(labels)} rewarded batches")
    out: dict[str, list[int]] = {
        k: [] for k in ("n", "dropped", "lab", "dropped_lab", "harm", "dropped_harm")
    }
    for rec, lab in zip(hist, labels, strict=True):
        keep, adv = rec["keep"].bool(), rec["advantages"].float()
        y = torch.tensor(lab, dtype=torch.bool)
        if y.numel() != keep.numel():
            raise RlattrError(f"keep: {keep.numel()} pairs but {y.numel()} labels")
        harm, drop = y & (adv > 0), ~keep
        for k, v in (("n", keep.numel()), ("dropped", drop.sum()), ("lab", y.sum()), ("dropped_lab", (drop & y).sum()),
                     ("harm", harm.sum()), ("dropped_harm", (drop & harm).sum())):  # fmt: skip
            out[k].append(int(v))
    return out


def run_arm(scn: Scenario, arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    model = tiny_gpt2(scn.tok, **MODEL)
    model.load_state_dict(scn.state)
    model.config._name_or_path = scn.ref_dir
    cfg = GRPOConfig(
        output_dir=str(Path(args.work_dir) / f"{scn.name}__{arm}__seed{seed}"),
        per_device_train_batch_size=args.prompts_per_step * args.generations,
        num_generations=args.generations,
        max_completion_length=scn.max_len,
        max_steps=args.steps,
        learning_rate=args.lr,
        beta=args.beta,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=seed,
        disable_dropout=True,
        disable_tqdm=True,
    )
    rec = Recorder(scn, all_trusted=arm == "grpo_clean")
    data = Dataset.from_dict({"prompt": scn.train, "split": ["train"] * len(scn.train)})
    kw = {
        "model": model,
        "reward_funcs": rec,
        "args": cfg,
        "processing_class": scn.tok,
        "train_dataset": data,
    }
    if arm in ("grpo", "grpo_clean"):
        trainer: Any = GRPOTrainer(**kw)
    else:
        rule, small = arm_rule(arm, seed)
        target = scn.target[: args.small_target] if small else scn.target
        rows = [{"prompt": p, "split": "target"} for p in target]
        attribution = AttributionConfig(rows, rule=rule, log_text_k=0, save=False)
        trainer = IIFGRPOTrainer(**kw, attribution=attribution)
    trainer.remove_callback(PrinterCallback)  # TRL's per-step log lines; the JSON keeps what we need
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    hist = list(getattr(trainer, "attribution_history", []))
    logs = trainer.state.log_history
    return {
        "scenario": scn.name,
        "arm": arm,
        "seed": seed,
        "true_success": rec.success,  # per step: clean (detox) / right (corrupt) share of the batch
        "reward": [h["reward"] for h in logs if "reward" in h],  # TRL's: the learned / corrupted reward
        "kl": [h["kl"] for h in logs if "kl" in h],
        "seconds": clock.seconds,
        "kept_fraction": [float(r["keep"].float().mean()) for r in hist],
        "hook_seconds": [float(r["seconds"]) for r in hist],
        "target_reward": [float(r["target_reward"]) for r in hist],
        "drops": drop_counts(hist, rec.labels) if hist else {},
        "eval_success": sampled_success(trainer.model, scn, scn.eval_prompts, seed=1000 + seed),
        "train_success": sampled_success(trainer.model, scn, scn.train, seed=2000 + seed),
        **{
            f"{name}_success": sampled_success(trainer.model, scn, prompts, seed=3000 + seed)
            for name, prompts in scn.groups.items()
        },
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--scenario", choices=SCENARIOS, required=True)
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS[:3]))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.04, help="KL penalty to the pretrained model")
    p.add_argument("--pretrain-steps", type=int, default=None, help="default: 300 detox, 1000 corrupt")
    p.add_argument("--target-prompts", type=int, default=16, help="detox: held-out prompts for f_seq")
    p.add_argument("--small-target", type=int, default=2, help="f_seq prompts of the iif_p1_small ablation")
    p.add_argument("--train-prompts", type=int, default=400, help="detox: training prompts")
    p.add_argument("--eval-prompts", type=int, default=64, help="detox: prompts for the final true rate")
    p.add_argument("--rm-samples", type=int, default=600, help="detox: reward-model training texts")
    p.add_argument("--rm-label-noise", type=float, default=0.1, help="detox: share of flipped labels")
    p.add_argument("--corrupt-frac", type=float, default=0.2, help="corrupt: share of corrupted prompts")
    p.add_argument("--trusted-prompts", type=int, default=8, help="corrupt: trusted held-out f_seq prompts")
    p.add_argument("--correct-frac", type=float, default=0.5, help="corrupt: right answers in pretraining")
    p.add_argument("--out", default="docs/results/rlhf_detox/runs", help="one JSON per arm-seed run")
    p.add_argument("--work-dir", default="runs/rlhf_detox", help="scratch: trainer folders, reference model")
    args = p.parse_args(argv)
    if args.pretrain_steps is None:
        args.pretrain_steps = 300 if args.scenario == "detox" else 1000
    if args.scenario == "detox" and args.target_prompts < args.prompts_per_step * args.generations:
        print(f"note: f_seq over {args.target_prompts} prompts < the generation batch", flush=True)
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    scn = build_detox(args) if args.scenario == "detox" else build_corrupt(args)
    setup = {"args": vars(args), "info": scn.info, "provenance": provenance()}
    setup_path = out / f"{scn.name}__setup.json"
    if setup_path.exists():  # a later invocation (more arms or seeds): same pretrained model, or refuse
        first = json.loads(setup_path.read_text())
        same = ("pretrained_success", "pretrained_success_train", "reward_model")
        if any(first["info"].get(k) != scn.info.get(k) for k in same):
            raise RlattrError(
                f"out: {setup_path} was written for another pretrained model; supported: a new --out"
            )
        first.setdefault("later_invocations", []).append(
            {"args": vars(args), "provenance": setup["provenance"]}
        )
        setup = {**first, "provenance": first["provenance"]}
    save_json(setup_path, setup)
    print(scn.name, {k: v for k, v in scn.info.items() if k != "corrupted_prompts"}, flush=True)
    done = []
    for seed in args.seeds:
        for arm in args.arms:
            path = out / f"{scn.name}__{arm}__seed{seed}.json"
            if path.exists():
                continue
            res = run_arm(scn, arm, seed, args)
            res["provenance"], res["args"] = provenance(), vars(args)
            save_json(path, res)  # atomic: a stopped study loses at most the run in progress
            done.append(res)
            tail = float(np.mean(res["true_success"][-5:]))
            print(f"{scn.name} {arm} seed {seed}: true success (last 5) {tail:.3f}, "
                  f"eval {res['eval_success']:.3f}, {res['seconds'][-1]:.1f}s", flush=True)  # fmt: skip
    return done


if __name__ == "__main__":
    main()
