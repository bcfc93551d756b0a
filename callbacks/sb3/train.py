"""``rlattr train``: PPO with InfluenceCallback from a :class:`~rlattr.callbacks.sb3.config.TrainConfig`.

The run folder ``{runs_dir}/{env}__{exp}__{seed}__{time}`` holds SB3's TensorBoard events, the
``attr/*`` events, the snapshots (``rlattr/``), ``config.yaml`` (the resolved config) and
``run_info.json`` (seed, versions, git commit, command line).
"""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from rlattr.callbacks.sb3.config import ConfigError, TrainConfig
from rlattr.callbacks.sb3.influence import InfluenceCallback
from rlattr.core.store import atomic_write_bytes, save_json
from rlattr.errors import RunExistsError
from rlattr.provenance import provenance

# Set by the runner itself, so not accepted in the ppo section.
_PPO_RESERVED = ("policy", "env", "seed", "tensorboard_log", "_init_setup_model")


def _check_kwargs(section: str, given: dict[str, Any], fn: Any, reserved: tuple[str, ...] = ()) -> None:
    params = inspect.signature(fn).parameters
    allowed = [
        n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD and n not in reserved
    ]
    bad = [k for k in given if k not in allowed]
    if bad:
        raise ConfigError(f"{section}: unknown key(s) {bad}; supported: {allowed}")


def check_config(config: TrainConfig) -> None:
    """Check the ``ppo`` and ``callback`` sections against PPO's and InfluenceCallback's signatures."""
    _check_kwargs("ppo", config.ppo, PPO.__init__, _PPO_RESERVED)
    _check_kwargs("callback", config.callback, InfluenceCallback.__init__)
    if "policy_kwargs" in config.ppo and not isinstance(config.ppo["policy_kwargs"], dict):
        raise ConfigError("ppo.policy_kwargs: expected a mapping")


# Names a YAML file may use where SB3 expects a class.
_CLASS_KEYS = {"optimizer_class": torch.optim, "activation_fn": torch.nn}


def resolve_policy_kwargs(policy_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn class names (``optimizer_class: SGD``, ``activation_fn: Tanh``) into the classes."""
    out = dict(policy_kwargs)
    for key, module in _CLASS_KEYS.items():
        value = out.get(key)
        if isinstance(value, str):
            cls = getattr(module, value, None)
            if not isinstance(cls, type):
                raise ConfigError(f"ppo.policy_kwargs.{key}: {value!r} is not a class in {module.__name__}")
            out[key] = cls
    return out


def make_run_dir(config: TrainConfig) -> Path:
    """A new, empty run folder; refuses to reuse an existing one."""
    run_dir = Path(config.runs_dir) / config.run_name(int(time.time()))
    if run_dir.exists():
        raise RunExistsError(f"run folder {str(run_dir)!r} exists already; wait a second or change exp_name")
    run_dir.mkdir(parents=True)
    return run_dir


def build_model(config: TrainConfig, run_dir: Path) -> PPO:
    """The PPO model, its vectorised env, and an SB3 logger writing TensorBoard into ``run_dir``."""
    vec_cls = SubprocVecEnv if config.vec_env == "subproc" else DummyVecEnv
    env = make_vec_env(
        config.env_id,
        n_envs=config.n_envs,
        seed=config.seed,
        env_kwargs=config.env_kwargs,
        vec_env_cls=vec_cls,
    )
    ppo = dict(config.ppo)
    if "policy_kwargs" in ppo:
        ppo["policy_kwargs"] = resolve_policy_kwargs(ppo["policy_kwargs"])
    model = PPO(config.policy, env, seed=config.seed, device="cpu", **ppo)
    formats = ["stdout", "tensorboard"] if ppo.get("verbose", 0) >= 1 else ["tensorboard"]
    model.set_logger(configure(str(run_dir), formats))
    return model


def train(config: TrainConfig, *, progress_bar: bool = True, argv: list[str] | None = None) -> Path:
    """Train PPO with InfluenceCallback as ``config`` says; returns the run folder."""
    check_config(config)
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    run_dir = make_run_dir(config)
    atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    save_json(
        run_dir / "run_info.json",
        {"seed": config.seed, "versions": provenance(), "argv": argv if argv is not None else sys.argv},
    )
    model = build_model(config, run_dir)
    callback = InfluenceCallback(log_dir=run_dir, **config.callback)
    start = time.perf_counter()
    try:
        model.learn(config.total_timesteps, callback=callback, progress_bar=progress_bar)
    finally:
        if model.env is not None:
            model.env.close()
    seconds = time.perf_counter() - start
    attr_seconds = sum(h["seconds"] for h in callback.history)
    save_json(
        run_dir / "run_info.json",
        {
            "seed": config.seed,
            "versions": provenance(),
            "argv": argv if argv is not None else sys.argv,
            "train_seconds": seconds,
            "attribution_seconds": attr_seconds,
            "rounds_scored": len(callback.history),
        },
    )
    model.save(run_dir / "model.zip")
    return run_dir


__all__ = ["build_model", "check_config", "make_run_dir", "train"]
