"""Round scores from the JVP fast path against a float64 per-record autograd loop (no SB3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from rlattr.rl.attribution import RoundSpec, score_round
from rlattr.rl.ppo import PolicyOutput, PPOLossConfig
from rlattr.rl.records import RecordBatch
from rlattr.rl.targets import ActionTarget, CustomTarget, ReturnTarget, make_target


class TinyPolicy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.head = nn.Linear(5, 4)
        self.value = nn.Linear(5, 1)


def make_eval(model: TinyPolicy):
    def evaluate(params, obs, actions):
        h = functional_call(
            model.body, {k[5:]: v for k, v in params.items() if k.startswith("body.")}, (obs,)
        )
        logits = functional_call(
            model.head, {k[5:]: v for k, v in params.items() if k.startswith("head.")}, (h,)
        )
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(1, actions.long().reshape(-1, 1)).squeeze(1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return PolicyOutput(logp, entropy, None)

    return evaluate


def make_round(n: int = 12, seed: int = 0) -> tuple[TinyPolicy, RecordBatch]:
    torch.manual_seed(seed)
    model = TinyPolicy().double()
    obs = torch.randn(n, 1, 3, dtype=torch.float64)
    actions = torch.randint(0, 4, (n, 1, 1))
    with torch.no_grad():
        logp = make_eval(model)(dict(model.named_parameters()), obs[:, 0], actions[:, 0]).log_prob
    adv = torch.randn(n, 1, dtype=torch.float64)
    rec = RecordBatch.from_rollout(
        2,
        observations=obs,
        actions=actions,
        old_log_prob=logp.reshape(n, 1),
        values=torch.zeros(n, 1),
        rewards=torch.zeros(n, 1),
        returns=adv,
        advantages=adv,
        episode_starts=torch.zeros(n, 1),
    )
    return model, rec


def loop_reference(model, rec, names, target_fn, ent_coef, norm_adv):
    params = dict(model.named_parameters())
    ev = make_eval(model)
    g_t = torch.autograd.grad(target_fn(ev, params), [params[k] for k in names])
    out = []
    for i in range(len(rec)):
        o = ev(params, rec.observations[i : i + 1], rec.actions[i : i + 1])
        ratio = torch.exp(o.log_prob - rec.old_log_prob[i])
        loss = -(norm_adv[i] * ratio) - ent_coef * o.entropy
        g = torch.autograd.grad(loss.sum(), [params[k] for k in names])
        out.append(-sum((a * b).sum() for a, b in zip(g_t, g, strict=True)))
    return torch.stack(out)


@pytest.mark.parametrize("ent_coef", [0.0, 0.05])
def test_return_target_scores_equal_loop(ent_coef: float) -> None:
    model, rec = make_round()
    names = ["body.0.weight", "body.0.bias", "head.weight", "head.bias"]
    cfg = PPOLossConfig(ent_coef=ent_coef, advantage_norm="buffer")
    got = score_round(
        RoundSpec(model, make_eval(model), rec, ReturnTarget(), cfg, params=names), by_group=True
    )
    a = rec.advantages
    norm = (a - a.mean()) / (a.std() + 1e-8)

    def target(ev, p):
        return (ev(p, rec.observations, rec.actions).log_prob * rec.advantages).mean()

    ref = loop_reference(model, rec, names, target, ent_coef, norm)
    torch.testing.assert_close(got.scores.double(), ref, rtol=1e-5, atol=1e-6)
    assert got.by_group is not None and got.by_group.shape == (12, 2)
    assert got.group_names == ["body.0", "head"]
    assert got.ids[:, 0].eq(2).all()


def test_action_target_per_pair_gives_m_rows() -> None:
    model, rec = make_round()
    names = ["head.weight", "head.bias"]
    assert isinstance(rec.observations, torch.Tensor)
    obs, act = rec.observations[:3] + 0.5, torch.tensor([0, 1, 3])
    spec = ActionTarget(obs, act, reduce="none")
    cfg = PPOLossConfig(advantage_norm="none")
    got = score_round(RoundSpec(model, make_eval(model), rec, spec, cfg, params=names))
    assert got.scores.shape == (3, 12)
    for j in range(3):
        ref = loop_reference(
            model,
            rec,
            names,
            lambda ev, p, j=j: ev(p, obs[j : j + 1], act[j : j + 1]).log_prob.sum(),
            0.0,
            rec.advantages,
        )
        torch.testing.assert_close(got.scores[j].double(), ref, rtol=1e-5, atol=1e-6)


def test_lower_goal_flips_sign() -> None:
    model, rec = make_round()
    cfg = PPOLossConfig(advantage_norm="none")
    up = CustomTarget(lambda ev, p, b: ev(p, b["observations"], b["actions"]).log_prob.mean())
    down = CustomTarget(lambda ev, p, b: ev(p, b["observations"], b["actions"]).log_prob.mean(), goal="lower")
    s_up = score_round(RoundSpec(model, make_eval(model), rec, up, cfg, params=["head.weight"])).scores
    s_down = score_round(RoundSpec(model, make_eval(model), rec, down, cfg, params=["head.weight"])).scores
    torch.testing.assert_close(s_up, -s_down)


def test_target_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="target: got 'value'"):
        make_target("value")
    with pytest.raises(ValueError, match="source: got 'eval'"):
        ReturnTarget(source="eval")
    with pytest.raises(ValueError, match="reduce: got 'sum'"):
        ActionTarget(torch.zeros(2, 3), torch.zeros(2), reduce="sum")
    model, rec = make_round()
    with pytest.raises(ValueError, match="validation"):
        score_round(RoundSpec(model, make_eval(model), rec, ReturnTarget("validation"), PPOLossConfig()))
    with pytest.raises(TypeError, match="^records: expected a RecordBatch, got dict$"):
        RoundSpec(model, make_eval(model), rec.to_tensors(), ReturnTarget(), PPOLossConfig())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="^config: expected a PPOLossConfig, got dict$"):
        RoundSpec(model, make_eval(model), rec, ReturnTarget(), {"clip_range": 0.2})  # type: ignore[arg-type]


def test_duplicates_are_averaged() -> None:
    from rlattr.rl.attribution import average_duplicates

    _, rec = make_round(n=6)
    t = {k: v.clone() for k, v in rec.to_tensors().items()}
    for name in ("observations", "actions", "old_log_prob", "advantages"):
        t[name][4] = t[name][1]  # record 4 duplicates record 1
    dup = RecordBatch.from_tensors(t)
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0, 5.0])
    out = average_duplicates(dup, scores)
    assert out.tolist() == [1.0, 4.0, 3.0, 4.0, 4.0, 5.0]
    two = average_duplicates(dup, torch.stack([scores, -scores]))
    assert two[1].tolist() == [-1.0, -4.0, -3.0, -4.0, -4.0, -5.0]
    torch.testing.assert_close(average_duplicates(rec, scores), scores)
