"""``rlattr train`` and ``rlattr report`` end to end on a tiny CartPole run; config key errors."""

from __future__ import annotations

import copy
import json
import re
import warnings
from typing import Any

import pytest
import torch
import yaml

import rlattr
from rlattr.callbacks.sb3.config import ConfigError, config_from_dict
from rlattr.callbacks.sb3.train import check_config, resolve_policy_kwargs
from rlattr.cli import main

TINY: dict[str, Any] = {
    "env_id": "CartPole-v1",
    "exp_name": "t",
    "seed": 1,
    "total_timesteps": 64,
    "ppo": {
        "n_steps": 32,
        "batch_size": 16,
        "n_epochs": 1,
        "policy_kwargs": {"net_arch": [8], "activation_fn": "Tanh"},
    },
    "callback": {"probe_states": 2, "image_every": 1},
    "torch_threads": 1,
}


def test_train_then_report(tmp_path, capsys) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert run_dir.name.startswith("CartPole-v1__t__1__")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["ppo"]["n_steps"] == 32
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["seed"] == 1 and info["rounds_scored"] == 2 and "git_commit" in info["versions"]
    run = rlattr.load_run(run_dir)
    assert run.rounds == [0, 1] and run.meta["hyperparameters"]["n_steps"] == 32
    assert torch.isfinite(run.scores(1).scores).all()
    assert main(["report", str(run_dir)]) == 0
    report = run_dir / "report"
    for name in ("index.html", "summary.png", "distributions.png", "score_vs_adv.png", "behaviour_logp.png"):
        assert (report / name).stat().st_size > 0, name
    assert "r1/s" in (report / "index.html").read_text()  # ids of round 1 in the top/bottom table
    assert "rlattr report" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"ppo": {"n_step": 32}}, r"ppo: unknown key\(s\) \['n_step'\]"),
        ({"ppo": {"seed": 3}}, r"ppo: unknown key\(s\) \['seed'\]"),
        ({"callback": {"targte": "return"}}, r"callback: unknown key\(s\) \['targte'\]"),
    ],
)
def test_unknown_section_keys_are_named(patch: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_config(config_from_dict({**TINY, **patch}))


def test_class_names_resolve() -> None:
    out = resolve_policy_kwargs({"optimizer_class": "SGD", "activation_fn": "ReLU", "net_arch": [4]})
    assert out["optimizer_class"] is torch.optim.SGD and out["activation_fn"] is torch.nn.ReLU
    with pytest.raises(ConfigError, match="ppo.policy_kwargs.optimizer_class: 'Adamm'"):
        resolve_policy_kwargs({"optimizer_class": "Adamm"})


def test_cli_reports_config_errors(tmp_path, capsys) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("env_id: CartPole-v1\nbogus: 1\n")
    with pytest.raises(SystemExit) as err:
        main(["train", str(cfg)])
    assert err.value.code == 2 and "bogus" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"ppo": {"n_steps": "64"}}, "ppo.n_steps: got '64'; supported: an integer"),
        ({"ppo": {"learning_rate": "fast"}}, "ppo.learning_rate: got 'fast'; supported: a number"),
        ({"ppo": {"use_sde": True}}, "ppo: PPO refused these settings .*gSDE"),
        ({"callback": {"target": 5}}, "callback.target: got 5"),
        ({"env_id": "CartPol-v1"}, "env_id: got 'CartPol-v1'"),
        ({"policy": "MlpPolicyy"}, "policy: got 'MlpPolicyy'"),
        ({"torch_threads": True}, "torch_threads: expected an integer >= 1 or null, got True"),
    ],
)
def test_bad_values_are_one_line_exit_2_and_leave_no_folder(
    tmp_path, capsys, patch: dict, match: str
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, **patch}))
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as err:
        main(["train", str(cfg), "--runs-dir", str(runs), "--no-progress"])
    message = capsys.readouterr().err.strip()
    assert err.value.code == 2 and len(message.splitlines()) == 1, message
    assert re.search(match, message), message
    assert not runs.exists() or not any(runs.iterdir())


class _Killed(KeyboardInterrupt):
    pass


def test_a_killed_run_keeps_its_model_and_resumes(tmp_path, monkeypatch, capsys) -> None:
    from rlattr.callbacks.sb3.checkpoint import CHECKPOINT, restore_checkpoint
    from rlattr.callbacks.sb3.influence import InfluenceCallback
    from rlattr.callbacks.sb3.train import build_model

    seen: dict[str, Any] = {}

    def kill_in_round_2(self, records, scores) -> None:
        if records.round_index == 2:  # the policy here is the one trained on rounds 0 and 1
            seen["policy"] = {k: v.clone() for k, v in self.model.policy.state_dict().items()}
            seen["adam"] = copy.deepcopy(self.model.policy.optimizer.state_dict()["state"])
            raise _Killed

    cfg = tmp_path / "tiny.yaml"
    callback = {**TINY["callback"], "snapshot_every": 1.0}  # a whole-number float where an int is meant
    cfg.write_text(yaml.safe_dump({**TINY, "total_timesteps": "1.28e2", "callback": callback}))
    monkeypatch.setattr(InfluenceCallback, "_on_round_scored", kill_in_round_2)
    with pytest.raises(_Killed):
        main(["train", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--no-progress"])
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert (run_dir / "model.zip").stat().st_size > 0  # saved in the finally
    assert rlattr.load_run(run_dir).rounds == [0, 1, 2]

    from rlattr.callbacks.sb3.config import load_config

    fresh = build_model(load_config(run_dir / "config.yaml"))
    meta = restore_checkpoint(fresh, run_dir)
    assert meta["next_round"] == 2 and fresh.num_timesteps == 64
    for k, v in seen["policy"].items():
        assert torch.equal(fresh.policy.state_dict()[k], v), k
    for idx, state in seen["adam"].items():
        for name, value in state.items():
            assert torch.equal(fresh.policy.optimizer.state_dict()["state"][idx][name], value), name

    monkeypatch.undo()
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    run = rlattr.load_run(run_dir)
    assert run.rounds == [0, 1, 2, 3] and [s["round"] for s in run.summaries] == [0, 1, 2, 3]
    first, resumed = run.score_tensors(0), run.score_tensors(2)  # the resumed part keeps the probes
    assert torch.equal(first["probe_observations"], resumed["probe_observations"])
    assert torch.equal(first["probe_actions"], resumed["probe_actions"])
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["resumes"] == [{"round": 2, "timesteps": 64}] and info["rounds_scored"] == 2
    assert restore_checkpoint(fresh, run_dir)["next_round"] == 4 and (run_dir / CHECKPOINT).is_file()
    with pytest.raises(SystemExit) as err:
        main(["train", "--resume", str(run_dir), "--no-progress"])
    assert err.value.code == 2 and "finished already" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(tmp_path), "--no-progress"])
    assert "holds no config.yaml" in capsys.readouterr().err


def test_a_full_disk_mid_run_warns_and_training_finishes(tmp_path, monkeypatch) -> None:
    import errno

    import rlattr.callbacks.sb3.checkpoint as checkpoint
    import rlattr.callbacks.sb3.train as runner
    import rlattr.rl.snapshots as snapshots

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_info = runner._write_run_info

    def info(*args, **kwargs):
        return full() if "train_seconds" in kwargs else real_info(*args, **kwargs)

    for module, name in ((snapshots, "save_tensors"), (checkpoint, "save_checkpoint")):
        monkeypatch.setattr(module, name, full)
    monkeypatch.setattr(runner, "_write_run_info", info)
    with pytest.warns(UserWarning) as record:
        run_dir = runner.train(config_from_dict({**TINY, "runs_dir": str(tmp_path)}), progress_bar=False)
    messages = [str(w.message) for w in record]
    assert sum("could not save the model checkpoint" in m for m in messages) == 1
    assert sum("snapshots stop here" in m for m in messages) == 1
    assert any("could not update run_info.json" in m for m in messages)
    assert run_dir.parent == tmp_path and (run_dir / "config.yaml").is_file()


@pytest.mark.slow
def test_kill_9_mid_run_loses_no_completed_round_and_resumes(tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from rlattr.callbacks.sb3.train import resume

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "total_timesteps": 32 * 10}))
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "rlattr", "train", str(cfg), "--runs-dir", str(runs), "--no-progress"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120  # a bound on waiting, not a timed assertion
        while time.monotonic() < deadline and proc.poll() is None:
            index = list(runs.glob("*/rlattr/rounds.jsonl"))
            if index and len(index[0].read_bytes().splitlines()) >= 3:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    (run_dir,) = list(runs.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn index line is allowed, and skipped
        run = rlattr.load_run(run_dir)
        assert len(run.rounds) >= 3 and run.rounds == list(range(len(run.rounds)))
        for k in run.rounds:  # every round with a scores file reads back whole
            assert torch.isfinite(run.scores(k).scores).all()
        if proc.returncode != 0:  # killed before its end (not finished first): continue the run
            resume(run_dir, progress_bar=False)
    run = rlattr.load_run(run_dir)
    assert run.rounds == list(range(10)) and [s["round"] for s in run.summaries] == list(range(10))
