"""IIF beyond the paper: validation-target scoring, per-epoch re-scoring, adaptive drop size.

Each variant is checked against a brute-force reference: per-record autograd scores
(:func:`tests.callbacks.sb3.test_influence.brute_force`) and the rule written out by hand.
"""

from __future__ import annotations

import copy
from typing import Any
from unittest import mock

import pytest
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

import rlattr.callbacks.sb3.influence as influence_module
from rlattr.callbacks import IIFCallback
from rlattr.callbacks.sb3.validation import collect_validation
from rlattr.errors import RlattrError
from rlattr.rl.filtering import NegBottom
from rlattr.rl.records import RecordBatch
from tests.callbacks.sb3.test_iif import BATCH, N_ENVS, N_STEPS, CounterEnv, _model, _record_key
from tests.callbacks.sb3.test_influence import brute_force
from tests.rl.test_filtering import _adaptive_by_hand


def _spy(model: Any) -> list[dict[str, Any]]:
    """Per call of the buffer's get() (one per epoch): the policy then and the (counter, env) drawn."""
    calls: list[dict[str, Any]] = []
    buf = model.rollout_buffer
    original = buf.get
    # a copy made now: mid-train() the policy holds SB3's last action distribution, which is no leaf
    template = copy.deepcopy(model.policy)

    def get(batch_size: int | None = None):  # type: ignore[no-untyped-def]
        policy = copy.deepcopy(template)
        policy.load_state_dict(model.policy.state_dict())
        calls.append({"policy": policy, "samples": set()})
        for data in original(batch_size):
            calls[-1]["samples"].update((int(o[0]), int(o[1])) for o in data.observations.numpy())
            yield data

    buf.get = get
    return calls


def _keys(records: RecordBatch, keep: torch.Tensor) -> set[tuple[int, int]]:
    return {_record_key(i) for i in records.ids[keep].tolist()}


def test_validation_scores_are_brute_force_against_held_out_transitions() -> None:
    model = _model(n_epochs=1)
    calls = _spy(model)
    batches: list[RecordBatch] = []

    def collect(*args: Any, **kwargs: Any) -> RecordBatch:
        batches.append(collect_validation(*args, **kwargs))
        return batches[-1]

    val_env = DummyVecEnv([lambda: CounterEnv(7)])
    cb = IIFCallback(p=0.5, min_keep=1, score_on="validation", validation_env=val_env, validation_steps=24)
    with mock.patch.object(influence_module, "collect_validation", collect):
        model.learn(N_STEPS * N_ENVS, callback=cb)
    records, val = cb.last_records, batches[0]
    assert records is not None and len(batches) == 1 and len(val) == 24
    assert cb.last_scores is not None and cb.last_scores.target["source"] == "validation"
    ref = brute_force(calls[0]["policy"], records, cb.loss_config(), cb.param_names, target_records=val)
    on_buffer = brute_force(calls[0]["policy"], records, cb.loss_config(), cb.param_names)
    scale = float(ref.abs().max())
    torch.testing.assert_close(cb.last_scores.scores.double(), ref, rtol=1e-3, atol=1e-5 * scale)
    assert float((ref - on_buffer).abs().max()) > 1e-2 * scale  # a different target from the buffer's
    expected = NegBottom(0.5)(ref)
    assert 0 < expected.n_dropped < len(records)
    assert calls[0]["samples"] == _keys(records, expected.keep)  # train() saw exactly these


def _rescored_round(rescore: str, epochs: int) -> tuple[Any, IIFCallback, RecordBatch, list, torch.Tensor]:
    """One round of neg-bottom 0.5 with ``rescore``, spied on: (model, callback, records, the
    spy's calls, the first epoch's kept mask, checked against the rule on the round's scores)."""
    model = _model(n_epochs=epochs)
    calls = _spy(model)
    cb = IIFCallback(p=0.5, min_keep=1, rescore=rescore)
    model.learn(N_STEPS * N_ENVS, callback=cb)
    records = cb.last_records
    assert records is not None and len(calls) == epochs
    first = NegBottom(0.5)(cb.last_scores.scores).keep  # type: ignore[union-attr]
    assert calls[0]["samples"] == _keys(records, first)
    return model, cb, records, calls, first


def test_rescore_each_epoch_drops_what_the_rule_says_at_the_current_parameters() -> None:
    epochs = 3
    model, cb, records, calls, kept = _rescored_round("epoch", epochs)
    config = cb.loss_config()
    for e in range(1, epochs):
        pos = torch.nonzero(kept).flatten()
        subset = records.select(pos)
        # the target stays the whole round's return surrogate, at epoch e's parameters
        ref = brute_force(calls[e]["policy"], subset, config, cb.param_names, target_records=records)
        keep_sub = NegBottom(0.5)(ref).keep
        assert 0 < int((~keep_sub).sum()) < len(subset)
        kept = torch.zeros_like(kept)
        kept[pos[keep_sub]] = True
        assert calls[e]["samples"] == _keys(records, kept), f"epoch {e}"
        assert len(cb.filter_history[0]["epoch_drops"][e - 1]) == int((~keep_sub).sum())
    assert "get" not in vars(model.rollout_buffer) or model.rollout_buffer.get.__name__ == "get"
    assert model.rollout_buffer.buffer_size == N_STEPS  # restored at the end of training


def test_fresh_rescore_selects_from_every_record_at_each_epoch() -> None:
    epochs = 4
    model, cb, records, calls, first = _rescored_round("epoch-fresh", epochs)
    config = cb.loss_config()
    n_neg, n_neg_kept = [], []
    for e in range(1, epochs):
        # every record of the round, scored at epoch e's parameters against the round's target
        ref = brute_force(calls[e]["policy"], records, config, cb.param_names, target_records=records)
        expected = NegBottom(0.5)(ref)
        assert 0 < expected.n_dropped < len(records)
        assert calls[e]["samples"] == _keys(records, expected.keep), f"epoch {e}"
        dropped = cb.filter_history[0]["epoch_drops"][e - 1]
        assert sorted(map(tuple, dropped)) == sorted(map(tuple, records.ids[~expected.keep].tolist()))
        n_neg.append(int((ref < 0).sum()))
        n_neg_kept.append(int(((ref < 0) & first).sum()))
    # each epoch drops half the negatives of all the round's records (about 14 of 64 here) ...
    drops = [len(d) for d in cb.filter_history[0]["epoch_drops"]]
    assert drops == [n // 2 for n in n_neg]
    # ... so epoch 2 trains on more than a compounding rule would leave (half of the negatives
    # among the records epoch 1 kept, dropped from those)
    assert len(records) - drops[0] > int(first.sum()) - n_neg_kept[0] // 2
    assert model.rollout_buffer.get.__name__ == "get"  # the spy's own get, put back
    assert model.rollout_buffer.buffer_size == N_STEPS  # restored at the end of training


def test_adaptive_drop_keeps_what_the_hand_rule_keeps() -> None:
    model = _model(n_epochs=1)
    calls = _spy(model)
    cb = IIFCallback(drop="adaptive", rule_kwargs={"f": 0.5}, min_keep=1)
    model.learn(N_STEPS * N_ENVS, callback=cb)
    records, scores = cb.last_records, cb.last_scores
    assert records is not None and scores is not None
    keep, threshold = _adaptive_by_hand(scores.scores.double().tolist(), 0.5)
    assert calls[0]["samples"] == _keys(records, torch.tensor(keep))
    assert cb.filter_history[0]["threshold"] == pytest.approx(threshold)
    assert cb.rule.config()["f"] == 0.5


def _final_params(**kwargs: Any) -> dict[str, torch.Tensor]:
    model = _model(n_epochs=2)
    model.learn(2 * N_STEPS * N_ENVS, callback=IIFCallback(min_keep=BATCH, **kwargs) if kwargs else None)
    return {k: v.detach().clone() for k, v in model.policy.state_dict().items()}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"drop": "adaptive", "rule_kwargs": {"f": 0.0}, "rescore": "epoch"},
        {"drop": "adaptive", "rule_kwargs": {"f": 0.0}, "rescore": "epoch-fresh"},
        {"p": 0.0, "score_on": "validation", "validation_steps": 8},
    ],
)
def test_keep_all_variants_are_bit_identical_to_plain_ppo(kwargs: dict[str, Any]) -> None:
    if kwargs.get("score_on") == "validation":
        kwargs = {**kwargs, "validation_env": DummyVecEnv([lambda: CounterEnv(5)])}
    plain, filtered = _final_params(), _final_params(**kwargs)
    assert all(torch.equal(plain[k], filtered[k]) for k in plain)


def test_variant_arguments_are_named() -> None:
    with pytest.raises(RlattrError, match=r"^score_on: got 'held'; supported: \['buffer', 'validation'\]$"):
        IIFCallback(score_on="held")
    with pytest.raises(
        RlattrError, match=r"^rescore: got 'step'; supported: \['round', 'epoch', 'epoch-fresh'\]$"
    ):
        IIFCallback(rescore="step")
    with pytest.raises(RlattrError, match="^target: score_on='validation' sets the return target itself"):
        IIFCallback(score_on="validation", target="return", validation_env=DummyVecEnv([CounterEnv]))
    with pytest.raises(RlattrError, match="^rescore: got 'epoch' with advantage_norm='minibatch'"):
        IIFCallback(rescore="epoch", advantage_norm="minibatch")
    with pytest.raises(RlattrError, match="^rescore: got 'epoch-fresh' with advantage_norm='minibatch'"):
        IIFCallback(rescore="epoch-fresh", advantage_norm="minibatch")
    with pytest.raises(RlattrError, match="^validation_env: ReturnTarget"):
        IIFCallback(score_on="validation")
