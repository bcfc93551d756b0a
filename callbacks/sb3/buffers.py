"""Compacting SB3's rollout buffer to a subset of its records, and giving it its shape back.

:class:`~rlattr.callbacks.sb3.IIFCallback` trains PPO on the records its rule keeps by shrinking
the buffer in place: every per-record array becomes ``(n_kept, 1, ...)`` in step-major record order
with ``buffer_size = n_kept`` and ``n_envs = 1``, so SB3's unmodified ``get()`` and ``train()`` see
only the kept records. :func:`restore_rollout_buffer` gives the buffer its ``(buffer_size, n_envs)``
back and resets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer

from rlattr.errors import RlattrError

# Arrays that ``RolloutBuffer.get`` flattens env-major (``swap_and_flatten``) on first use.
_FLATTENED_BY_GET = ("observations", "actions", "values", "log_probs", "advantages", "returns")
_SCALAR_PER_RECORD = ("values", "log_probs", "advantages", "returns")


@dataclass(frozen=True)
class BufferShape:
    """The shape a rollout buffer had before compaction."""

    buffer_size: int
    n_envs: int


def _step_major(buffer: RolloutBuffer, name: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` as ``(buffer_size * n_envs, ...)`` in step-major order (record r = step r // n_envs)."""
    n_steps, n_envs = buffer.buffer_size, buffer.n_envs
    if arr.shape[:2] == (n_steps, n_envs):
        return arr.reshape(n_steps * n_envs, *arr.shape[2:])
    if buffer.generator_ready and name in _FLATTENED_BY_GET and arr.shape[0] == n_steps * n_envs:
        env_major = arr.reshape(n_envs, n_steps, *arr.shape[1:])
        flat = env_major.swapaxes(0, 1).reshape(n_steps * n_envs, *arr.shape[1:])
        # swap_and_flatten gives (n_steps, n_envs) arrays a trailing axis of 1; drop it again.
        return flat.reshape(-1) if name in _SCALAR_PER_RECORD else flat
    raise RlattrError(
        f"rollout_buffer.{name}: expected shape ({n_steps}, {n_envs}, ...), got {arr.shape}; "
        "was the buffer modified by another callback?"
    )


def per_record_arrays(buffer: RolloutBuffer) -> list[str]:
    """Names of the buffer's per-record arrays (the standard ones and any a subclass adds)."""
    n_steps, n_envs = buffer.buffer_size, buffer.n_envs
    names = []
    for name, value in vars(buffer).items():
        arrays = value.values() if isinstance(value, dict) else [value]
        if all(isinstance(a, np.ndarray) for a in arrays) and arrays:
            if all(a.shape[:2] == (n_steps, n_envs) or name in _FLATTENED_BY_GET for a in arrays):
                names.append(name)
    return names


def compact_rollout_buffer(buffer: RolloutBuffer, keep: np.ndarray) -> BufferShape:
    """Shrink ``buffer`` to the kept records, in place; returns the shape to restore later.

    Args:
        buffer: a full SB3 ``RolloutBuffer`` or ``DictRolloutBuffer``.
        keep: ``bool[buffer_size * n_envs]`` in step-major record order (record r is env
            ``r % n_envs`` at step ``r // n_envs``, the order of :class:`RecordBatch`), or an
            integer array of record positions in that order, repeats allowed (a record given
            twice is trained on twice per epoch: how resampled weights reach SB3's ``train()``).

    After the call every per-record array is ``(n_kept, 1, ...)`` in record order (the order of
    the positions given), ``buffer_size = pos = n_kept``, ``n_envs = 1``, ``full = True`` and
    ``generator_ready = False``.
    """
    if not isinstance(buffer, (RolloutBuffer, DictRolloutBuffer)):
        raise TypeError(f"buffer: expected an SB3 RolloutBuffer, got {type(buffer).__name__}")
    if not buffer.full:
        raise RlattrError("buffer: the rollout buffer is not full; compact it after collect_rollouts")
    n = buffer.buffer_size * buffer.n_envs
    mask = np.asarray(keep)
    if mask.dtype == np.bool_ and mask.shape == (n,):
        n_kept = int(mask.sum())
    elif np.issubdtype(mask.dtype, np.integer) and mask.ndim == 1:
        if mask.size and (int(mask.min()) < 0 or int(mask.max()) >= n):
            raise RlattrError(
                f"keep: record positions must lie in [0, {n}), got {int(mask.min())}..{int(mask.max())}"
            )
        n_kept = int(mask.size)
    else:
        raise RlattrError(
            f"keep: expected a bool array of shape ({n},) or a 1-D integer array of record "
            f"positions, got {mask.dtype} {mask.shape}"
        )
    if n_kept == 0:
        raise RlattrError("keep: keeps no record; SB3's train() needs at least one")
    shape = BufferShape(buffer.buffer_size, buffer.n_envs)
    compacted: dict[str, Any] = {}
    for name in per_record_arrays(buffer):
        value = getattr(buffer, name)
        if isinstance(value, dict):
            compacted[name] = {k: _take(buffer, f"{name}[{k!r}]", v, mask) for k, v in value.items()}
        else:
            compacted[name] = _take(buffer, name, value, mask)
    for name, value in compacted.items():
        setattr(buffer, name, value)
    buffer.buffer_size, buffer.n_envs, buffer.pos = n_kept, 1, n_kept
    buffer.full, buffer.generator_ready = True, False
    return shape


def _take(buffer: RolloutBuffer, name: str, arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    flat = _step_major(buffer, name.split("[")[0], arr)
    kept = flat[mask]
    return np.ascontiguousarray(kept.reshape(kept.shape[0], 1, *kept.shape[1:]))


def restore_rollout_buffer(buffer: RolloutBuffer, shape: BufferShape) -> None:
    """Give ``buffer`` its original ``(buffer_size, n_envs)`` back and reset it (empty, zeroed)."""
    buffer.buffer_size, buffer.n_envs = shape.buffer_size, shape.n_envs
    buffer.reset()


__all__ = ["BufferShape", "compact_rollout_buffer", "per_record_arrays", "restore_rollout_buffer"]
