"""What InfluenceCallback writes: snapshots read back by load_run, TensorBoard attr/ tags, retention."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import rlattr
from rlattr.callbacks.sb3.influence import InfluenceCallback
from rlattr.errors import MissingError, RunExistsError
from rlattr.reporting.report import write_report
from rlattr.rl.attribution import RoundScores
from rlattr.rl.records import index_observations
from rlattr.rl.targets import ReturnTarget
from tests.callbacks.sb3.envs import SMALL_NET, ToyEnv

torch.set_num_threads(1)


class KeepTheta(InfluenceCallback):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.thetas: dict[int, dict[str, torch.Tensor]] = {}

    def _on_round_scored(self, records, scores) -> None:
        self.thetas[records.round_index] = copy.deepcopy(self.model.policy.state_dict())


def _folder(cb: InfluenceCallback) -> Path:
    assert cb.run_dir is not None
    return cb.run_dir


def _scores(cb: InfluenceCallback) -> RoundScores:
    assert cb.last_scores is not None
    return cb.last_scores


def _learn(tmp_path, rounds: int = 4, **cb_kwargs) -> tuple[PPO, KeepTheta]:
    env = make_vec_env("CartPole-v1", n_envs=2, seed=2)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=16,
        batch_size=16,
        n_epochs=1,
        seed=2,
        policy_kwargs=SMALL_NET,
        tensorboard_log=str(tmp_path / "runs"),
    )
    cb = KeepTheta(**cb_kwargs)
    model.learn(rounds * 32, callback=cb, tb_log_name="PPO")
    return model, cb


def test_snapshot_round_trip(tmp_path) -> None:
    model, cb = _learn(tmp_path, rounds=3, by_group=True)
    assert cb.run_dir == tmp_path / "runs" / "PPO_1"
    run = rlattr.load_run(_folder(cb))
    assert run.rounds == [0, 1, 2]
    assert run.meta["hyperparameters"]["n_steps"] == 16 and run.meta["target"]["name"] == "return"
    assert run.meta["versions"]["stable-baselines3"] and "torch" in run.meta["versions"]
    scores = run.scores(2)
    torch.testing.assert_close(scores.scores, _scores(cb).scores, rtol=0, atol=0)
    assert cb.last_records is not None and torch.equal(scores.ids, cb.last_records.ids)
    assert scores.by_group is not None and scores.by_group.shape == (32, 2)
    rec = run.records(2)
    for name, t in cb.last_records.to_tensors().items():
        assert torch.equal(rec.to_tensors()[name], t), name
    theta = run.theta(1)
    assert all(torch.equal(theta[k], v) for k, v in cb.thetas[1].items())
    assert [s["round"] for s in run.summaries] == [0, 1, 2]
    assert 0 < run.summaries[-1]["disk_bytes"] <= run.disk_bytes


def test_retention_keeps_every_kth_and_last_n(tmp_path) -> None:
    _, cb = _learn(tmp_path, rounds=7, snapshot_every=2, keep_last=2)
    run = rlattr.load_run(_folder(cb) / "rlattr")
    assert run.rounds == list(range(7))  # scores of every round are kept
    assert [k for k in run.rounds if run.has_snapshot(k)] == [4, 6]
    with pytest.raises(MissingError, match="pruned"):
        run.records(2)


def test_tensorboard_events_carry_attr_tags(tmp_path) -> None:
    _, cb = _learn(tmp_path, rounds=4, image_every=2, probe_states=3, by_group=True)
    acc = EventAccumulator(str(cb.run_dir), size_guidance={"tensors": 0, "images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in (
        "attr/positive_fraction",
        "attr/score_mean",
        "attr/score_std",
        "attr/seconds",
        "attr/disk_mb",
    ):
        assert tag in tags["scalars"], tag
    assert "attr/score_hist" in tags["histograms"]
    assert "attr/score_vs_advantage" in tags["images"]
    assert any(t.startswith("attr/top_bottom") for t in tags["tensors"])
    pos = [e.value for e in acc.Scalars("attr/positive_fraction")]
    assert pos == pytest.approx([h["positive_fraction"] for h in cb.history], abs=1e-6)
    assert [e.step for e in acc.Scalars("attr/seconds")] == [32, 64, 96, 128]
    # the image_every-th scored rounds (1 and 3), never round 0
    assert [e.step for e in acc.Images("attr/score_vs_advantage")] == [64, 128]
    by_group = _scores(cb).by_group
    assert by_group is not None
    parts = by_group.abs().sum(0)
    share = [acc.Scalars(f"attr/layer_share/{g}")[-1].value for g in _scores(cb).group_names]
    assert share == pytest.approx((parts / parts.sum()).tolist(), abs=1e-6)


def test_a_run_shorter_than_image_every_draws_no_image(tmp_path) -> None:
    _, cb = _learn(tmp_path, rounds=2, image_every=3)
    acc = EventAccumulator(str(cb.run_dir), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("attr/seconds")] == [32, 64]  # both rounds were logged
    assert acc.Tags()["images"] == []


def test_a_second_run_refuses_to_overwrite(tmp_path) -> None:
    _, cb = _learn(tmp_path, rounds=1)
    env = make_vec_env("CartPole-v1", n_envs=1, seed=0)
    model = PPO("MlpPolicy", env, n_steps=16, batch_size=16, n_epochs=1, policy_kwargs=SMALL_NET)
    with pytest.raises(RunExistsError, match="already holds an rlattr run"):
        model.learn(16, callback=InfluenceCallback(log_dir=cb.run_dir))


def test_load_run_errors(tmp_path) -> None:
    with pytest.raises(rlattr.core.StoreError, match="holds no rlattr run"):
        rlattr.load_run(tmp_path)


def _probe_oracle(policy, records, config, names, obs, act) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores Tensor[m, n], logp Tensor[m])`` by autograd through SB3's own ``evaluate_actions``:
    ``scores[j, i] = <grad log pi(a_j|s_j), -grad L_PPO(z_i)>`` with buffer-normalised advantages."""
    assert config.advantage_norm == "buffer"
    tracked = [dict(policy.named_parameters())[n] for n in names]
    adv = records.advantages
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    acts = records.actions.long().flatten()
    record_grads = []
    for i in range(len(records)):
        _, logp, ent = policy.evaluate_actions(records.observations[i : i + 1], acts[i : i + 1])
        ratio = torch.exp(logp - records.old_log_prob[i])
        c = config.clip_range
        loss = -torch.min(adv[i] * ratio, adv[i] * torch.clamp(ratio, 1 - c, 1 + c)) - config.ent_coef * ent
        record_grads.append(torch.autograd.grad(loss.sum(), tracked))
    scores, logps = [], []
    for j in range(len(act)):
        _, logp, _ = policy.evaluate_actions(obs[j : j + 1], act[j : j + 1].long().flatten())
        g_f = torch.autograd.grad(logp.sum(), tracked)
        scores.append([-sum(float((a * b).sum()) for a, b in zip(g_f, g, strict=True)) for g in record_grads])
        logps.append(float(logp.detach()))
    return torch.tensor(scores), torch.tensor(logps)


def test_probe_scores_are_action_target_scores(tmp_path) -> None:
    _, cb = _learn(tmp_path, rounds=2, probe_states=3)
    run = rlattr.load_run(_folder(cb))
    first = run.score_tensors(0)
    obs, act = first["probe_observations"], first["probe_actions"]
    probed = index_observations(run.records(0).observations, torch.tensor([0, 15, 31]))
    assert isinstance(probed, torch.Tensor) and torch.equal(obs, probed)
    # round 1's probes against autograd through SB3's own policy at theta(1), one record at a time
    last = run.score_tensors(1)
    env = make_vec_env("CartPole-v1", n_envs=2, seed=0)
    policy = PPO("MlpPolicy", env, n_steps=16, batch_size=16, policy_kwargs=SMALL_NET).policy
    policy.load_state_dict(run.theta(1))
    ref, logp = _probe_oracle(policy, run.records(1), cb.loss_config(), cb.param_names, obs, act)
    assert last["probe_scores"].shape == (3, 32)
    scale = float(ref.abs().max())
    torch.testing.assert_close(last["probe_scores"].double(), ref.double(), rtol=1e-3, atol=1e-4 * scale)
    torch.testing.assert_close(last["probe_logp"], logp, rtol=1e-5, atol=1e-6)
    assert run.summaries[1]["probe_net"] == pytest.approx(ref.sum(1).tolist(), rel=1e-3, abs=1e-3 * scale)


def test_second_learn_call_continues_the_run(tmp_path) -> None:
    model, cb = _learn(tmp_path, rounds=2)
    model.learn(32, callback=cb, reset_num_timesteps=False)
    run = rlattr.load_run(_folder(cb))
    assert run.rounds == [0, 1, 2] and run.scores(2).ids[0].tolist() == [2, 0, 0]


def _dict_model(tmp_path, seed: int = 4) -> PPO:
    env = make_vec_env(lambda: ToyEnv(spaces.Discrete(3), obs="dict"), n_envs=2, seed=seed)
    return PPO(
        "MultiInputPolicy",
        env,
        n_steps=16,
        batch_size=16,
        n_epochs=2,
        seed=seed,
        policy_kwargs=SMALL_NET,
        tensorboard_log=str(tmp_path / "runs"),
    )


def test_dict_observations_end_to_end(tmp_path) -> None:
    """MultiInputPolicy: snapshots, probes, held-out target, TensorBoard table, report; PPO unchanged."""
    plain = _dict_model(tmp_path / "plain")
    plain.learn(3 * 32)
    model = _dict_model(tmp_path)
    validation = make_vec_env(lambda: ToyEnv(spaces.Discrete(3), obs="dict"), n_envs=1, seed=9)
    cb = KeepTheta(target=ReturnTarget(source="validation"), validation_env=validation, probe_states=2)
    model.learn(3 * 32, callback=cb, tb_log_name="PPO")
    for k, v in plain.policy.state_dict().items():  # the callback changed nothing PPO did
        assert torch.equal(v, model.policy.state_dict()[k]), k

    run = rlattr.load_run(_folder(cb))
    rec = run.records(2)
    assert isinstance(rec.observations, dict) and sorted(rec.observations) == ["k", "x"]
    assert cb.last_records is not None and isinstance(cb.last_records.observations, dict)
    for key, value in cb.last_records.observations.items():
        assert torch.equal(rec.observations[key], value), key
    assert rec.observations["x"].shape == (32, 3) and rec.observations["k"].shape == (32, 1)
    assert torch.equal(run.scores(2).scores, _scores(cb).scores)

    # the probes' log pi(a|s) at theta(k), against SB3's own evaluate_actions on the stored states
    first = run.score_tensors(0)
    probe_obs = {k: first[f"probe_observations/{k}"] for k in ("x", "k")}
    assert first["probe_scores"].shape == (2, 32)
    policy = model.policy.__class__(
        model.observation_space, model.action_space, lambda _: 0.0, **model.policy_kwargs
    )
    policy.load_state_dict(run.theta(0))
    policy.set_training_mode(False)
    with torch.no_grad():
        _, logp, _ = policy.evaluate_actions(probe_obs, first["probe_actions"].flatten())
    torch.testing.assert_close(first["probe_logp"], logp, rtol=1e-5, atol=1e-6)

    acc = EventAccumulator(str(cb.run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("attr/top_bottom/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "x: [" in text and "k: [" in text
    index = write_report(_folder(cb))
    assert "x: [" in index.read_text()
