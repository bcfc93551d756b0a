"""``rlattr train``: PPO with InfluenceCallback from a :class:`~rlattr.callbacks.sb3.config.TrainConfig`
(with IIFCallback, which filters each round's buffer, when the config has an ``iif`` section).

The run folder ``{runs_dir}/{env}__{exp}__{seed}__{time}`` holds SB3's TensorBoard events, the
``attr/*`` events, the snapshots (``rlattr/``), ``config.yaml`` (the resolved config) and
``run_info.json`` (seed, versions, git commit, command line), ``checkpoint.safetensors`` (policy and
optimizer after the last finished round, for ``rlattr train --resume RUN``) and SB3's ``model.zip``,
both saved every ``checkpoint_every`` rounds and ``model.zip`` also when training stops on an error.
"""

from __future__ import annotations

import inspect
import sys
import time
import typing
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
import yaml
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from rlattr.callbacks.sb3.checkpoint import CHECKPOINT, Checkpointer, restore_checkpoint
from rlattr.callbacks.sb3.config import ConfigError, TrainConfig, load_config, whole_number
from rlattr.callbacks.sb3.iif import IIFCallback
from rlattr.callbacks.sb3.influence import InfluenceCallback
from rlattr.callbacks.sb3.policy import check_model
from rlattr.core.store import atomic_write_bytes, load_json, save_json
from rlattr.errors import MissingError, RlattrError, RunExistsError
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
    """Check the ``ppo``, ``callback`` and ``iif`` sections against the signatures of PPO,
    InfluenceCallback and IIFCallback (its own filtering arguments)."""
    _check_kwargs("ppo", config.ppo, PPO.__init__, _PPO_RESERVED)
    _check_kwargs("callback", config.callback, InfluenceCallback.__init__)
    if config.iif is not None:
        _check_kwargs("iif", config.iif, IIFCallback.__init__)
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


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


def check_ppo_values(ppo: dict[str, Any]) -> dict[str, Any]:
    """The ``ppo`` section with each value checked against ``PPO.__init__``'s annotation (whole-number
    floats become ints where an int is meant); raises :class:`ConfigError` naming the key."""
    params = inspect.signature(PPO.__init__).parameters
    out = dict(ppo)
    for key, value in ppo.items():
        args = typing.get_args(params[key].annotation) or (params[key].annotation,)
        kinds = [k for k in _KINDS if k in args or any(typing.get_origin(a) is k for a in args)]
        if not kinds or (value is None and type(None) in args):
            continue  # classes, devices, callables: not writable in YAML, left to PPO
        if int in kinds and bool not in kinds:
            value = out[key] = whole_number(value)
        ok = any(isinstance(value, k) and (k is bool or not isinstance(value, bool)) for k in kinds) or (
            float in kinds and isinstance(value, int) and not isinstance(value, bool)
        )
        if not ok:
            supported = " or ".join(_KINDS[k] for k in kinds) + (" or null" if type(None) in args else "")
            raise ConfigError(f"ppo.{key}: got {value!r}; supported: {supported}")
    return out


def _check_env_id(env_id: str) -> None:
    try:
        gym.spec(env_id)
    except gym.error.Error as err:
        raise ConfigError(f"env_id: got {env_id!r}; supported: a registered Gymnasium id ({err})") from err


def new_run_dir(config: TrainConfig) -> Path:
    """The path of a new run folder (not created yet); refuses an existing one or one outside runs_dir."""
    runs_dir = Path(config.runs_dir)
    run_dir = runs_dir / config.run_name(int(time.time()))
    if run_dir.resolve().parent != runs_dir.resolve():
        raise ConfigError(f"exp_name: the run folder {str(run_dir)!r} would leave runs_dir {str(runs_dir)!r}")
    if run_dir.exists():
        raise RunExistsError(f"run folder {str(run_dir)!r} exists already; wait a second or change exp_name")
    return run_dir


def make_run_dir(config: TrainConfig) -> Path:
    """A new, empty run folder; refuses to reuse an existing one."""
    run_dir = new_run_dir(config)
    run_dir.mkdir(parents=True)
    return run_dir


def build_model(config: TrainConfig, run_dir: Path | None = None) -> PPO:
    """The PPO model and its vectorised env (SB3's logger writing TensorBoard into ``run_dir`` if given).

    Every value is checked here, before any folder exists: a bad one raises :class:`ConfigError`.
    """
    ppo = check_ppo_values(config.ppo)
    if config.policy not in PPO.policy_aliases:
        raise ConfigError(f"policy: got {config.policy!r}; supported: {sorted(PPO.policy_aliases)}")
    _check_env_id(config.env_id)
    vec_cls = SubprocVecEnv if config.vec_env == "subproc" else DummyVecEnv
    try:
        env = make_vec_env(
            config.env_id,
            n_envs=config.n_envs,
            seed=config.seed,
            env_kwargs=config.env_kwargs,
            vec_env_cls=vec_cls,
        )
    except (gym.error.Error, TypeError, ValueError, AssertionError) as err:
        raise ConfigError(
            f"env_kwargs: {config.env_id} could not be made with {config.env_kwargs} ({_one_line(err)})"
        ) from err
    if "policy_kwargs" in ppo:
        ppo["policy_kwargs"] = resolve_policy_kwargs(ppo["policy_kwargs"])
    try:
        model = PPO(config.policy, env, seed=config.seed, device="cpu", **ppo)
        check_model(model)
    except (TypeError, ValueError, AssertionError, KeyError) as err:
        env.close()
        raise ConfigError(f"ppo: PPO refused these settings ({_one_line(err)})") from err
    if run_dir is not None:
        set_run_logger(model, run_dir)
    return model


def set_run_logger(model: PPO, run_dir: Path) -> None:
    formats = ["stdout", "tensorboard"] if model.verbose >= 1 else ["tensorboard"]
    model.set_logger(configure(str(run_dir), formats))


# the validation env of iif.score_on "validation": seeded apart from the training envs
VALIDATION_SEED_OFFSET = 1_000_003


def build_callback(config: TrainConfig, run_dir: Path) -> InfluenceCallback:
    """InfluenceCallback, or IIFCallback when the config has an ``iif`` section (with
    ``score_on: validation``, a one-env validation VecEnv of the same env seeded apart)."""
    # rl-zoo3-style configs write counts as floats (1e3): whole numbers are ints here too
    kwargs = {k: whole_number(v) for k, v in config.callback.items()}
    if config.iif is None:
        try:
            return InfluenceCallback(log_dir=run_dir, **kwargs)
        except (RlattrError, TypeError) as err:
            raise ConfigError(f"callback.{err}") from err
    iif = {k: whole_number(v) for k, v in config.iif.items()}
    if iif.get("score_on") == "validation" and "validation_env" not in kwargs:
        kwargs["validation_env"] = make_vec_env(
            config.env_id, n_envs=1, seed=config.seed + VALIDATION_SEED_OFFSET, env_kwargs=config.env_kwargs
        )
    try:
        return IIFCallback(log_dir=run_dir, **iif, **kwargs)
    except (RlattrError, TypeError) as err:
        if "validation_env" in kwargs:
            kwargs["validation_env"].close()
        raise ConfigError(f"iif.{err}") from err


def _write_run_info(run_dir: Path, config: TrainConfig, argv: list[str] | None, **extra: Any) -> None:
    info: dict[str, Any] = {
        "seed": config.seed,
        "versions": provenance(),
        "argv": argv if argv is not None else sys.argv,
    }
    old = run_dir / "run_info.json"
    if old.is_file():  # a resumed run keeps what the earlier part recorded
        previous = load_json(old)
        if isinstance(previous, dict):
            info = {**previous, **info, "resumes": [*previous.get("resumes", []), *extra.pop("resumes", [])]}
    save_json(old, {**info, **extra})


def train(config: TrainConfig, *, progress_bar: bool = True, argv: list[str] | None = None) -> Path:
    """Train PPO with InfluenceCallback as ``config`` says; returns the run folder.

    The env, model and callback are built (and every value checked) before the run folder is made.
    """
    check_config(config)
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    run_dir = new_run_dir(config)
    model = build_model(config)
    try:
        callback = build_callback(config, run_dir)
        run_dir.mkdir(parents=True)
    except BaseException:
        model.env.close()  # type: ignore[union-attr]
        raise
    atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    _write_run_info(run_dir, config, argv)
    set_run_logger(model, run_dir)
    return _learn(model, callback, config, run_dir, config.total_timesteps, argv, progress_bar)


def resume(run_dir: str | Path, *, progress_bar: bool = True, argv: list[str] | None = None) -> Path:
    """Continue the run in ``run_dir`` from its last checkpoint (policy, optimizer, timesteps, next
    round) in the same folder, until the config's ``total_timesteps``.

    Fresh RNG streams are seeded from ``(seed, round)``: the continuation is not bit-identical to a
    run that was never interrupted. Rounds scored after the checkpoint are discarded and redone.
    """
    run_dir = Path(run_dir)
    why = {
        "config.yaml": "not a run folder of rlattr train",
        CHECKPOINT: "killed before its first round ended",
    }
    for name, reason in why.items():
        if not (run_dir / name).is_file():
            raise MissingError(f"resume: {str(run_dir)!r} holds no {name} ({reason}); start a new run")
    config = load_config(run_dir / "config.yaml")
    check_config(config)
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    model = build_model(config)
    try:
        meta = restore_checkpoint(model, run_dir)
        remaining = config.total_timesteps - model.num_timesteps
        if remaining <= 0:
            raise RlattrError(
                f"resume: the run in {str(run_dir)!r} finished already ({model.num_timesteps} steps)"
            )
        callback = build_callback(config, run_dir)
    except BaseException:
        model.env.close()  # type: ignore[union-attr]
        raise
    next_round = int(meta["next_round"])
    model.set_random_seed(config.seed + next_round)
    callback.resume_at(next_round)
    _write_run_info(run_dir, config, argv, resumes=[{"round": next_round, "timesteps": model.num_timesteps}])
    set_run_logger(model, run_dir)
    return _learn(model, callback, config, run_dir, remaining, argv, progress_bar, reset=False)


def _filter_info(callback: InfluenceCallback) -> dict[str, Any]:
    """IIF's per-round kept fractions for run_info.json (nothing for an observe-only run)."""
    if not isinstance(callback, IIFCallback):
        return {}
    return {"iif_kept_fraction": [h["kept_fraction"] for h in callback.filter_history]}


def _learn(
    model: PPO,
    callback: InfluenceCallback,
    config: TrainConfig,
    run_dir: Path,
    steps: int,
    argv: list[str] | None,
    progress_bar: bool,
    reset: bool = True,
) -> Path:
    saver = Checkpointer(run_dir, config.checkpoint_every)
    start = time.perf_counter()
    finished = False
    try:
        model.learn(
            steps,
            callback=CallbackList([callback, saver]),
            progress_bar=progress_bar,
            reset_num_timesteps=reset,
        )
        finished = True
    finally:
        # the trained policy is never lost; only a finished run is also a clean resume point
        saver.init_callback(model)
        saver.save(resumable=finished)
        if model.env is not None:
            model.env.close()
    try:
        _write_run_info(
            run_dir,
            config,
            argv,
            train_seconds=time.perf_counter() - start,
            attribution_seconds=sum(h["seconds"] for h in callback.history),
            rounds_scored=len(callback.history),
            **_filter_info(callback),
        )
    except OSError as err:  # the training is done and saved (or warned about): do not fail it now
        warnings.warn(f"rlattr train: could not update run_info.json ({err})", UserWarning, stacklevel=2)
    return run_dir


__all__ = [
    "build_model",
    "check_config",
    "check_ppo_values",
    "make_run_dir",
    "new_run_dir",
    "resume",
    "train",
]
