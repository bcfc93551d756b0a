"""The ``rlattr`` command: shipped configs by name, init-config, study configs, overrides, help."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import rlattr
from rlattr.cli import build_parser, main
from rlattr.configs import shipped_names, shipped_text

REPO = Path(__file__).resolve().parents[1]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as err:
        main(["--version"])
    assert err.value.code == 0 and capsys.readouterr().out.strip() == f"rlattr {rlattr.__version__}"


def test_python_dash_m_runs_the_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rlattr", "--version"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == f"rlattr {rlattr.__version__}"


def test_every_option_has_help_and_shows_its_default() -> None:
    subs = _subparsers(build_parser())
    assert {"train", "report", "init-config", "demo", "demo-digits"} <= set(subs)
    for name, sub in subs.items():
        assert sub.formatter_class is argparse.ArgumentDefaultsHelpFormatter, name
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest}: no help text"
            if action.option_strings and action.default is not None:
                assert f"(default: {action.default})" in text, f"{name} {action.dest}"


def test_shipped_configs_are_valid_train_configs() -> None:
    from rlattr.callbacks.sb3.config import config_from_dict
    from rlattr.callbacks.sb3.train import check_config

    assert shipped_names() == ["cartpole", "lunarlander"]
    for name in shipped_names():
        check_config(config_from_dict(yaml.safe_load(shipped_text(name)), name))
        # the repository's configs/NAME.yaml (run from the root) is the shipped file
        assert (REPO / "configs" / f"{name}.yaml").read_text() == shipped_text(name)


def test_init_config_writes_a_copy_and_never_overwrites(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init-config", "cartpole"]) == 0
    assert (tmp_path / "cartpole.yaml").read_text() == shipped_text("cartpole")
    assert main(["init-config", "lunarlander.yaml", "sub/ll.yaml"]) == 0
    assert (tmp_path / "sub" / "ll.yaml").read_text() == shipped_text("lunarlander")
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main(["init-config", "cartpole"])
    assert err.value.code == 2 and "exists already" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["init-config", "pong"])
    assert "got 'pong'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "command"),
    [
        ("configs/iif/acrobot.yaml", "experiments/iif_sample_efficiency.py"),
        ("configs/iif/frozenlake.yaml", "experiments/iif_sample_efficiency.py"),
        ("configs/validity.yaml", "experiments/rl_attribution_validity.py --config"),
    ],
)
def test_study_configs_name_the_command_that_reads_them(config, command, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        main(["train", str(REPO / config)])
    msg = capsys.readouterr().err
    assert err.value.code == 2 and command in msg and "not of `rlattr train`" in msg


def test_unknown_config_name(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(["train", "cartpol"])
    assert err.value.code == 2
    expected = "got 'cartpol', neither a file nor a shipped config; supported: ['cartpole', 'lunarlander']"
    assert expected in capsys.readouterr().err


def test_train_a_shipped_config_by_name_from_any_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    argv = ["train", "cartpole", "--seed", "3", "--total-timesteps", "64", "--runs-dir", "r", "--no-progress"]
    assert main(argv) == 0
    (run_dir,) = list((tmp_path / "r").iterdir())
    assert run_dir.name.startswith("CartPole-v1__influence__3__")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["seed"] == 3 and saved["total_timesteps"] == 64 and saved["ppo"]["n_steps"] == 2048
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["seed"] == 3 and info["rounds_scored"] == 1  # 64 steps: one rollout of n_steps


def test_version_matches_the_installed_distribution() -> None:
    import importlib.metadata

    assert rlattr.__version__ == importlib.metadata.version("rlattr")  # pyproject.toml and __init__ agree
