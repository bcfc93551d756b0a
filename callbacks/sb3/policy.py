"""stable-baselines3 specifics: what is supported, the policy evaluator, buffer -> RecordBatch.

Everything here reads SB3 objects and never writes to them: the buffer is copied, the policy's
parameters are only swapped in by :func:`torch.func.functional_call` (which puts them back), and
the action distribution object SB3 caches on the policy is restored after every evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.distributions import StateDependentNoiseDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import preprocess_obs
from torch import Tensor, nn
from torch.func import functional_call

from rlattr.core.task import Params
from rlattr.errors import RlattrError
from rlattr.rl.ppo import PolicyOutput
from rlattr.rl.records import Observations, RecordBatch, map_observations

SUPPORTED_ACTION_SPACES = (spaces.Discrete, spaces.Box, spaces.MultiDiscrete, spaces.MultiBinary)
SUPPORTED_OBS_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)
_VALUE_ONLY_PREFIXES = ("value_net.", "mlp_extractor.value_net.", "vf_features_extractor.")
PARAM_SETS = ("actor", "all")


def _names(classes: tuple[type, ...]) -> str:
    return ", ".join(c.__name__ for c in classes)


def check_model(model: Any) -> None:
    """Raise a clear error unless ``model`` is a vanilla SB3 PPO this adapter can score."""
    if not isinstance(model, BaseAlgorithm):
        raise TypeError(f"model: expected a stable_baselines3 PPO, got {type(model).__name__}")
    if not isinstance(model, PPO):
        raise TypeError(
            f"model: InfluenceCallback supports stable_baselines3.PPO only (on-policy, clipped surrogate); "
            f"got {type(model).__name__}. A2C, recurrent PPO and off-policy algorithms (DQN, SAC, TD3, "
            "DDPG) are not supported"
        )
    policy = model.policy
    if not isinstance(policy, ActorCriticPolicy) or "recurrent" in type(policy).__name__.lower():
        raise TypeError(
            f"model.policy: supported policies are SB3's ActorCriticPolicy family (MlpPolicy, CnnPolicy); "
            f"got {type(policy).__name__} (recurrent policies are not supported)"
        )
    if isinstance(policy.action_dist, StateDependentNoiseDistribution) or getattr(model, "use_sde", False):
        raise RlattrError("model.use_sde: generalized state-dependent exploration (gSDE) is not supported")
    if not isinstance(model.action_space, SUPPORTED_ACTION_SPACES):
        raise TypeError(
            f"model.action_space: got {type(model.action_space).__name__}; supported: "
            f"{_names(SUPPORTED_ACTION_SPACES)}"
        )
    obs_space = model.observation_space
    if isinstance(obs_space, spaces.Dict):
        bad = {
            k: type(v).__name__
            for k, v in obs_space.spaces.items()
            if not isinstance(v, SUPPORTED_OBS_SPACES)
        }
        if bad:
            raise TypeError(
                f"model.observation_space: Dict entries {bad} are not supported; each entry of a Dict "
                f"observation must be one of {_names(SUPPORTED_OBS_SPACES)} (nested Dict and Tuple are not)"
            )
    elif not isinstance(obs_space, SUPPORTED_OBS_SPACES):
        raise TypeError(
            f"model.observation_space: got {type(obs_space).__name__}; supported: "
            f"{_names(SUPPORTED_OBS_SPACES)} and a Dict of them (MultiInputPolicy)"
        )
    expected = DictRolloutBuffer if isinstance(obs_space, spaces.Dict) else RolloutBuffer
    if type(model.rollout_buffer) is not expected:
        raise TypeError(
            f"model.rollout_buffer: expected SB3's {expected.__name__}, got {type(model.rollout_buffer).__name__}"
        )


def tracked_param_names(policy: ActorCriticPolicy, which: str = "actor") -> list[str]:
    """Parameter names scored: ``"actor"`` leaves the value head (and a separate value extractor)
    out and keeps a shared feature extractor; ``"all"`` keeps every trainable parameter."""
    if which not in PARAM_SETS:
        raise RlattrError(f"params: got {which!r}; supported: {PARAM_SETS}")
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    if which == "actor":
        names = [n for n in names if not n.startswith(_VALUE_ONLY_PREFIXES)]
    return names


class _EvaluateActions(nn.Module):
    """``forward(obs, actions)`` = the pieces of ``ActorCriticPolicy.evaluate_actions`` scores need."""

    def __init__(self, policy: ActorCriticPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(
        self, obs: Observations, actions: Tensor, with_values: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        policy = self.policy
        if with_values:
            values, log_prob, entropy = policy.evaluate_actions(obs, actions)
            return log_prob, entropy, values.flatten()
        x = preprocess_obs(obs, policy.observation_space, normalize_images=policy.normalize_images)
        latent_pi = policy.mlp_extractor.forward_actor(policy.pi_features_extractor(x))
        dist = policy._get_action_dist_from_latent(latent_pi)
        return dist.log_prob(actions), dist.entropy(), None


class SB3PolicyEval:
    """A :data:`rlattr.rl.ppo.PolicyEval` for an SB3 ``ActorCriticPolicy``.

    ``self(params, obs: Tensor[n, ...], actions: Tensor[n, action_dim]) -> PolicyOutput`` with
    ``params`` keyed by the policy's own parameter names; untracked parameters keep their values.
    Actions are converted as ``PPO.train`` receives them (``RolloutBuffer`` hands out float32
    actions; Discrete ones become ``long().flatten()``). ``action_dtype`` exists for float64 checks.
    """

    def __init__(
        self, policy: ActorCriticPolicy, with_values: bool = False, action_dtype: torch.dtype = torch.float32
    ) -> None:
        self.policy = policy
        self.with_values = with_values
        self.action_dtype = action_dtype
        self._wrapper = _EvaluateActions(policy)
        self._discrete = isinstance(policy.action_space, spaces.Discrete)

    def __call__(self, params: Params, obs: Observations, actions: Tensor) -> PolicyOutput:
        device = self.policy.device
        obs = map_observations(lambda x: x.to(device), obs)
        actions = actions.to(device=device, dtype=self.action_dtype)
        if self._discrete:
            actions = actions.long().flatten()
        prefixed = {f"policy.{k}": v for k, v in params.items()}
        # tie_weights=False: SB3 registers a shared extractor under three names (features_extractor,
        # pi_/vf_features_extractor); functional_call's alias handling then fails to put the
        # original Parameters back. One name is enough, as the three names are one module.
        with self._dist_restored():
            log_prob, entropy, values = functional_call(
                self._wrapper, prefixed, (obs, actions, self.with_values), strict=False, tie_weights=False
            )
        return PolicyOutput(log_prob=log_prob, entropy=entropy, values=values)

    @contextmanager
    def _dist_restored(self) -> Iterator[None]:
        dist = self.policy.action_dist
        saved = getattr(dist, "distribution", None)
        try:
            yield
        finally:
            if hasattr(dist, "distribution"):
                dist.distribution = saved  # type: ignore[assignment]


def records_from_buffer(buffer: RolloutBuffer | DictRolloutBuffer, round_index: int) -> RecordBatch:
    """Copy a full, not yet flattened (Dict)RolloutBuffer into a RecordBatch (ids (round, step, env))."""
    if not buffer.full:
        raise RlattrError(
            f"buffer: the rollout buffer is not full (pos={buffer.pos} of {buffer.buffer_size})"
        )
    if buffer.generator_ready:
        raise RlattrError("buffer: already flattened by RolloutBuffer.get(); score before train() runs")

    def t(x: np.ndarray) -> Tensor:
        return torch.from_numpy(np.array(x, copy=True))

    obs = buffer.observations
    return RecordBatch.from_rollout(
        round_index,
        observations={k: t(v) for k, v in obs.items()} if isinstance(obs, dict) else t(obs),
        actions=t(buffer.actions),
        old_log_prob=t(buffer.log_probs),
        values=t(buffer.values),
        rewards=t(buffer.rewards),
        returns=t(buffer.returns),
        advantages=t(buffer.advantages),
        episode_starts=t(buffer.episode_starts),
    )


def first_epoch_minibatches(n_steps: int, n_envs: int, batch_size: int) -> Tensor:
    """Minibatch label ``Tensor[n_steps * n_envs]`` (step-major records) of SB3's first epoch.

    Reproduces the ``np.random.permutation`` that ``RolloutBuffer.get`` will draw, then puts the
    global NumPy RNG state back, so PPO draws exactly the same permutation afterwards.
    """
    state = np.random.get_state()
    try:
        perm = np.random.permutation(n_steps * n_envs)
    finally:
        np.random.set_state(state)
    labels_flat = np.empty(n_steps * n_envs, dtype=np.int64)
    labels_flat[perm] = np.arange(n_steps * n_envs) // batch_size
    # SB3 flattens env-major (swap_and_flatten): flat index = env * n_steps + step.
    by_env_step = labels_flat.reshape(n_envs, n_steps)
    return torch.from_numpy(np.ascontiguousarray(by_env_step.T).reshape(-1))


def ppo_hyperparameters(model: PPO) -> dict[str, Any]:
    """The PPO settings saved with every run (JSON-serialisable)."""
    clip = (
        model.clip_range(model._current_progress_remaining)
        if callable(model.clip_range)
        else model.clip_range
    )
    return {
        "algorithm": type(model).__name__,
        "policy": type(model.policy).__name__,
        "seed": model.seed,  # None when PPO was not seeded
        "n_steps": model.n_steps,
        "n_envs": model.n_envs,
        "batch_size": model.batch_size,
        "n_epochs": model.n_epochs,
        "gamma": model.gamma,
        "gae_lambda": model.gae_lambda,
        "clip_range": float(clip),
        "ent_coef": float(model.ent_coef),
        "vf_coef": float(model.vf_coef),
        "max_grad_norm": float(model.max_grad_norm),
        "normalize_advantage": bool(model.normalize_advantage),
        "learning_rate": float(model.lr_schedule(model._current_progress_remaining)),
        "optimizer": type(model.policy.optimizer).__name__,
        "observation_space": repr(model.observation_space),
        "action_space": repr(model.action_space),
        "share_features_extractor": bool(model.policy.share_features_extractor),
    }
