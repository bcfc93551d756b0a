"""Validation transitions for the return target, collected from a separate VecEnv.

The caller wraps :func:`collect_validation` in :func:`rlattr.callbacks.sb3.preserved_rng`, so the
actions sampled here draw from a forked RNG and PPO's own random stream is untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv

from rlattr.callbacks.sb3.policy import records_from_buffer
from rlattr.errors import RlattrError
from rlattr.rl.records import RecordBatch

_STATE_ATTR = "_rlattr_validation_state"


def collect_validation(model: Any, env: VecEnv, n_steps: int, round_index: int) -> RecordBatch:
    """``n_steps`` steps per env of ``env`` with the current policy, GAE advantages: a RecordBatch.

    The env keeps running across rounds (its last observation is remembered on the env object).
    """
    if not isinstance(env, VecEnv):
        raise TypeError(f"validation_env: expected a stable_baselines3 VecEnv, got {type(env).__name__}")
    if env.observation_space != model.observation_space or env.action_space != model.action_space:
        raise RlattrError("validation_env: its observation and action spaces must equal the model's")
    policy = model.policy
    buffer_class = DictRolloutBuffer if isinstance(env.observation_space, spaces.Dict) else RolloutBuffer
    buffer = buffer_class(
        n_steps,
        env.observation_space,
        env.action_space,
        device="cpu",
        gamma=model.gamma,
        gae_lambda=model.gae_lambda,
        n_envs=env.num_envs,
    )
    last_obs, starts = getattr(env, _STATE_ATTR, (None, None))
    if last_obs is None:
        last_obs, starts = env.reset(), np.ones(env.num_envs, dtype=bool)
    dones = starts
    for _ in range(n_steps):
        with torch.no_grad():
            actions, values, log_probs = policy(obs_as_tensor(last_obs, policy.device))
        actions_np = actions.cpu().numpy()
        env_actions = actions_np
        if isinstance(env.action_space, spaces.Box):
            env_actions = np.clip(actions_np, env.action_space.low, env.action_space.high)
        new_obs, rewards, dones, _ = env.step(env_actions)
        if isinstance(env.action_space, spaces.Discrete):
            actions_np = actions_np.reshape(-1, 1)
        buffer.add(last_obs, actions_np, rewards, starts, values, log_probs)
        last_obs, starts = new_obs, dones
    with torch.no_grad():
        last_values = policy.predict_values(obs_as_tensor(last_obs, policy.device))
    buffer.compute_returns_and_advantage(last_values=last_values, dones=dones)
    setattr(env, _STATE_ATTR, (last_obs, starts))
    return records_from_buffer(buffer, round_index)
