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


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("env_id: CartPole-v1\nseed: 1\nseed: 2\n", "duplicate key 'seed'"),
        ("env_id: CartPole-v1\nppo: {n_steps: 64, n_steps: 32}\n", "duplicate key 'n_steps'"),
        ("env_id: CartPole-v1\ntorch_threads: true\n", "torch_threads: expected an integer >= 1 or null"),
        (
            "env_id: CartPole-v1\ntotal_timesteps: 1500.5\n",
            "total_timesteps: expected an integer >= 1, got 1500.5",
        ),
        ("env_id: CartPole-v1\nexp_name: ../../../tmp/x\n", "exp_name: got '../../../tmp/x'; supported"),
        ("env_id: CartPole-v1\nexp_name: a/b\n", "exp_name: got 'a/b'"),
        ("env_id: CartPole-v1\nexp_name: ''\n", "exp_name: got ''"),
    ],
)
def test_values_that_would_mislead_are_refused(tmp_path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_whole_number_floats_are_ints(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "env_id: CartPole-v1\ntotal_timesteps: 1e5\nseed: 2.0\nn_envs: 4.0\nppo: {learning_rate: 3e-4}\n"
    )
    cfg = load_config(path)
    assert (cfg.total_timesteps, cfg.seed, cfg.n_envs) == (100_000, 2, 4)
    assert cfg.ppo["learning_rate"] == 3e-4  # plain YAML 1.1 would read "3e-4" as a string
    assert all(type(v) is int for v in (cfg.total_timesteps, cfg.seed, cfg.n_envs))


def test_the_run_folder_stays_inside_runs_dir(tmp_path) -> None:
    cfg = config_from_dict({"env_id": "../../x", "exp_name": "e.v-1_b", "runs_dir": str(tmp_path)})
    assert cfg.run_name(1) == "..-..-x__e.v-1_b__0__1"
