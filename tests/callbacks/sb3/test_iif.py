"""IIFCallback: SB3's train() sees exactly the kept records; the buffer comes back afterwards."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from rlattr.callbacks import IIFCallback
from rlattr.callbacks.sb3.iif import compact_rollout_buffer, restore_rollout_buffer
from rlattr.errors import RlattrError
from rlattr.rl.filtering import NegBottom, make_rule

N_STEPS, N_ENVS, BATCH, EPOCHS = 32, 2, 16, 2


class CounterEnv(gym.Env):
    """Observation ``[c, env_index]`` with ``c`` this env's step counter (never reset): unique ids.

    The counter of rollout step s in round k is ``k * N_STEPS + s``; reward 1 for action ``c % 2``.

    With ``dict_obs`` the observation is ``{"c": [c, env_index], "k": c % 3}`` (MultiInputPolicy).
    """

    action_space = spaces.Discrete(2)

    def __init__(self, index: int = 0, dict_obs: bool = False) -> None:
        self.index, self.count, self.t, self.dict_obs = index, 0, 0, dict_obs
        box = spaces.Box(-1e6, 1e6, (2,), np.float32)
        self.observation_space = spaces.Dict({"c": box, "k": spaces.Discrete(3)}) if dict_obs else box

    def _obs(self) -> Any:
        vec = np.array([self.count, self.index], dtype=np.float32)
        return {"c": vec, "k": self.count % 3} if self.dict_obs else vec

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action: int) -> tuple[Any, float, bool, bool, dict]:
        reward = float(int(action) == self.count % 2)
        self.count, self.t = self.count + 1, self.t + 1
        return self._obs(), reward, self.t >= 8, False, {}


def _env_fns(dict_obs: bool = False) -> list:
    return [lambda i=i: CounterEnv(i, dict_obs) for i in range(N_ENVS)]


def _model(vec_cls: type = DummyVecEnv, dict_obs: bool = False, **kwargs: Any) -> PPO:
    kwargs = {"n_epochs": EPOCHS, **kwargs}
    policy = "MultiInputPolicy" if dict_obs else "MlpPolicy"
    env = vec_cls(_env_fns(dict_obs))
    return PPO(policy, env, n_steps=N_STEPS, batch_size=BATCH, seed=0, device="cpu", **kwargs)


def _spy_train_samples(model: PPO) -> list[list[tuple[int, int]]]:
    """Record the (counter, env) of every sample SB3's train() draws, one list per epoch."""
    seen: list[list[tuple[int, int]]] = []
    buf = model.rollout_buffer
    original_get = buf.get

    def get(batch_size: int | None = None):  # type: ignore[no-untyped-def]
        seen.append([])
        for data in original_get(batch_size):
            obs = data.observations["c"] if isinstance(data.observations, dict) else data.observations
            seen[-1].extend((int(o[0]), int(o[1])) for o in obs.numpy())
            yield data

    buf.get = get  # type: ignore[method-assign]
    return seen


def _record_key(rid: list[int]) -> tuple[int, int]:
    round_index, step, env = rid
    return round_index * N_STEPS + step, env


@pytest.mark.parametrize("dict_obs", [False, True])
def test_train_sees_exactly_the_kept_records_every_epoch(dict_obs: bool) -> None:
    model = _model(dict_obs=dict_obs)
    seen = _spy_train_samples(model)
    cb = IIFCallback(drop="neg-bottom", p=1.0, min_keep=BATCH)
    model.learn(3 * N_STEPS * N_ENVS, callback=cb)
    assert len(cb.filter_history) == 3 and len(seen) == 3 * EPOCHS  # train() calls get() once per epoch
    for k, h in enumerate(cb.filter_history):
        n = N_STEPS * N_ENVS
        dropped = {_record_key(i) for i in h["dropped_ids"]}
        every = {(h["round"] * N_STEPS + s, e) for s in range(N_STEPS) for e in range(N_ENVS)}
        assert h["n_records"] == n and 0 < len(dropped) < n
        epochs = seen[k * EPOCHS : (k + 1) * EPOCHS]
        assert sum(len(samples) for samples in epochs) == h["n_kept"] * EPOCHS
        for samples in epochs:  # each epoch: every kept record exactly once, no dropped one
            assert sorted(samples) == sorted(every - dropped)
    assert model._n_updates == 3 * EPOCHS


def test_dropped_records_are_the_neg_bottom_ones(tmp_path: Path) -> None:
    model = _model(n_epochs=1)
    cb = IIFCallback(drop="neg-bottom", p=0.5, min_keep=1, log_dir=tmp_path, tensorboard=False)
    model.learn(N_STEPS * N_ENVS, callback=cb)
    saved = json.loads((tmp_path / "rlattr" / "iif" / "round_00000.json").read_text())
    assert saved["dropped_ids"] == cb.filter_history[0]["dropped_ids"]
    scores = cb.last_scores.scores
    expected = NegBottom(0.5)(scores)
    ids = cb.last_records.ids.tolist()
    dropped = [ids[i] for i in torch.nonzero(~expected.keep).flatten().tolist()]
    assert sorted(cb.filter_history[0]["dropped_ids"]) == sorted(dropped)
    assert cb.filter_history[0]["n_kept"] == expected.n_kept


def test_random_drop_keeps_the_count_of_neg_bottom() -> None:
    model = _model(n_epochs=1)
    cb = IIFCallback(drop="random", p=0.5, min_keep=1, seed=4)
    model.learn(N_STEPS * N_ENVS, callback=cb)
    assert cb.filter_history[0]["n_kept"] == NegBottom(0.5)(cb.last_scores.scores).n_kept


def test_buffer_full_size_again_second_learn_and_save_load(tmp_path: Path) -> None:
    model = _model(n_epochs=2, target_kl=0.5, clip_range_vf=0.2)
    cb = IIFCallback(drop="neg-bottom", p=1.0)
    model.learn(2 * N_STEPS * N_ENVS, callback=cb)
    buf = model.rollout_buffer
    assert (buf.buffer_size, buf.n_envs, buf.observations.shape) == (N_STEPS, N_ENVS, (N_STEPS, N_ENVS, 2))
    model.learn(N_STEPS * N_ENVS, callback=cb, reset_num_timesteps=False)
    assert [h["n_records"] for h in cb.filter_history] == [N_STEPS * N_ENVS] * 3
    assert all(h["n_kept"] >= BATCH for h in cb.filter_history)  # min_keep defaults to batch_size
    assert cb.rule.min_keep == BATCH
    model.save(tmp_path / "iif.zip")
    loaded = PPO.load(tmp_path / "iif.zip", env=DummyVecEnv(_env_fns()), device="cpu")
    for (name, a), b in zip(
        model.policy.state_dict().items(), loaded.policy.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert loaded.rollout_buffer.observations.shape == (N_STEPS, N_ENVS, 2)
    cb2 = IIFCallback(drop="neg-bottom", p=1.0)
    loaded.learn(N_STEPS * N_ENVS, callback=cb2)
    assert cb2.filter_history[0]["n_records"] == N_STEPS * N_ENVS


def test_subproc_vec_env_and_no_advantage_normalisation() -> None:
    model = _model(SubprocVecEnv, n_epochs=1, normalize_advantage=False)
    seen = _spy_train_samples(model)
    env = model.get_env()
    assert env is not None
    try:
        cb = IIFCallback(drop="neg-bottom", p=1.0, min_keep=1)
        model.learn(N_STEPS * N_ENVS, callback=cb)
    finally:
        env.close()
    assert len(seen) == 1 and len(seen[0]) == cb.filter_history[0]["n_kept"] < N_STEPS * N_ENVS


def _filled_buffer(dict_obs: bool, n_steps: int = 4, n_envs: int = 3) -> RolloutBuffer:
    box = spaces.Box(-np.inf, np.inf, (2,), np.float32)
    buf: RolloutBuffer
    if dict_obs:
        space = spaces.Dict({"a": box, "b": spaces.Box(-np.inf, np.inf, (1,), np.float32)})
        buf = DictRolloutBuffer(n_steps, space, spaces.Discrete(2), device="cpu", n_envs=n_envs)
    else:
        buf = RolloutBuffer(n_steps, box, spaces.Discrete(2), device="cpu", n_envs=n_envs)
    for s in range(n_steps):
        rec = np.arange(n_envs) + s * n_envs  # step-major record number
        o = np.stack([rec, -rec], 1).astype(np.float32)
        obs = {"a": o, "b": rec[:, None].astype(np.float32)} if dict_obs else o
        value = torch.tensor(rec, dtype=torch.float32)
        # RolloutBuffer.add is annotated for array observations; DictRolloutBuffer.add takes the dict
        buf.add(obs, rec % 2, rec.astype(np.float32), np.zeros(n_envs), value, value / 10)  # type: ignore[arg-type]
    buf.compute_returns_and_advantage(torch.zeros(n_envs), np.zeros(n_envs))
    return buf


@pytest.mark.parametrize("dict_obs", [False, True])
@pytest.mark.parametrize("flattened_first", [False, True])
def test_compaction_keeps_the_masked_records_in_order(dict_obs: bool, flattened_first: bool) -> None:
    buf = _filled_buffer(dict_obs)
    advantages = buf.advantages.reshape(-1).copy()
    if flattened_first:
        next(buf.get(2))  # SB3 flattens env-major on the first get()
    keep = np.array([True, False, True, True, False, False, True, True, False, True, True, False])
    shape = compact_rollout_buffer(buf, keep)
    kept = np.flatnonzero(keep)
    assert (buf.buffer_size, buf.n_envs, buf.pos, buf.full) == (7, 1, 7, True)
    obs = buf.observations["a"] if dict_obs else buf.observations
    np.testing.assert_array_equal(obs[:, 0, 0], kept)
    np.testing.assert_array_equal(buf.values[:, 0], kept)
    np.testing.assert_array_equal(buf.rewards[:, 0], kept)
    np.testing.assert_array_equal(buf.actions[:, 0, 0], kept % 2)
    np.testing.assert_allclose(buf.log_probs[:, 0], kept / 10, rtol=1e-6)
    np.testing.assert_array_equal(buf.advantages[:, 0], advantages[kept])
    drawn = np.concatenate([d.old_values.numpy() for d in buf.get(3)])
    assert sorted(drawn.tolist()) == kept.tolist()
    restore_rollout_buffer(buf, shape)
    obs = buf.observations["a"] if dict_obs else buf.observations
    assert (buf.buffer_size, buf.n_envs, obs.shape[:2], buf.pos, buf.full) == (4, 3, (4, 3), 0, False)


def test_rules_come_from_the_one_factory() -> None:
    cases = [
        (IIFCallback(drop="top-k", rule_kwargs={"k": 5}, min_keep=2), make_rule("top-k", k=5, min_keep=2)),
        (
            IIFCallback(drop="random", p=0.25, seed=3, min_keep=2),
            make_rule("random", p=0.25, seed=3, min_keep=2),
        ),
        (
            IIFCallback(drop="random", seed=1, rule_kwargs={"like": "bottom-fraction", "q": 0.3}, min_keep=4),
            make_rule("random", like="bottom-fraction", q=0.3, seed=1, min_keep=4),
        ),
    ]
    scores = torch.randn(64, generator=torch.Generator().manual_seed(0))
    for cb, rule in cases:
        assert cb.rule.config() == rule.config()
        assert torch.equal(cb.rule(scores).keep, rule(scores).keep)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(
        RlattrError, match=r"^drop: got 'worst'; supported: \['adaptive', 'bottom-fraction', 'neg-bottom'"
    ):
        IIFCallback(drop="worst")
    with pytest.raises(RlattrError, match=r"^p: must be a fraction in \[0, 1\], got 2.0$"):
        IIFCallback(p=2.0)
    with pytest.raises(
        RlattrError, match=r"^min_keep: expected an int >= 1 or None \(one minibatch\), got 0$"
    ):
        IIFCallback(min_keep=0)
    with pytest.raises(
        RlattrError, match=r"^rule_kwargs: got \['seed'\]; supported: \['f', 'k', 'like', 'q', 't'\]$"
    ):
        IIFCallback(drop="top-k", rule_kwargs={"seed": 1})
    with pytest.raises(RlattrError, match=r"^k: got None; drop='top-k' needs it$"):
        IIFCallback(drop="top-k")
    buf = _filled_buffer(False)
    with pytest.raises(ValueError, match="keep"):
        compact_rollout_buffer(buf, np.zeros(12, dtype=bool))
    with pytest.raises(ValueError, match="keep"):
        compact_rollout_buffer(buf, np.ones(5, dtype=bool))


def test_experiment_smoke_writes_its_table(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "experiments"))
    import iif_sample_efficiency as study

    config = Path(study.REPO) / "configs" / "iif" / "frozenlake.yaml"
    argv = [str(config), "--seeds", "1", "--methods", "ppo,iif", "--workers", "1", "--out", str(tmp_path)]
    study.main(
        [*argv, "--rounds", "3", "--n-steps", "128", "--episodes", "4", "--table", str(tmp_path / "t.md")]
    )
    runs = sorted(p.name for p in (tmp_path / "frozenlake" / "seed_runs").iterdir())
    assert runs == ["iif_seed0.json", "ppo_seed0.json"]
    run = json.loads((tmp_path / "frozenlake" / "seed_runs" / "iif_seed0.json").read_text())
    assert len(run["curve"]) == len(run["seconds"]) == len(run["kept_fraction"]) == 3
    assert np.all(np.diff(run["seconds"]) > 0) and run["provenance"]["torch"] == torch.__version__
    results = json.loads((tmp_path / "frozenlake" / "results.json").read_text())
    assert set(results["methods"]) == {"ppo", "iif"} and "efficiency_vs_ppo" in results["methods"]["iif"]
    table = (tmp_path / "t.md").read_text()
    assert table.startswith("| env | method |") and "FrozenLake-v1 | iif | 1 |" in table
    assert (tmp_path / "frozenlake" / "curves.png").stat().st_size > 0
    mtime = (tmp_path / "frozenlake" / "seed_runs" / "ppo_seed0.json").stat().st_mtime
    study.main([*argv, "--rounds", "3", "--n-steps", "128", "--episodes", "4"])  # resumable: nothing reruns
    assert (tmp_path / "frozenlake" / "seed_runs" / "ppo_seed0.json").stat().st_mtime == mtime
    # --report-only: from the runs; from a stored results.json when the runs are gone; else an error
    report = [str(config), "--report-only", "--out", str(tmp_path), "--table", str(tmp_path / "r.md")]
    study.main(report)
    assert (tmp_path / "r.md").read_text() == table
    for path in (tmp_path / "frozenlake" / "seed_runs").iterdir():
        path.unlink()
    (tmp_path / "r.md").unlink()
    study.main(report)
    assert (tmp_path / "r.md").read_text() == table
    (tmp_path / "frozenlake" / "results.json").unlink()
    with pytest.raises(SystemExit, match="no finished PPO run"):
        study.main(report)
