"""InfluenceCallback on vanilla SB3 PPO: scores against a float64 brute force, determinism, ids."""

from __future__ import annotations

import copy
from contextlib import ExitStack
from unittest import mock

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.env_util import make_vec_env

import rlattr.callbacks.sb3.policy as sb3_policy
from rlattr.callbacks.sb3.influence import InfluenceCallback
from rlattr.callbacks.sb3.policy import SB3PolicyEval
from rlattr.rl.attribution import RoundSpec, score_round
from rlattr.rl.records import index_observations
from rlattr.rl.targets import ReturnTarget
from tests.callbacks.sb3.envs import SMALL_NET, TinyCNN, ToyEnv

torch.set_num_threads(1)


class Capture(InfluenceCallback):
    """Keeps theta(k), the loss config and a copy of SB3's buffer at scoring time."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.captured: list[dict] = []

    def _on_round_scored(self, records, scores) -> None:
        buf = self.rollout_buffer
        self.captured.append(
            {
                "policy": copy.deepcopy(self.model.policy),
                "config": self.loss_config(),
                "records": records,
                "scores": scores,
                "obs": _copy_obs(buf.observations),
                "actions": np.copy(buf.actions),
                "advantages": np.copy(buf.advantages),
                "labels": sb3_policy.first_epoch_minibatches(
                    self.model.n_steps, self.model.n_envs, self.model.batch_size
                ),
            }
        )


def _copy_obs(obs):
    return {k: np.copy(v) for k, v in obs.items()} if isinstance(obs, dict) else np.copy(obs)


def _float64_inputs():
    """Make SB3's preprocess_obs return float64 so a ``.double()`` policy runs end to end."""
    import stable_baselines3.common.policies as policies

    original = policies.preprocess_obs

    def pre(obs, space, normalize_images=True):
        out = original(obs, space, normalize_images=normalize_images)
        return {k: v.double() for k, v in out.items()} if isinstance(out, dict) else out.double()

    stack = ExitStack()
    stack.enter_context(mock.patch.object(policies, "preprocess_obs", pre))
    stack.enter_context(mock.patch.object(sb3_policy, "preprocess_obs", pre))
    return stack


def brute_force(policy, records, config, names, labels=None, target_records=None) -> torch.Tensor:
    """Per record: autograd of its PPO loss at theta(k), dotted with the autograd target gradient.

    The target is ``mean_j log pi(a_j|s_j) A_j`` over ``target_records`` (default: ``records``)."""
    pol = copy.deepcopy(policy).double()
    params = dict(pol.named_parameters())
    tracked = [params[n] for n in names]
    discrete = isinstance(pol.action_space, spaces.Discrete)
    acts = records.actions.long().flatten() if discrete else records.actions.double()
    adv_raw = records.advantages.double()
    adv = (adv_raw - adv_raw.mean()) / (adv_raw.std() + 1e-8)
    if config.advantage_norm == "minibatch":
        adv = adv_raw.clone()
        for label in labels.unique():
            m = labels == label
            adv[m] = (adv_raw[m] - adv_raw[m].mean()) / (adv_raw[m].std() + 1e-8)
    on = records if target_records is None else target_records
    on_acts = on.actions.long().flatten() if discrete else on.actions.double()
    with _float64_inputs():
        _, logp_all, _ = pol.evaluate_actions(on.observations, on_acts)
        target = (logp_all * on.advantages.double()).mean()
        g_target = torch.autograd.grad(target, tracked, allow_unused=True)
        out = []
        for i in range(len(records)):
            obs_i = index_observations(records.observations, slice(i, i + 1))
            values, logp, ent = pol.evaluate_actions(obs_i, acts[i : i + 1])
            ratio = torch.exp(logp - records.old_log_prob[i].double())
            c = config.clip_range
            loss = -torch.min(adv[i] * ratio, adv[i] * torch.clamp(ratio, 1 - c, 1 + c))
            loss = loss - config.ent_coef * (ent if ent is not None else -logp)
            if config.include_value_loss:
                loss = loss + config.vf_coef * (records.returns[i].double() - values.flatten()) ** 2
            g = torch.autograd.grad(loss.sum(), tracked, allow_unused=True)
            dot = sum(
                (a * b).sum() for a, b in zip(g_target, g, strict=True) if a is not None and b is not None
            )
            out.append(-dot)  # I_i = <grad f, -grad L_i>
    return torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in out])


def _toy(action_space, obs="vector", n_envs=1):
    return make_vec_env(lambda: ToyEnv(action_space, obs=obs), n_envs=n_envs, seed=3)


CASES = {
    "discrete": lambda: ("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=1), {}),
    "box": lambda: ("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=1), {}),
    "cnn": lambda: (
        "CnnPolicy",
        _toy(spaces.Discrete(3), obs="image"),
        {"features_extractor_class": TinyCNN, "normalize_images": True},
    ),
    "multidiscrete": lambda: ("MlpPolicy", _toy(spaces.MultiDiscrete([3, 2])), {}),
    "multibinary": lambda: ("MlpPolicy", _toy(spaces.MultiBinary(3)), {}),
    "dict": lambda: ("MultiInputPolicy", _toy(spaces.Discrete(3), obs="dict", n_envs=2), {}),
}


def _run(
    case: str, params: str = "actor", rounds: int = 2, n_steps: int = 24, norm: str = "auto"
) -> tuple[Capture, PPO]:
    policy, env, extra = CASES[case]()
    model = PPO(
        policy,
        env,
        n_steps=n_steps,
        batch_size=16,
        n_epochs=2,
        ent_coef=0.01,
        seed=0,
        device="cpu",
        policy_kwargs={**SMALL_NET, **extra},
    )
    cb = Capture(target="return", params=params, advantage_norm=norm)
    model.learn(rounds * n_steps * env.num_envs, callback=cb)
    return cb, model


@pytest.mark.parametrize(
    ("case", "params", "norm"),
    [
        ("discrete", "actor", "auto"),
        ("discrete", "all", "auto"),
        ("box", "actor", "auto"),
        ("box", "actor", "minibatch"),
        ("cnn", "actor", "auto"),
        ("multidiscrete", "actor", "auto"),
        ("multibinary", "actor", "auto"),
        ("dict", "actor", "auto"),
        ("dict", "all", "minibatch"),
    ],
)
def test_scores_match_float64_brute_force(case: str, params: str, norm: str) -> None:
    cb, _ = _run(case, params, norm=norm)
    last = cb.captured[-1]
    assert last["records"].round_index == 1
    assert last["config"].advantage_norm == ("buffer" if norm == "auto" else norm)
    ref = brute_force(last["policy"], last["records"], last["config"], cb.param_names, last["labels"])
    got = last["scores"].scores.double()
    scale = ref.abs().max()
    assert scale > 0
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4 * float(scale))
    # the same pipeline on a float64 copy of theta(k) matches to float64 precision
    pol64 = copy.deepcopy(last["policy"]).double()
    with _float64_inputs():
        spec = RoundSpec(
            pol64,
            SB3PolicyEval(pol64, with_values=params == "all", action_dtype=torch.float64),
            last["records"],
            ReturnTarget(),
            last["config"],
            params=cb.param_names,
            minibatch_of=last["labels"] if norm == "minibatch" else None,
        )
        exact = score_round(spec)
    torch.testing.assert_close(exact.scores.double(), ref, rtol=1e-4, atol=1e-7 * float(scale))


def test_actor_params_leave_value_head_out() -> None:
    cb, model = _run("cnn", rounds=1)
    names = cb.param_names
    assert not any(n.startswith(("value_net.", "mlp_extractor.value_net.")) for n in names)
    assert any(n.startswith("features_extractor.") for n in names)  # shared CNN is kept
    assert any(n.startswith("action_net.") for n in names)


def test_by_group_columns_sum_to_total() -> None:
    policy, env, _ = CASES["discrete"]()
    model = PPO(policy, env, n_steps=16, batch_size=16, n_epochs=1, seed=0, policy_kwargs=SMALL_NET)
    cb = InfluenceCallback(by_group=True)
    model.learn(32, callback=cb)
    s = cb.last_scores
    assert s is not None and s.by_group is not None
    assert s.by_group.shape == (32, len(s.group_names)) and s.group_names == [
        "mlp_extractor.policy_net.0",
        "action_net",
    ]
    torch.testing.assert_close(s.by_group.sum(1), s.scores, rtol=1e-5, atol=1e-6)


def _final_params(callback, env_cls=None, image: bool = False) -> dict[str, torch.Tensor]:
    if image:
        env = make_vec_env(lambda: ToyEnv(spaces.Discrete(3), obs="image"), n_envs=2, seed=5)
        policy, extra = "CnnPolicy", {"features_extractor_class": TinyCNN}
    else:
        kwargs = {"vec_env_cls": env_cls, "vec_env_kwargs": {"start_method": "fork"}} if env_cls else {}
        env = make_vec_env("CartPole-v1", n_envs=2, seed=5, **kwargs)
        policy, extra = "MlpPolicy", {}
    model = PPO(
        policy, env, n_steps=32, batch_size=16, n_epochs=2, seed=5, policy_kwargs={**SMALL_NET, **extra}
    )
    before = dict(model.policy.named_parameters())
    cb = callback() if callback else None
    model.learn(3 * 64, callback=cb)
    env.close()
    after = dict(model.policy.named_parameters())
    assert all(after[k] is before[k] for k in before), "the callback replaced a Parameter object"
    return {k: v.clone() for k, v in model.policy.state_dict().items()}


@pytest.mark.parametrize(("advantage_norm", "image"), [("auto", False), ("minibatch", False), ("auto", True)])
def test_same_seed_same_parameters_with_and_without_callback(advantage_norm: str, image: bool) -> None:
    plain = _final_params(None, image=image)
    with_cb = _final_params(
        lambda: InfluenceCallback(advantage_norm=advantage_norm, by_group=True), image=image
    )
    assert plain.keys() == with_cb.keys()
    for k in plain:
        assert torch.equal(plain[k], with_cb[k]), k


def test_subproc_vec_env_same_parameters() -> None:
    from stable_baselines3.common.vec_env import SubprocVecEnv

    plain = _final_params(None, SubprocVecEnv)
    cb_params = _final_params(lambda: InfluenceCallback(), SubprocVecEnv)
    assert all(torch.equal(plain[k], cb_params[k]) for k in plain)


def test_id_leads_back_to_the_buffer_transition() -> None:
    cb, _ = _run("discrete", rounds=2)
    last = cb.captured[-1]
    rec, scores = last["records"], last["scores"]
    by_id = scores.as_dict()
    assert len(by_id) == len(rec) == 48
    for pos in (0, 1, 17, 47):
        r, step, env = (int(x) for x in scores.ids[pos])
        assert r == 1 and pos == step * 2 + env
        assert np.array_equal(rec.observations[pos].numpy(), last["obs"][step, env])
        assert np.array_equal(rec.actions[pos].numpy(), last["actions"][step, env])
        assert float(rec.advantages[pos]) == float(last["advantages"][step, env])
        assert by_id[(r, step, env)] == float(scores.scores[pos])


def test_minibatch_labels_reproduce_sb3_permutation() -> None:
    from stable_baselines3.common.buffers import RolloutBuffer

    n_steps, n_envs, bs = 6, 2, 4
    np.random.seed(11)
    labels = sb3_policy.first_epoch_minibatches(n_steps, n_envs, bs)
    buf = RolloutBuffer(n_steps, spaces.Box(-1, 1, (1,)), spaces.Discrete(2), n_envs=n_envs)
    for step in range(n_steps):
        obs = np.array([[step * 10 + e] for e in range(n_envs)], dtype=np.float32)
        buf.add(
            obs,
            np.zeros((n_envs, 1)),
            np.zeros(n_envs),
            np.zeros(n_envs),
            torch.zeros(n_envs),
            torch.zeros(n_envs),
        )
    for mb, data in enumerate(buf.get(bs)):  # draws the permutation first_epoch_minibatches predicted
        codes = data.observations.flatten().long().tolist()
        expected = [i for i in range(n_steps * n_envs) if labels[i] == mb]
        assert sorted(codes) == sorted((i // n_envs) * 10 + i % n_envs for i in expected)


def test_unsupported_algorithms_and_spaces_fail_clearly() -> None:
    env = make_vec_env("CartPole-v1", n_envs=1)
    with pytest.raises(TypeError, match="supports stable_baselines3.PPO only.*A2C"):
        A2C("MlpPolicy", env, n_steps=8).learn(8, callback=InfluenceCallback())
    with pytest.raises(TypeError, match="supports stable_baselines3.PPO only.*DQN"):
        DQN("MlpPolicy", env, learning_starts=0).learn(8, callback=InfluenceCallback())
    from stable_baselines3.common.policies import ActorCriticPolicy

    class RecurrentActorCriticPolicy(ActorCriticPolicy):
        """Stands in for sb3_contrib's recurrent policy (not installed here)."""

    with pytest.raises(TypeError, match="recurrent policies are not supported"):
        PPO(RecurrentActorCriticPolicy, env, n_steps=8, batch_size=8).learn(8, callback=InfluenceCallback())
    pend = make_vec_env("Pendulum-v1", n_envs=1)
    with pytest.raises(ValueError, match="gSDE"):
        PPO("MlpPolicy", pend, n_steps=8, batch_size=8, use_sde=True).learn(8, callback=InfluenceCallback())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": "reward"}, "target: got 'reward'"),
        ({"params": "critic"}, "params: got 'critic'"),
        ({"advantage_norm": "batch"}, "advantage_norm: got 'batch'"),
        ({"every": 0}, "every: expected an integer >= 1"),
        ({"target": ReturnTarget(source="validation")}, "validation_env"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        InfluenceCallback(**kwargs)


def test_validation_target_leaves_ppo_unchanged_and_scores_against_validation_data() -> None:
    import rlattr.callbacks.sb3.influence as influence_module
    from rlattr.callbacks.sb3.validation import collect_validation

    val_env = make_vec_env("CartPole-v1", n_envs=1, seed=9)
    holder: dict = {"validation": []}

    def make() -> InfluenceCallback:
        holder["cb"] = Capture(target=ReturnTarget("validation"), validation_env=val_env, validation_steps=16)
        return holder["cb"]

    def collect(*args, **kwargs):  # the batch the callback scored against, kept for the oracle
        batch = collect_validation(*args, **kwargs)
        holder["validation"].append(batch)
        return batch

    plain = _final_params(None)
    with mock.patch.object(influence_module, "collect_validation", collect):
        with_cb = _final_params(make)
    assert all(torch.equal(plain[k], with_cb[k]) for k in plain)
    cb = holder["cb"]
    assert cb.last_scores.target == {"name": "return", "goal": "raise", "source": "validation"}
    assert len(holder["validation"]) == len(cb.captured) == 3
    for last, val in zip(cb.captured, holder["validation"], strict=True):
        assert len(val) == 16 and not torch.equal(val.observations, last["records"].observations[:16])
        ref = brute_force(last["policy"], last["records"], last["config"], cb.param_names, target_records=val)
        on_buffer = brute_force(last["policy"], last["records"], last["config"], cb.param_names)
        got = last["scores"].scores.double()
        scale = float(ref.abs().max())
        assert scale > 0
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4 * scale)
        assert float((got - on_buffer).abs().max()) > 1e-2 * scale  # not the buffer-sourced target
    val = collect_validation(cb.model, make_vec_env("CartPole-v1", n_envs=1, seed=9), 8, 0)
    assert len(val) == 8 and val.id_list()[3] == (0, 3, 0)
    with pytest.raises(TypeError, match="validation_env: expected a stable_baselines3 VecEnv"):
        collect_validation(cb.model, object(), 8, 0)  # type: ignore[arg-type]
