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
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs

from rlattr.callbacks.sb3.policy import records_from_buffer
from rlattr.errors import RlattrError
from rlattr.rl.records import RecordBatch

_STATE_ATTR = "_rlattr_validation_state"
PolicyObs = np.ndarray | dict[str, np.ndarray]


def _policy_obs(obs: VecEnvObs) -> PolicyObs:
    if isinstance(obs, tuple):
        raise RlattrError("validation_env: tuple observation spaces are not supported by SB3's PPO")
    return obs


def _buffer(space: spaces.Space, n_steps: int, env: VecEnv, model: Any) -> RolloutBuffer:
    settings: dict[str, Any] = {"device": "cpu", "gamma": model.gamma, "gae_lambda": model.gae_lambda}
    if isinstance(space, spaces.Dict):
        return DictRolloutBuffer(n_steps, space, env.action_space, n_envs=env.num_envs, **settings)
    return RolloutBuffer(n_steps, space, env.action_space, n_envs=env.num_envs, **settings)


def collect_validation(model: Any, env: VecEnv, n_steps: int, round_index: int) -> RecordBatch:
    """``n_steps`` steps per env of ``env`` with the current policy, GAE advantages: a RecordBatch.

    The env keeps running across rounds (its last observation is remembered on the env object).
    """
    if not isinstance(env, VecEnv):
        raise TypeError(f"validation_env: expected a stable_baselines3 VecEnv, got {type(env).__name__}")
    if env.observation_space != model.observation_space or env.action_space != model.action_space:
        raise RlattrError("validation_env: its observation and action spaces must equal the model's")
    policy = model.policy
    buffer = _buffer(env.observation_space, n_steps, env, model)
    state: tuple[PolicyObs, np.ndarray] | None = getattr(env, _STATE_ATTR, None)
    if state is None:
        state = _policy_obs(env.reset()), np.ones(env.num_envs, dtype=bool)
    last_obs, starts = state
    dones = starts
    for _ in range(n_steps):
        with torch.no_grad():
            actions, values, log_probs = policy(obs_as_tensor(last_obs, policy.device))
        actions_np = actions.cpu().numpy()
        env_actions = actions_np
        if isinstance(env.action_space, spaces.Box):
            env_actions = np.clip(actions_np, env.action_space.low, env.action_space.high)
        new_obs, rewards, dones, _ = env.step(env_actions)
        new_obs = _policy_obs(new_obs)
        if isinstance(env.action_space, spaces.Discrete):
            actions_np = actions_np.reshape(-1, 1)
        # RolloutBuffer.add is annotated for array observations; DictRolloutBuffer.add takes the dict
        buffer.add(last_obs, actions_np, rewards, starts, values, log_probs)  # type: ignore[arg-type]
        last_obs, starts = new_obs, dones
    with torch.no_grad():
        last_values = policy.predict_values(obs_as_tensor(last_obs, policy.device))
    buffer.compute_returns_and_advantage(last_values=last_values, dones=dones)
    setattr(env, _STATE_ATTR, (last_obs, starts))
    return records_from_buffer(buffer, round_index)
