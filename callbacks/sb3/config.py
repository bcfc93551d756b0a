"""The YAML config of ``rlattr train``: read, checked key by key, with clear errors.

Example (``configs/cartpole.yaml``)::

    env_id: CartPole-v1
    exp_name: influence
    seed: 0
    total_timesteps: 20480
    ppo: {n_steps: 2048, batch_size: 64, n_epochs: 10}
    callback: {target: return, probe_states: 4}
    iif: {drop: neg-bottom, p: 0.5}   # optional: filter with IIFCallback instead of only observing

The PPO, callback and iif sections are checked against the signatures of ``stable_baselines3.PPO``,
:class:`rlattr.callbacks.sb3.InfluenceCallback` and :class:`rlattr.callbacks.sb3.IIFCallback` by
the SB3 adapter (this module imports no SB3).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from rlattr.errors import ConfigError

VEC_ENVS = ("dummy", "subproc")
# exp_name becomes part of a folder name: one path component, never "." or ".."
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and reads ``1e5`` / ``3e-4`` as numbers (as
    YAML 1.2 and rl-zoo3's configs mean them; YAML 1.1 reads them as strings)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"config: duplicate key {key!r} (line {line}); each key may appear once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def whole_number(value: Any) -> Any:
    """``value`` as an int when it is a float with a whole-number value (``1e5`` -> 100000)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@dataclass
class TrainConfig:
    """What ``rlattr train`` runs.

    Args:
        env_id: a Gymnasium id, e.g. ``CartPole-v1``.
        exp_name: the experiment name in the run folder ``{env}__{exp}__{seed}__{time}``.
        seed: seeds PPO, the environments and torch.
        total_timesteps: environment steps to train for.
        n_envs: parallel environments. vec_env: ``"dummy"`` or ``"subproc"``.
        env_kwargs: keyword arguments of ``gymnasium.make``.
        policy: the SB3 policy name (``MlpPolicy``, ``CnnPolicy``, ``MultiInputPolicy``).
        ppo: keyword arguments of ``stable_baselines3.PPO``.
        callback: keyword arguments of ``InfluenceCallback``.
        iif: ``None`` (observe only) or the filtering arguments of ``IIFCallback`` (``drop``, ``p``,
            ``rule_kwargs``, ``score_on``, ``rescore``, ...; ``{}`` is the paper's IIF): the run then
            trains with IIFCallback, the ``callback`` section giving its InfluenceCallback arguments.
        runs_dir: the folder that holds the run folders.
        torch_threads: ``torch.set_num_threads`` (``None``: leave torch's default).
        checkpoint_every: save the model (``checkpoint.safetensors``, ``model.zip``) every this many rounds.
    """

    env_id: str
    exp_name: str = "influence"
    seed: int = 0
    total_timesteps: int = 20_480
    n_envs: int = 1
    vec_env: str = "dummy"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    policy: str = "MlpPolicy"
    ppo: dict[str, Any] = field(default_factory=dict)
    callback: dict[str, Any] = field(default_factory=dict)
    iif: dict[str, Any] | None = None
    runs_dir: str = "runs"
    torch_threads: int | None = None
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.env_id, str) or not self.env_id:
            raise ConfigError(f"env_id: expected a Gymnasium environment id, got {self.env_id!r}")
        if not isinstance(self.exp_name, str) or not _NAME.fullmatch(self.exp_name):
            raise ConfigError(
                f"exp_name: got {self.exp_name!r}; supported: letters, digits, '.', '_' and '-', starting "
                "with a letter or digit (it names the run folder)"
            )
        for name in ("seed", "total_timesteps", "n_envs", "checkpoint_every"):
            value = whole_number(getattr(self, name))
            setattr(self, name, value)
            low = 0 if name == "seed" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name}: expected an integer >= {low}, got {value!r}")
        if self.vec_env not in VEC_ENVS:
            raise ConfigError(f"vec_env: got {self.vec_env!r}; supported: {VEC_ENVS}")
        for name in ("env_kwargs", "ppo", "callback"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name}: expected a mapping, got {type(getattr(self, name)).__name__}")
        if self.iif is not None and not isinstance(self.iif, dict):
            raise ConfigError(f"iif: got {self.iif!r}; supported: a mapping of IIFCallback arguments or null")
        self.torch_threads = whole_number(self.torch_threads)
        if self.torch_threads is not None and (
            not isinstance(self.torch_threads, int)
            or isinstance(self.torch_threads, bool)
            or self.torch_threads < 1
        ):
            raise ConfigError(f"torch_threads: expected an integer >= 1 or null, got {self.torch_threads!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def run_name(self, timestamp: int) -> str:
        """``{env}__{exp}__{seed}__{time}`` (characters unsafe in paths replaced by ``-``)."""
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in self.env_id)
        return f"{safe}__{self.exp_name}__{self.seed}__{timestamp}"


def config_from_dict(data: Any, source: str = "<config>") -> TrainConfig:
    """A :class:`TrainConfig` from a parsed mapping; unknown keys are named in the error."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of settings at the top level, got {type(data).__name__}"
        )
    known = [f.name for f in fields(TrainConfig)]
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; supported keys: {known}")
    if "env_id" not in data:
        raise ConfigError(f"{source}: missing required key 'env_id'")
    try:
        return TrainConfig(**data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err


def parse_yaml(text: str, source: str = "<config>") -> Any:
    """Parse a config's YAML text: safe, duplicate keys refused, ``1e5`` read as a number."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({err})") from err
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (``overrides`` replace top-level keys, e.g. from the command line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: no such file {str(p)!r}")
    data = parse_yaml(p.read_text(), str(p))
    if isinstance(data, dict) and overrides:
        data = {**data, **overrides}
    return config_from_dict(data, str(p))


__all__ = ["ConfigError", "TrainConfig", "config_from_dict", "load_config", "parse_yaml", "whole_number"]
