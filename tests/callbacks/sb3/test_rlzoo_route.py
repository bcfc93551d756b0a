"""The README's rl-zoo3 route: its ``callback:`` entry resolves and trains the way rl-zoo3 does it.

rl-zoo3 turns each ``- module.Class: {kwargs}`` entry into ``getattr(import_module(module), Class)(**kwargs)``
(its ``get_class_by_name``) and passes ``tensorboard_log`` to the algorithm; this test does the
same with the YAML block of README.md, without rl-zoo3 installed.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
import yaml
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback

from rlattr.rl.snapshots import load_run

README = Path(__file__).resolve().parents[3] / "README.md"
torch.set_num_threads(1)


def _readme_zoo_config() -> dict:
    (block,) = re.findall(r"^```yaml\n(.*?)^```$", README.read_text(), re.S | re.M)
    return yaml.safe_load(block)


def _class_by_name(name: str) -> type:
    module, _, cls = name.rpartition(".")
    return getattr(importlib.import_module(module), cls)


def test_readme_zoo_callback_entry_builds_and_writes_a_run(tmp_path) -> None:
    ((env_id, hyper),) = _readme_zoo_config().items()
    callbacks = []
    for entry in hyper["callback"]:
        ((name, kwargs),) = entry.items()
        callbacks.append(_class_by_name(name)(**kwargs))
    assert all(isinstance(cb, BaseCallback) for cb in callbacks)
    model = PPO(
        hyper["policy"], env_id, n_steps=64, batch_size=32, n_epochs=1, seed=0,
        tensorboard_log=str(tmp_path / env_id),  # rl-zoo3: {tensorboard_log}/{env_id}
    )  # fmt: skip
    model.learn(128, callback=callbacks)
    (run_dir,) = (tmp_path / env_id).iterdir()  # PPO_1, as rl-zoo3 names it
    run = load_run(run_dir)
    assert run.rounds == [0, 1] and run.meta["target"]["name"] == "return"
    probes = run.score_tensors(0)["probe_scores"]
    assert probes.shape == (hyper["callback"][0]["rlattr.callbacks.InfluenceCallback"]["probe_states"], 64)
