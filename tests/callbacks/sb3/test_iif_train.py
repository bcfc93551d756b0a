"""``rlattr train`` with an ``iif`` section: IIFCallback filters each round as its rule says."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

import rlattr
from rlattr.callbacks.sb3.config import ConfigError, config_from_dict
from rlattr.callbacks.sb3.train import check_config
from rlattr.cli import main

TINY: dict[str, Any] = {
    "env_id": "CartPole-v1",
    "exp_name": "iif",
    "seed": 3,
    "total_timesteps": 96,
    "ppo": {"n_steps": 32, "batch_size": 16, "n_epochs": 1, "policy_kwargs": {"net_arch": [8]}},
    "callback": {"tensorboard": False},
    "iif": {"drop": "neg-bottom", "p": 0.5, "min_keep": 1},
    "torch_threads": 1,
}


def _kept_by_hand(scores: list[float], p: float) -> float:
    """The paper's rule written out: drop the int(p * #negatives) lowest scores (ties at the cut stay)."""
    ordered = sorted(scores)
    cut = int(p * sum(1 for s in scores if s < 0))
    return sum(1 for s in scores if s >= ordered[cut]) / len(scores)


def test_train_with_an_iif_section_filters_every_round(tmp_path) -> None:
    cfg = tmp_path / "iif.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    (run_dir,) = list((tmp_path / "runs").iterdir())
    info = json.loads((run_dir / "run_info.json").read_text())
    run = rlattr.load_run(run_dir)
    assert run.rounds == [0, 1, 2] and info["rounds_scored"] == 3
    expected = [_kept_by_hand(run.scores(k).scores.tolist(), 0.5) for k in run.rounds]
    assert info["iif_kept_fraction"] == pytest.approx(expected, abs=1e-12)
    assert min(expected) < 1.0  # some round really dropped records
    dropped = json.loads((run_dir / "rlattr" / "iif" / "round_00000.json").read_text())
    assert len(json.dumps(dropped)) > 2


def test_a_config_without_iif_only_observes(tmp_path) -> None:
    cfg = tmp_path / "obs.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "iif": None, "total_timesteps": 32}))
    assert main(["train", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    (run_dir,) = list((tmp_path / "runs").iterdir())
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["rounds_scored"] == 1 and "iif_kept_fraction" not in info
    assert not (run_dir / "rlattr" / "iif").exists()


@pytest.mark.parametrize(
    ("iif", "match"),
    [
        ({"pp": 0.5}, r"iif: unknown key\(s\) \['pp'\]"),
        ({"validation_env": 1}, r"iif: unknown key\(s\) \['validation_env'\]"),
        ({"probe_states": 2}, r"iif: unknown key\(s\) \['probe_states'\]"),
    ],
)
def test_unknown_iif_keys_are_named(iif: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_config(config_from_dict({**TINY, "iif": iif}))


def test_iif_section_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"iif: got \[0.5\]; supported: a mapping"):
        config_from_dict({**TINY, "iif": [0.5]})


def test_bad_iif_values_fail_before_a_run_folder_exists(tmp_path, capsys) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "iif": {"score_on": "heldout"}}))
    with pytest.raises(SystemExit):
        main(["train", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--no-progress"])
    assert "iif.score_on: got 'heldout'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_validation_scoring_gets_its_own_env(tmp_path) -> None:
    config = {
        **TINY,
        "total_timesteps": 32,
        "callback": {"tensorboard": False, "validation_steps": 8},
        "iif": {"score_on": "validation", "min_keep": 1},
    }
    cfg = tmp_path / "val.yaml"
    cfg.write_text(yaml.safe_dump(config))
    assert main(["train", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    (run_dir,) = list((tmp_path / "runs").iterdir())
    run = rlattr.load_run(run_dir)
    assert run.rounds == [0]
    assert "score_on" in json.dumps(run.meta) and "validation" in json.dumps(run.meta)
    kept = json.loads((run_dir / "run_info.json").read_text())["iif_kept_fraction"]
    assert kept == pytest.approx([_kept_by_hand(run.scores(0).scores.tolist(), 0.125)], abs=1e-12)
