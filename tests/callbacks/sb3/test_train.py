"""``rlattr train`` and ``rlattr report`` end to end on a tiny CartPole run; config key errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import rlattr
from rlattr.callbacks.sb3.config import ConfigError, config_from_dict
from rlattr.callbacks.sb3.train import check_config, resolve_policy_kwargs
from rlattr.cli import main

TINY = {
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
