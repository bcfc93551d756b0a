"""Tiny in-process environments for the SB3 adapter tests (no downloads, fast steps)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn


class ToyEnv(gym.Env):
    """Random vector (or image) observations, any action space; reward depends on the action.

    Episodes last ``horizon`` steps. Observations are drawn from the env's own seeded generator.
    """

    def __init__(self, action_space: spaces.Space, obs: str = "vector", horizon: int = 7) -> None:
        self.action_space = action_space
        if obs == "vector":
            self.observation_space = spaces.Box(-1.0, 1.0, (4,), np.float32)
        elif obs == "image":
            self.observation_space = spaces.Box(0, 255, (12, 12, 1), np.uint8)
        elif obs == "dict":
            self.observation_space = spaces.Dict(
                {"x": spaces.Box(-1.0, 1.0, (3,), np.float32), "k": spaces.Discrete(3)}
            )
        else:
            raise ValueError(obs)
        self.horizon, self.t = horizon, 0

    def _obs(self) -> Any:
        return self.observation_space.sample()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        self.observation_space.seed(int(self.np_random.integers(2**31)))
        self.t = 0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        self.t += 1
        reward = float(np.tanh(np.sum(np.asarray(action, dtype=np.float64))))
        return self._obs(), reward, False, self.t >= self.horizon, {}


class TinyCNN(BaseFeaturesExtractor):
    """A 2-layer CNN features extractor for 1x12x12 images (channel-first after SB3's transpose)."""

    def __init__(self, observation_space: spaces.Box, features_dim: int = 16) -> None:
        super().__init__(observation_space, features_dim)
        c = observation_space.shape[0]
        self.cnn = nn.Sequential(nn.Conv2d(c, 4, 3, stride=2), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            n = self.cnn(torch.zeros(1, *observation_space.shape)).shape[1]
        self.linear = nn.Sequential(nn.Linear(n, features_dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.cnn(x))


SMALL_NET = {"net_arch": {"pi": [16], "vf": [16]}}
