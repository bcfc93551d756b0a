"""``rlattr verify RUN --round K``: verify the stored scores of one PPO round of an ``rlattr train`` run.

The run folder holds the config (``config.yaml``), and for every round with a full snapshot the
records and the policy at theta(k) (``rlattr/round_K/``). The policy is rebuilt from the config
(SB3's ``model.zip`` is a pickle and is never loaded), theta(k) is loaded into it, and the round
is re-run from theta(k) on each asked subset with the round's saved hyperparameters
(:func:`rlattr.eval.verify.tasks.ppo_round_retrain`). The run does not store the optimizer state at
theta(k), so every retraining starts from a fresh one: exact for plain SGD, Adam's moments reset
otherwise (the transcript says which). The stored scores are grad-dot scores of unknown scale, so
the Prover first fits ``b + a * scores`` on its own ``calibration`` retrainings
(:func:`rlattr.eval.verify.tasks.calibrated_claim`), then answers the Verifier's queries honestly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlattr.callbacks.sb3.config import load_config
from rlattr.callbacks.sb3.policy import SB3PolicyEval
from rlattr.callbacks.sb3.train import build_model
from rlattr.errors import MissingError, RlattrError, StoreError
from rlattr.eval.rl_validity import RoundContext
from rlattr.eval.verify import HonestProver, Transcript, Verifier, spot_checks_needed
from rlattr.eval.verify.tasks import calibrated_claim, ppo_round_retrain
from rlattr.provenance import provenance
from rlattr.rl.replay import RoundHyperparameters, RoundSnapshot, seeded_permutations
from rlattr.rl.snapshots import AttributionRun, load_run
from rlattr.rl.targets import ReturnTarget


@dataclass
class VerifyOptions:
    """``epsilon``, ``delta`` (see :class:`rlattr.eval.verify.Verifier`), ``queries`` (None: the
    default), ``calibration`` (the Prover's own retrainings to fit scale and intercept), ``seed``
    (the Verifier's secret; None: from the OS), ``minibatch_seed`` (the order of every retraining)."""

    epsilon: float = 0.2
    delta: float = 0.05
    queries: int | None = None
    calibration: int = 32
    seed: int | None = None
    minibatch_seed: int = 0


def _hyperparameters(run: AttributionRun, ppo: dict[str, Any]) -> RoundHyperparameters:
    hp = run.meta.get("hyperparameters")
    if not isinstance(hp, dict):
        raise StoreError("run.json: lacks the PPO hyperparameters of the run")
    try:
        return RoundHyperparameters(
            learning_rate=float(hp["learning_rate"]), clip_range=float(hp["clip_range"]),
            clip_range_vf=None if ppo.get("clip_range_vf") is None else float(ppo["clip_range_vf"]),
            ent_coef=float(hp["ent_coef"]), vf_coef=float(hp["vf_coef"]),
            max_grad_norm=float(hp["max_grad_norm"]), normalize_advantage=bool(hp["normalize_advantage"]),
            target_kl=None if ppo.get("target_kl") is None else float(ppo["target_kl"]),
            n_epochs=int(hp["n_epochs"]), batch_size=int(hp["batch_size"]),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as err:
        raise StoreError(f"run.json: hyperparameters unreadable ({err})") from err


def _target(run: AttributionRun) -> ReturnTarget:
    target = run.meta.get("target")
    if (
        not isinstance(target, dict)
        or target.get("name") != "return"
        or target.get("source", "buffer") != "buffer"
    ):
        raise RlattrError(f"target: got {target!r}; supported: the return target on the round's buffer")
    return ReturnTarget("buffer")


def round_context(
    run_dir: str | Path, k: int, minibatch_seed: int = 0
) -> tuple[RoundContext, torch.Tensor, str]:
    """``(ctx, scores: Tensor[n], optimizer_note)`` for round ``k`` of the run in ``run_dir``."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    if not run.has_snapshot(k):
        raise MissingError(f"round: {k} has no full snapshot (records, theta) in {str(run_dir)!r}")
    config = load_config(run_dir / "config.yaml")
    model = build_model(config)
    model.env.close()  # type: ignore[union-attr]
    policy = model.policy
    theta = run.theta(k)
    try:
        policy.load_state_dict(theta)
    except RuntimeError as err:
        raise StoreError(
            f"round: theta of round {k} does not fit the policy built from config.yaml ({err})"
        ) from err
    records, stored = run.records(k), run.scores(k)
    if not torch.equal(stored.ids, records.ids):
        raise StoreError(f"round: the scores of round {k} are not keyed like its records")
    hyper = _hyperparameters(run, dict(config.ppo))
    snapshot = RoundSnapshot(
        theta={n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad},
        optimizer_state=policy.optimizer.state_dict(),
        optimizer_class=type(policy.optimizer),
        records=records,
        hyper=hyper,
        permutations=seeded_permutations(len(records), hyper.n_epochs, minibatch_seed),
    )
    names = run.meta.get("tracked_params")
    actor = [str(n) for n in names] if isinstance(names, list) else []
    ctx = RoundContext(
        policy,
        SB3PolicyEval(policy, with_values=True),
        SB3PolicyEval(policy),
        actor,
        snapshot,
        target=_target(run),
    )
    opt = type(policy.optimizer).__name__
    exact = opt == "SGD" and not policy.optimizer.param_groups[0].get("momentum")
    note = f"{opt}: fresh optimizer state at theta(k) ({'exact' if exact else 'moments reset'})"
    return ctx, stored.scores.double(), note


def verify_round(run_dir: str | Path, k: int, options: VerifyOptions) -> Transcript:
    """Run the protocol on round ``k``'s stored scores; the transcript's ``meta`` names the run."""
    spot_checks_needed(options.epsilon, options.delta)  # bad epsilon / delta fail before any work
    if (
        isinstance(options.calibration, bool)
        or not isinstance(options.calibration, int)
        or options.calibration < 2
    ):
        raise RlattrError(f"calibration: got {options.calibration!r}; supported: an integer >= 2")
    ctx, scores, note = round_context(run_dir, k, options.minibatch_seed)
    retrain = ppo_round_retrain(ctx, options.minibatch_seed)
    verifier = Verifier(retrain, options.epsilon, options.delta, queries=options.queries, seed=options.seed)
    # the Prover's own subsets come from a generator the Verifier does not use
    gen = torch.Generator().manual_seed(verifier.seed ^ 0x5EED)
    masks = torch.rand(options.calibration, scores.numel(), generator=gen, dtype=torch.float64) < 0.5
    values = torch.tensor([retrain(m) for m in masks], dtype=torch.float64)
    transcript = verifier.run(
        HonestProver(calibrated_claim(scores, masks, values), retrain, name="stored_scores")
    )
    transcript.meta.update(
        run=str(run_dir), round=k, optimizer=note, calibration=options.calibration,
        minibatch_seed=options.minibatch_seed, provenance=provenance(),
    )  # fmt: skip
    return transcript


__all__ = ["VerifyOptions", "round_context", "verify_round"]
