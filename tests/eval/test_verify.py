"""The verification protocol (rlattr.eval.verify) against exactly known datamodels."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from rlattr.errors import RlattrError, StoreError
from rlattr.eval.verify import (
    DISHONEST,
    Claim,
    FabricatingProver,
    HonestProver,
    Transcript,
    Verifier,
    excess_statistics,
    fit_datamodel,
    spot_checks_needed,
)
from rlattr.eval.verify.tasks import calibrated_claim, digits_margins, digits_retrain
from rlattr.testing.supervised import load_digits_split


class Counted:
    """``retrain(mask) -> float`` of an exactly linear datamodel, counting its calls."""

    def __init__(self, truth: Claim) -> None:
        self.truth, self.calls = truth, 0

    def __call__(self, mask: torch.Tensor) -> float:
        self.calls += 1
        return float(self.truth.predict(mask[None])[0])


def linear_target(n: int, seed: int = 0) -> tuple[Claim, Counted]:
    """An exactly linear f(S) = b + sum_{i in S} tau_i with known coefficients, and its retraining."""
    gen = torch.Generator().manual_seed(seed)
    truth = Claim(0.7, torch.randn(n, generator=gen, dtype=torch.float64))
    return truth, Counted(truth)


def exact_excess(claim: Claim, truth: Claim) -> float:
    """E_S[(h - f)^2] over uniform S for linear f, by hand: the difference d(S) = db + dtau . x has
    +-1 Fourier coefficients (db + sum dtau / 2) and dtau_i / 2."""
    d_tau = claim.scores - truth.scores
    d_b = claim.intercept - truth.intercept
    return float((d_b + d_tau.sum() / 2) ** 2 + (d_tau**2).sum() / 4)


def test_honest_accepted_exactly_on_a_linear_datamodel() -> None:
    truth, retrain = linear_target(40)
    for seed in range(5):
        t = Verifier(retrain, 0.1, 0.05, seed=seed).run(HonestProver(truth, retrain))
        assert t.accepted, t.reason
        assert abs(t.statistics["excess"]) < 1e-9 and t.statistics["claim_mse"] < 1e-20


@pytest.mark.parametrize("name", sorted(DISHONEST))
def test_each_dishonest_claim_rejected(name: str) -> None:
    truth, retrain = linear_target(40)
    variance = float((truth.scores**2).sum() / 4)  # Var f over uniform subsets
    for seed in range(5):
        claim = DISHONEST[name](truth, seed)
        # every manipulation's true excess is far above epsilon Var(f): rejection is the right answer
        assert exact_excess(claim, truth) > 0.2 * variance
        t = Verifier(retrain, 0.1, 0.05, seed=seed).run(HonestProver(claim, retrain))
        assert not t.accepted
        assert t.reason.startswith("excess MSE")
        assert t.n_retrainings == spot_checks_needed(0.1, 0.05)  # honest answers pass every spot check


def test_fabricated_answers_caught_by_the_first_spot_check() -> None:
    truth, retrain = linear_target(40)
    for name, make in DISHONEST.items():
        t = Verifier(retrain, 0.1, 0.05, seed=3).run(FabricatingProver(make(truth, 1)))
        assert not t.accepted and t.reason.startswith("spot check"), name
        assert t.n_retrainings == 1  # the answers are wrong almost everywhere


def test_excess_statistic_is_unbiased_against_brute_force_enumeration() -> None:
    """n = 4: the best linear datamodel and the excess by least squares over all 16 subsets."""
    n = 4
    cube = torch.tensor(list(itertools.product([0, 1], repeat=n)), dtype=torch.bool)
    x = cube.double()
    f = 1.0 + x @ torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=torch.float64) + 1.5 * x[:, 0] * x[:, 1]
    design = torch.cat([torch.ones(16, 1, dtype=torch.float64), x], dim=1)
    best = torch.linalg.lstsq(design, f[:, None]).solution[:, 0]
    claim = Claim(0.2, torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    excess = float(((f - claim.predict(cube)) ** 2).mean() - ((f - design @ best) ** 2).mean())
    gen = torch.Generator().manual_seed(0)
    estimates = []
    for _ in range(400):
        idx = torch.randint(0, 16, (50,), generator=gen)
        estimates.append(excess_statistics(cube[idx], f[idx], claim, 0.05)["excess"])
    mean = torch.tensor(estimates).mean()
    se = torch.tensor(estimates).std() / math.sqrt(len(estimates))
    assert abs(float(mean) - excess) < 4 * float(se)
    assert abs(float(mean) - excess) < 0.05 * excess


def test_excess_statistic_matches_hand_value_for_a_linear_target() -> None:
    truth, _ = linear_target(30, seed=1)
    claim = DISHONEST["scaled_down"](truth, 0)
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(20000, 30, generator=gen) < 0.5
    stats = excess_statistics(masks, truth.predict(masks), claim, 0.05)
    assert stats["excess"] == pytest.approx(exact_excess(claim, truth), rel=0.03)
    assert stats["best_mse"] == pytest.approx(0.0, abs=0.03 * exact_excess(claim, truth))


def test_retrainings_do_not_grow_with_n() -> None:
    k = spot_checks_needed(0.2, 0.05)
    assert k == math.ceil(math.log(2 / 0.05) / 0.2)
    for n in (50, 500, 2000):
        truth, retrain = linear_target(n)
        t = Verifier(retrain, 0.2, 0.05, seed=0, queries=200).run(FabricatingProver(truth))
        assert t.accepted  # answers from the true model are right answers
        assert t.n_retrainings == k == retrain.calls


def test_fit_datamodel_recovers_known_coefficients() -> None:
    truth, _ = linear_target(20, seed=2)
    masks = torch.rand(400, 20, generator=torch.Generator().manual_seed(0)) < 0.5
    fitted = fit_datamodel(masks, truth.predict(masks), ridge=0.0)
    assert torch.allclose(fitted.scores, truth.scores, atol=1e-9)
    assert fitted.intercept == pytest.approx(truth.intercept, abs=1e-9)
    calibrated = calibrated_claim(truth.scores / 3.0, masks, truth.predict(masks))
    assert torch.allclose(calibrated.scores, truth.scores, atol=1e-9)


def test_transcript_round_trip(tmp_path: Path) -> None:
    truth, retrain = linear_target(13)
    t = Verifier(retrain, 0.3, 0.1, seed=5).run(HonestProver(DISHONEST["permuted"](truth, 0), retrain))
    path = t.save(tmp_path / "t.json")
    back = Transcript.load(path)
    assert back.to_dict() == json.loads(json.dumps(t.to_dict()))
    assert torch.equal(back.masks(), t.masks())
    assert back.masks().shape == (len(t.answers), 13)
    doc = json.loads(path.read_text())
    assert doc["kind"] == "rlattr.verify.transcript" and doc["format_version"] == 1
    doc["format_version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=r"format_version: got 99; supported: up to 1"):
        Transcript.load(path)
    doc["format_version"], doc["n"], doc["decision"] = 1, "13", "maybe"
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=r"has malformed fields \['n', 'decision'\]"):
        Transcript.load(path)
    path.write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(StoreError, match="is not an rlattr verification transcript"):
        Transcript.load(path)


def test_argument_validation() -> None:
    _, retrain = linear_target(5)
    with pytest.raises(RlattrError, match=r"epsilon: got 0; supported: a number in \(0, 1\)"):
        Verifier(retrain, 0, 0.05)
    with pytest.raises(RlattrError, match=r"epsilon: got True; supported"):
        Verifier(retrain, True, 0.05)
    with pytest.raises(RlattrError, match=r"delta: got 1.5; supported: a number in \(0, 1\)"):
        Verifier(retrain, 0.1, 1.5)
    with pytest.raises(RlattrError, match=r"queries: got 10; supported: an integer >= 37"):
        Verifier(retrain, 0.1, 0.05, queries=10)
    with pytest.raises(RlattrError, match=r"tolerance: got -1; supported: a number >= 0"):
        Verifier(retrain, 0.1, 0.05, tolerance=-1)
    with pytest.raises(RlattrError, match=r"retrain: got int; supported: a callable"):
        Verifier(3, 0.1, 0.05)  # type: ignore[arg-type]
    with pytest.raises(RlattrError, match=r"scores: expected a finite Tensor\[n\]"):
        Claim(0.0, torch.tensor([1.0, float("nan")]))
    truth, retrain = linear_target(5)
    with pytest.raises(
        RlattrError, match=r"masks: got torch.bool \(4, 6\); supported: a bool Tensor\[m, 5\]"
    ):
        Verifier(retrain, 0.1, 0.05).run(
            HonestProver(truth, retrain), masks=torch.zeros(4, 6, dtype=torch.bool)
        )


def test_malformed_answers_rejected_without_retraining() -> None:
    truth, retrain = linear_target(8)

    class Short(HonestProver):
        def answer(self, masks: torch.Tensor) -> torch.Tensor:
            return torch.zeros(3, dtype=torch.float64)

    t = Verifier(retrain, 0.2, 0.05, seed=0).run(Short(truth, retrain))
    assert not t.accepted and t.reason.startswith("malformed answers") and t.n_retrainings == 0


def test_digits_retrain_same_alone_or_in_a_batch() -> None:
    data = load_digits_split(40, dtype=torch.float64)
    masks = torch.rand(3, 40, generator=torch.Generator().manual_seed(0)) < 0.5
    batch = digits_margins(data, masks, 2, steps=50)
    retrain = digits_retrain(data, 2, steps=50)
    alone = torch.tensor([retrain(m) for m in masks], dtype=torch.float64)
    assert torch.allclose(batch, alone, rtol=1e-10, atol=1e-12)
    assert float(batch.std()) > 0  # the subsets matter
    with pytest.raises(RlattrError, match=r"mask: got torch.bool \(39,\); supported: a bool Tensor\[40\]"):
        retrain(torch.ones(39, dtype=torch.bool))


def test_ppo_round_retrain_is_the_round_rerun_on_the_subset() -> None:
    from rlattr.callbacks.sb3.policy import SB3PolicyEval, tracked_param_names
    from rlattr.eval.rl_validity import RoundContext, retrain_subset
    from rlattr.eval.verify.tasks import ppo_round_retrain
    from tests.rl.test_replay import DISCRETE, recorded

    model, recorder = recorded(DISCRETE, rounds=1, learning_rate=3e-3)
    policy = model.policy
    snap = recorder.snapshots[0]
    ctx = RoundContext(policy, SB3PolicyEval(policy, with_values=True), SB3PolicyEval(policy),
                       tracked_param_names(policy), snap)  # fmt: skip
    retrain = ppo_round_retrain(ctx, seed=4)
    n = len(snap.records)
    mask = torch.arange(n) % 3 != 0
    theta = retrain_subset(policy, ctx.policy_eval, snap, mask, 4)
    assert retrain(mask) == float(ctx.target_value(theta)[0])
    assert retrain(mask) == retrain(mask.clone())  # deterministic: spot checks can be exact
    empty = torch.zeros(n, dtype=torch.bool)
    assert retrain(empty) == float(ctx.target_value(snap.theta)[0])  # no records: no update
    assert retrain(mask) != retrain(empty)
