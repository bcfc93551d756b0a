"""InfluenceCallback / IIFCallback on a bad day: full disks, reuse, stacked callbacks, NaN rewards."""

from __future__ import annotations

import errno
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.env_util import make_vec_env

import rlattr
import rlattr.rl.snapshots as snapshots
from rlattr.callbacks.sb3.iif import IIFCallback
from rlattr.callbacks.sb3.influence import InfluenceCallback
from rlattr.errors import RlattrError
from rlattr.reporting.tensorboard import AttrWriter
from tests.callbacks.sb3.envs import SMALL_NET

torch.set_num_threads(1)
ROUNDS, N_STEPS, N_ENVS = 3, 16, 2


def _model(env_id: str = "CartPole-v1", seed: int = 3, **kwargs) -> PPO:
    env = make_vec_env(env_id, n_envs=N_ENVS, seed=seed)
    return PPO(
        "MlpPolicy",
        env,
        n_steps=N_STEPS,
        batch_size=16,
        n_epochs=2,
        seed=seed,
        policy_kwargs=SMALL_NET,
        **kwargs,
    )


def _params(model: PPO) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.policy.state_dict().items()}


def _plain() -> dict[str, torch.Tensor]:
    model = _model()
    model.learn(ROUNDS * N_STEPS * N_ENVS)
    return _params(model)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _full_disk_after(n_ok: int):
    calls = {"n": 0}
    real = snapshots.save_tensors

    def save_tensors(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    return save_tensors


def test_a_full_disk_warns_once_stops_snapshots_and_training_goes_on(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(snapshots, "save_tensors", _full_disk_after(3))  # round 0 written whole
    model = _model()
    cb = InfluenceCallback(log_dir=tmp_path)
    with pytest.warns(UserWarning, match="No space left on device.*snapshots stop") as record:
        model.learn(ROUNDS * N_STEPS * N_ENVS, callback=cb)
    assert sum("snapshots stop" in str(w.message) for w in record) == 1
    assert len(cb.history) == ROUNDS  # scoring goes on in memory
    _assert_same(_params(model), _plain())  # and PPO trained exactly as without the callback
    assert rlattr.load_run(tmp_path).rounds == [0]


def test_a_failing_tensorboard_writer_warns_once_and_training_goes_on(tmp_path, monkeypatch) -> None:
    def log_round(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(AttrWriter, "log_round", log_round)
    model = _model()
    cb = InfluenceCallback(log_dir=tmp_path)
    with pytest.warns(UserWarning, match="Read-only file system.*TensorBoard") as record:
        model.learn(ROUNDS * N_STEPS * N_ENVS, callback=cb)
    assert sum("TensorBoard" in str(w.message) for w in record) == 1
    assert rlattr.load_run(tmp_path).rounds == [0, 1, 2]  # the snapshots still go on


def test_reusing_a_callback_for_another_model_is_refused(tmp_path) -> None:
    cb = InfluenceCallback(log_dir=tmp_path)
    model = _model()
    model.learn(N_STEPS * N_ENVS, callback=cb)
    model.learn(N_STEPS * N_ENVS, callback=cb, reset_num_timesteps=False)  # the same model: continues
    with pytest.raises(
        RlattrError, match="callback: this InfluenceCallback already recorded a run of another model"
    ):
        _model().learn(N_STEPS * N_ENVS, callback=cb)
    assert len(rlattr.load_run(tmp_path).rounds) == 2


def test_influence_after_iif_in_a_callback_list_refuses_the_compacted_buffer() -> None:
    model = _model()
    stacked = CallbackList([IIFCallback(p=0.5, min_keep=4), InfluenceCallback()])
    with pytest.raises(RlattrError, match="rollout_buffer: .*compacted"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.learn(2 * N_STEPS * N_ENVS, callback=stacked)


def test_iif_that_keeps_everything_trains_bit_identically_with_two_envs() -> None:
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cb = IIFCallback(p=0.0)
        model.learn(ROUNDS * N_STEPS * N_ENVS, callback=cb)
    assert [h["n_kept"] for h in cb.filter_history] == [N_STEPS * N_ENVS] * ROUNDS
    _assert_same(_params(model), _plain())


class NanReward(gym.Wrapper):
    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, float("nan"), terminated, truncated, info


def test_nan_rewards_are_named() -> None:
    env = make_vec_env("CartPole-v1", n_envs=1, seed=0, wrapper_class=NanReward)
    model = PPO("MlpPolicy", env, n_steps=N_STEPS, batch_size=16, policy_kwargs=SMALL_NET)
    with (
        pytest.raises(RlattrError, match="rewards: round 0 holds 16 non-finite reward"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        model.learn(N_STEPS, callback=InfluenceCallback())


def test_a_frozen_actor_is_named_before_the_first_rollout() -> None:
    model = _model()
    for name, p in model.policy.named_parameters():
        if not name.startswith("value_net") and "value" not in name:
            p.requires_grad_(False)
    steps: list[int] = []

    def count_step() -> bool:
        steps.append(1)
        return True

    cb = InfluenceCallback()
    cb._on_step = count_step  # type: ignore[method-assign]
    with pytest.raises(RlattrError, match="params: no trainable actor parameter"):
        model.learn(N_STEPS * N_ENVS, callback=cb)
    assert steps == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": "abc"}, "seed: expected an integer, got 'abc'"),
        ({"log_dir": 123}, "log_dir: expected a path"),
        ({"keep_rounds": 0}, "keep_rounds: expected an integer >= 1 or None"),
    ],
)
def test_bad_iif_arguments_are_named_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(RlattrError, match=match):
        IIFCallback(**kwargs)


def test_keep_rounds_prunes_old_round_folders(tmp_path) -> None:
    model = _model()
    cb = InfluenceCallback(log_dir=tmp_path, keep_rounds=2)
    model.learn(ROUNDS * N_STEPS * N_ENVS, callback=cb)
    run = rlattr.load_run(tmp_path)
    assert run.rounds == [1, 2] and [s["round"] for s in run.summaries] == [0, 1, 2]
    assert np.isclose(run.summaries[-1]["disk_bytes"], snapshots.dir_bytes(tmp_path / "rlattr"), rtol=0.05)
