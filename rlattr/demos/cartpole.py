"""``rlattr demo``: PPO on CartPole-v1 with InfluenceCallback, every round scored, then the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PPO_DEMO: dict[str, Any] = {
    "env_id": "CartPole-v1",
    "exp_name": "demo",
    "seed": 0,
    "total_timesteps": 20_480,
    "ppo": {"n_steps": 2048, "batch_size": 64, "n_epochs": 10, "verbose": 0},
    "callback": {"target": "return", "probe_states": 4, "image_every": 2},
    "torch_threads": 1,
}


def run(out_dir: str | Path, timesteps: int = PPO_DEMO["total_timesteps"], progress_bar: bool = True) -> Path:
    """Train, score every round, write the report; returns the run folder."""
    from rlattr.callbacks.sb3.config import config_from_dict
    from rlattr.callbacks.sb3.train import train
    from rlattr.reporting.report import write_report

    config = config_from_dict({**PPO_DEMO, "runs_dir": str(out_dir), "total_timesteps": timesteps}, "demo")
    print(f"[rlattr demo] PPO on CartPole-v1 for {timesteps} steps, every round scored (return target)")
    run_dir = train(config, progress_bar=progress_bar)
    index = write_report(run_dir, progress=None if progress_bar else False)
    print(
        f"\n[rlattr demo] done.\n  report:      {index}\n  tensorboard: tensorboard --logdir {run_dir}"
        f"  (attr/ tags)\n  snapshots:   {run_dir / 'rlattr'}  (python: rlattr.load_run('{run_dir}'))"
    )
    return run_dir
