"""RecordBatch: one PPO round's transitions as tensors, each with a stable id (round, step, env).

Records are laid out step-major: record ``r`` is the transition of environment ``r % n_envs`` at
rollout step ``r // n_envs`` (the row-major flattening of the ``(n_steps, n_envs)`` buffer). The
id tensor says so explicitly, so a score never depends on a position that could be shuffled.
Framework-free: the stable-baselines3 adapter fills a RecordBatch from its RolloutBuffer.

Observations are one ``Tensor[n, *obs_shape]``, or for dict observation spaces a
``dict[str, Tensor[n, ...]]`` (one entry per key, as SB3's ``DictRolloutBuffer`` stores them);
:func:`map_observations`, :func:`num_observations` and :func:`index_observations` work on both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from rlattr.errors import MissingError, RlattrError

RecordId = tuple[int, int, int]
Observations = Tensor | dict[str, Tensor]
"""``Tensor[n, *obs_shape]`` or ``{key: Tensor[n, *shape_of_key]}``."""
_FLOAT_FIELDS = ("old_log_prob", "values", "rewards", "returns", "advantages", "episode_starts")
_OBS_KEY_SEP = "/"  # stored dict observations: "observations/<key>"


def map_observations(fn: Callable[[Tensor], Tensor], obs: Observations) -> Observations:
    """``fn`` applied to the observation tensor, or to every entry of a dict observation."""
    if isinstance(obs, dict):
        return {k: fn(v) for k, v in obs.items()}
    return fn(obs)


def _require_keys(obs: dict, name: str = "observations") -> None:
    if not obs:
        raise RlattrError(f"{name}: a dict observation needs at least one key")


def num_observations(obs: Observations) -> int:
    """The number of records (the leading dimension) of a tensor or dict observation."""
    if isinstance(obs, dict):
        _require_keys(obs)
        return int(next(iter(obs.values())).shape[0])
    return int(obs.shape[0])


def flatten_observations(name: str, obs: Observations) -> dict[str, Tensor]:
    """``{name: obs}`` for a tensor, ``{f"{name}/{key}": obs[key]}`` for a dict: storable tensors."""
    if isinstance(obs, dict):
        return {f"{name}{_OBS_KEY_SEP}{k}": v for k, v in obs.items()}
    return {name: obs}


def unflatten_observations(name: str, tensors: dict[str, Tensor]) -> Observations | None:
    """Inverse of :func:`flatten_observations`; ``None`` if ``tensors`` hold neither form."""
    if name in tensors:
        return tensors[name]
    prefix = name + _OBS_KEY_SEP
    parts = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return parts or None


def index_observations(obs: Observations, index: Tensor | Sequence[int] | int | slice) -> Observations:
    """The records at ``index`` (a mask, positions, one position or a slice) of either form."""
    idx = index if isinstance(index, (int, slice)) else torch.as_tensor(index)
    return map_observations(lambda x: x[idx], obs)


def as_observations(value: object, name: str = "observations") -> Observations:
    """Tensors (or a dict of them) from array-likes; a clear error for anything else."""
    if isinstance(value, dict):
        _require_keys(value, name)
        out = {str(k): torch.as_tensor(v) for k, v in value.items()}
        sizes = {k: v.shape[0] if v.dim() else None for k, v in out.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise RlattrError(f"{name}: every key needs the same leading (record) dimension, got {sizes}")
        return out
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"{name}: expected a tensor, an array or a dict of them, got {type(value).__name__}"
        ) from err


@dataclass
class RecordBatch:
    """The records of one round.

    Attributes:
        observations: ``Tensor[n, *obs_shape]`` in the dtype the buffer stored (images stay uint8),
            or ``dict[str, Tensor[n, ...]]`` for dict observation spaces.
        actions: ``Tensor[n, action_dim]`` as the buffer stored them.
        old_log_prob: ``Tensor[n]``, log pi_theta(k)(a|s) at collection time.
        values: ``Tensor[n]``, V(s) at collection time.
        rewards: ``Tensor[n]``.
        returns: ``Tensor[n]``, the TD(lambda) returns (advantages + values).
        advantages: ``Tensor[n]``, raw GAE advantages (not normalised).
        episode_starts: ``Tensor[n]``, 1.0 where the transition starts an episode.
        ids: ``Tensor[n, 3]`` int64, the stable id ``(round, step, env)`` of every record.
    """

    observations: Observations
    actions: Tensor
    old_log_prob: Tensor
    values: Tensor
    rewards: Tensor
    returns: Tensor
    advantages: Tensor
    episode_starts: Tensor
    ids: Tensor

    def __post_init__(self) -> None:
        n = self.ids.shape[0] if isinstance(self.ids, Tensor) else -1
        if not isinstance(self.ids, Tensor) or self.ids.dim() != 2 or self.ids.shape[1] != 3:
            got = tuple(self.ids.shape) if isinstance(self.ids, Tensor) else type(self.ids).__name__
            raise RlattrError(f"ids: expected Tensor[n, 3] of (round, step, env), got {got}")
        if n == 0:
            raise RlattrError("ids: empty RecordBatch (0 records); a round must hold at least one record")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "observations" and isinstance(value, dict):
                _require_keys(value)
                for key, part in value.items():
                    if not isinstance(part, Tensor) or part.dim() == 0 or part.shape[0] != n:
                        what = tuple(part.shape) if isinstance(part, Tensor) else type(part).__name__
                        raise RlattrError(
                            f"observations[{key!r}]: expected {n} records (leading dimension), got {what}"
                        )
                continue
            if not isinstance(value, Tensor):
                raise TypeError(f"{f.name}: expected a torch.Tensor, got {type(value).__name__}")
            if value.shape[0] != n:
                raise RlattrError(
                    f"{f.name}: expected {n} records (leading dimension), got {tuple(value.shape)}"
                )
            if f.name in _FLOAT_FIELDS and value.dim() != 1:
                raise RlattrError(f"{f.name}: expected Tensor[n], got shape {tuple(value.shape)}")
        self.ids = self.ids.to(torch.int64)

    @classmethod
    def from_rollout(
        cls,
        round_index: int,
        *,
        observations: Observations,
        actions: Tensor,
        old_log_prob: Tensor,
        values: Tensor,
        rewards: Tensor,
        returns: Tensor,
        advantages: Tensor,
        episode_starts: Tensor,
    ) -> RecordBatch:
        """Build from ``(n_steps, n_envs, ...)`` arrays, flattening step-major and assigning ids.

        ``observations: Tensor[n_steps, n_envs, *obs_shape]`` (or a dict of such tensors),
        ``actions: Tensor[n_steps, n_envs, action_dim]``, the others ``Tensor[n_steps, n_envs]``.
        """
        lead = actions if isinstance(observations, dict) else observations
        if lead.dim() < 2:
            name = "actions" if isinstance(observations, dict) else "observations"
            raise RlattrError(f"{name}: expected (n_steps, n_envs, ...), got shape {tuple(lead.shape)}")
        n_steps, n_envs = lead.shape[:2]
        steps = torch.arange(n_steps, device=lead.device).repeat_interleave(n_envs)
        envs = torch.arange(n_envs, device=lead.device).repeat(n_steps)
        ids = torch.stack([torch.full_like(steps, int(round_index)), steps, envs], dim=1)

        def flat(x: Tensor, name: str) -> Tensor:
            if tuple(x.shape[:2]) != (n_steps, n_envs):
                raise RlattrError(
                    f"{name}: expected leading shape ({n_steps}, {n_envs}), got {tuple(x.shape)}"
                )
            return x.reshape(n_steps * n_envs, *x.shape[2:])

        if isinstance(observations, dict):
            flat_obs: Observations = {k: flat(v, f"observations[{k!r}]") for k, v in observations.items()}
        else:
            flat_obs = flat(observations, "observations")
        return cls(
            observations=flat_obs,
            actions=flat(actions, "actions"),
            old_log_prob=flat(old_log_prob, "old_log_prob"),
            values=flat(values, "values"),
            rewards=flat(rewards, "rewards"),
            returns=flat(returns, "returns"),
            advantages=flat(advantages, "advantages"),
            episode_starts=flat(episode_starts, "episode_starts"),
            ids=ids,
        )

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def round_index(self) -> int:
        """The round of the first record (a RecordBatch normally holds one round)."""
        return int(self.ids[0, 0])

    @property
    def has_dict_observations(self) -> bool:
        return isinstance(self.observations, dict)

    def as_batch(self) -> dict[str, Tensor | dict[str, Tensor]]:
        """The tensors as a dict pytree for :mod:`rlattr.core` (every leaf has the record dimension)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat ``dict[str, Tensor]`` for :func:`rlattr.core.store.save_tensors` (dict observations
        are stored under ``"observations/<key>"``)."""
        out: dict[str, Tensor] = {}
        for f in fields(self):
            out.update(flatten_observations(f.name, getattr(self, f.name)))
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> RecordBatch:
        """Inverse of :meth:`to_tensors`."""
        values: dict[str, Observations] = dict(tensors)
        obs = unflatten_observations("observations", tensors)
        if obs is not None:
            values["observations"] = obs
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in values]
        if missing:
            raise RlattrError(f"tensors: missing RecordBatch field(s) {missing}")
        return cls(**{n: values[n] for n in names})  # type: ignore[arg-type]

    def select(self, index: Tensor | Sequence[int]) -> RecordBatch:
        """The records at positions ``index`` (a bool mask ``Tensor[n]`` or integer positions)."""
        idx = torch.as_tensor(index)
        parts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "observations"}
        return RecordBatch(
            observations=index_observations(self.observations, idx), **{k: v[idx] for k, v in parts.items()}
        )

    def id_list(self) -> list[RecordId]:
        """Ids as ``[(round, step, env), ...]`` in record order."""
        return [(int(r), int(s), int(e)) for r, s, e in self.ids.tolist()]

    def positions(self, ids: Iterable[RecordId]) -> Tensor:
        """Record positions of the given ids: ``Tensor[m]`` int64; raises ``KeyError`` for unknown ids."""
        lookup = {rid: i for i, rid in enumerate(self.id_list())}
        out = []
        for rid in ids:
            key = tuple(int(x) for x in rid)
            if key not in lookup:
                raise MissingError(f"ids: no record with id (round, step, env) = {key}")
            out.append(lookup[key])
        return torch.tensor(out, dtype=torch.int64, device=self.ids.device)


def format_id(rid: RecordId | Tensor) -> str:
    """``"r{round}/s{step}/e{env}"``: the printable form of a record id."""
    r, s, e = (int(x) for x in rid)
    return f"r{r}/s{s}/e{e}"
