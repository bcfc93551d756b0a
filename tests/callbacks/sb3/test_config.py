"""The YAML config of ``rlattr train``: every bad input names its key."""

from __future__ import annotations

import pytest

from rlattr.callbacks.sb3.config import ConfigError, config_from_dict, load_config


def test_load_and_run_name(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("env_id: CartPole-v1\nseed: 3\nppo: {n_steps: 64}\n")
    cfg = load_config(path, {"runs_dir": str(tmp_path)})
    assert (cfg.env_id, cfg.seed, cfg.ppo, cfg.runs_dir) == ("CartPole-v1", 3, {"n_steps": 64}, str(tmp_path))
    assert cfg.run_name(1700000000) == "CartPole-v1__influence__3__1700000000"
    assert config_from_dict({"env_id": "ALE/Pong-v5"}).run_name(1) == "ALE-Pong-v5__influence__0__1"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("env_id: [unclosed\n", "not valid YAML"),
        ("env_id: CartPole-v1\nlearning_rate: 0.1\n", r"unknown key\(s\) \['learning_rate'\]"),
        ("seed: 1\n", "missing required key 'env_id'"),
        ("env_id: CartPole-v1\nseed: -1\n", "seed: expected an integer >= 0"),
        ("env_id: CartPole-v1\nvec_env: threads\n", "vec_env: got 'threads'"),
        ("env_id: CartPole-v1\nppo: 3\n", "ppo: expected a mapping"),
        ("- a\n- b\n", "expected a mapping of settings"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
