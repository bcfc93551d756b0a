"""InfluenceCallback warns when nothing would be written to disk (no tensorboard_log, no log_dir)."""

from __future__ import annotations

import warnings

import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import PPO

from rlattr.callbacks.sb3.influence import InfluenceCallback
from tests.callbacks.sb3.envs import SMALL_NET, ToyEnv

torch.set_num_threads(1)


def _model(**kwargs) -> PPO:
    env = ToyEnv(spaces.Discrete(2))
    return PPO(
        "MlpPolicy", env, n_steps=16, batch_size=8, n_epochs=1, policy_kwargs=SMALL_NET, seed=0, **kwargs
    )


def test_warns_when_nothing_is_saved() -> None:
    cb = InfluenceCallback(target="return")
    with pytest.warns(UserWarning, match="nothing will be saved.*tensorboard_log.*log_dir"):
        _model().learn(16, callback=cb)
    assert cb.run_dir is None
    assert len(cb.history) == 1  # the scores are still computed, in memory


@pytest.mark.parametrize("where", ["log_dir", "tensorboard_log"])
def test_no_warning_when_a_folder_is_given(tmp_path, where) -> None:
    cb = InfluenceCallback(target="return", log_dir=tmp_path if where == "log_dir" else None)
    model = _model(tensorboard_log=str(tmp_path) if where == "tensorboard_log" else None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*nothing will be saved.*")
        model.learn(16, callback=cb)
    assert cb.run_dir is not None and (cb.run_dir / "rlattr" / "run.json").is_file()
