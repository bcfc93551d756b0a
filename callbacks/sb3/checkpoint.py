"""Pickle-free PPO checkpoints for ``rlattr train``: saved as rounds end, read back by ``--resume``.

``checkpoint.safetensors`` holds the policy's ``state_dict`` (``policy/<name>``) and the optimizer's
tensors (``optimizer/<param index>/<name>``); its JSON metadata holds the optimizer's param groups,
``num_timesteps``, ``n_updates`` and the next round. SB3's ``model.zip`` is written beside it for
SB3 users (SB3's own format, a pickle): rlattr never loads ``model.zip``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback

from rlattr.core.store import atomic_write_bytes, load_tensors, save_tensors
from rlattr.errors import StoreError

CHECKPOINT = "checkpoint.safetensors"
MODEL_ZIP = "model.zip"


def rounds_done(model: PPO) -> int:
    """Rounds trained so far: ``num_timesteps`` counts ``n_steps * n_envs`` per round."""
    return int(model.num_timesteps) // (int(model.n_steps) * int(model.n_envs))


def save_checkpoint(model: PPO, run_dir: Path, *, resumable: bool = True) -> None:
    """Write SB3's ``model.zip`` and (``resumable``: the model sits between two rounds, no update
    half done) ``checkpoint.safetensors`` into ``run_dir``, each atomically."""
    buffer = io.BytesIO()
    model.save(buffer)
    atomic_write_bytes(run_dir / MODEL_ZIP, buffer.getvalue())
    if not resumable:
        return
    tensors = {f"policy/{k}": v for k, v in model.policy.state_dict().items()}
    opt = model.policy.optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    zero_dim: list[str] = []
    for idx, state in opt["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                # Adam's step is a 0-dim tensor; the store keeps tensors of rank >= 1
                tensors[f"optimizer/{idx}/{name}"] = value.reshape(1) if value.dim() == 0 else value
                if value.dim() == 0:
                    zero_dim.append(f"optimizer/{idx}/{name}")
            else:
                scalars.setdefault(str(idx), {})[name] = value
    meta = {
        "num_timesteps": int(model.num_timesteps),
        "n_updates": int(model._n_updates),
        "next_round": rounds_done(model),
        "param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "zero_dim": zero_dim,
    }
    save_tensors(run_dir / CHECKPOINT, tensors, meta)


def restore_checkpoint(model: PPO, run_dir: Path) -> dict[str, Any]:
    """Load the policy, optimizer state and counters of ``run_dir``'s checkpoint into ``model``;
    returns the checkpoint's metadata."""
    tensors, meta = load_tensors(run_dir / CHECKPOINT)
    for key in meta.get("zero_dim", []):
        tensors[key] = tensors[key].reshape(())
    policy = {k.removeprefix("policy/"): v for k, v in tensors.items() if k.startswith("policy/")}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in dict(meta.get("optimizer_scalars", {})).items():
        state.setdefault(int(idx), {}).update(values)
    try:
        model.policy.load_state_dict(policy)
        model.policy.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (RuntimeError, KeyError, ValueError) as err:
        raise StoreError(
            f"resume: the checkpoint in {str(run_dir)!r} does not fit the model its config.yaml builds ({err})"
        ) from err
    model.num_timesteps = int(meta["num_timesteps"])
    model._n_updates = int(meta["n_updates"])
    return meta


class Checkpointer(BaseCallback):
    """Saves a checkpoint every ``every`` rounds, after SB3's ``train()`` (at the next rollout's start).

    A failed save (full disk, read-only folder) warns once and training goes on.
    """

    def __init__(self, run_dir: Path, every: int = 1) -> None:
        super().__init__()
        self.run_dir, self.every = Path(run_dir), every
        self.failed = False

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        if self.model.num_timesteps == self.model._num_timesteps_at_start:
            return  # nothing trained since the last save (or the resume)
        if rounds_done(self.model) % self.every == 0:  # type: ignore[arg-type]
            self.save()

    def save(self, *, resumable: bool = True) -> bool:
        """Save now; returns False (after one warning per run) when the disk refuses."""
        try:
            save_checkpoint(self.model, self.run_dir, resumable=resumable)  # type: ignore[arg-type]
        except OSError as err:
            if not self.failed:
                warnings.warn(
                    f"rlattr train: could not save the model checkpoint into {str(self.run_dir)!r} ({err}); "
                    "training goes on, later saves are tried again",
                    UserWarning,
                    stacklevel=2,
                )
            self.failed = True
            return False
        return True


__all__ = ["CHECKPOINT", "MODEL_ZIP", "Checkpointer", "restore_checkpoint", "rounds_done", "save_checkpoint"]
