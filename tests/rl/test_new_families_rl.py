"""Issue 16's methods on a PPO round's Task and on a whole run's stored records (tiny, float64, no SB3).

Unlearning with one tiny unbounded ascent step and no normalisation is, to first order, the round's
gradient score; a distilled Grad-Dot embedding fitted on many action queries reproduces the
teacher on held-out ones; AirRep started from it scores episodes as the sum of their records; and an
index over every saved round of a run finds the teacher's top records.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from rlattr.core.methods import AirRep, DistilledEmbedding, GradDot, Unlearning, recall_at_k
from rlattr.core.methods.distill import gradient_features
from rlattr.core.task import Task
from rlattr.errors import RlattrError
from rlattr.rl.attribution import RoundScores, RoundSpec, build_round_task, score_round
from rlattr.rl.ppo import PPOLossConfig, ppo_record_loss
from rlattr.rl.run_index import run_batch
from rlattr.rl.snapshots import SnapshotWriter, load_run
from rlattr.rl.targets import ActionTarget, ReturnTarget
from tests.rl.test_rl_attribution import make_eval, make_round

CFG = PPOLossConfig(advantage_norm="buffer")


def _action_queries(n: int, seed: int) -> dict[str, torch.Tensor]:
    """n random states, each with all 4 actions: 4 n queries ``log pi(a|s)``."""
    obs = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return {"observations": obs.repeat_interleave(4, 0), "actions": torch.arange(4).repeat(n).unsqueeze(1)}


def _action_task(model, rec) -> tuple[Task, dict]:
    q = _action_queries(1, 99)
    spec = RoundSpec(model, make_eval(model), rec, ActionTarget(q["observations"], q["actions"], "none"), CFG)
    task, train, _ = build_round_task(spec)
    return task, train


def test_unlearning_scores_a_round_like_its_gradient_score_to_first_order() -> None:
    model, rec = make_round(n=12)
    spec = RoundSpec(model, make_eval(model), rec, ReturnTarget(), CFG)
    task, train, target = build_round_task(spec)
    lr = 1e-6
    got = Unlearning(task, lr=lr, max_step=None, normalize="none").cache(train).attribute(target)[0] / lr
    ref = score_round(spec).scores.double()  # g_target . g_i, signed "helps"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_distilled_and_airrep_score_a_round_and_its_episodes() -> None:
    model, rec = make_round(n=12)
    task, train = _action_task(model, rec)
    teacher = GradDot(task)
    student = DistilledEmbedding(
        teacher,
        gradient_features(task),
        query_features=gradient_features(task, query=True),
        dim=12,
        solver="ridge",
        ridge=1e-12,
    )
    student.cache(train).fit(_action_queries(40, 1))  # 160 queries > the 39 parameters
    held_out = _action_queries(10, 2)
    truth = teacher.attribute(held_out)
    torch.testing.assert_close(
        student.attribute(held_out), truth, rtol=1e-5, atol=1e-7 * float(truth.abs().max())
    )
    assert recall_at_k(student.attribute(held_out), truth, 3) == 1.0
    qf = gradient_features(task, query=True)
    air = AirRep(task, gradient_features(task), query_features=qf, steps=0, init=student).cache(train)
    air.fit(held_out, torch.ones(1, 12, dtype=torch.bool), torch.zeros(1, 40))
    episodes = torch.zeros(3, 12, dtype=torch.bool)  # three 4-step episodes
    for e in range(3):
        episodes[e, 4 * e : 4 * e + 4] = True
    by_episode = truth @ episodes.double().T  # the additive group score from the teacher
    got = air.group_scores(held_out, episodes)
    torch.testing.assert_close(got, by_episode, rtol=1e-5, atol=1e-7 * float(by_episode.abs().max()))


def _write_run(root: Path, rounds: int) -> None:
    model, _ = make_round(n=8, seed=0)
    writer = SnapshotWriter(root, {"snapshot_format": 1, "target": {"name": "return"}})
    for k in range(rounds):
        _, rec = make_round(n=8, seed=10 + k)
        rec = dataclasses.replace(rec, returns=rec.returns.clone())  # the fixture shares them
        rec.ids[:, 0] = k
        scores = RoundScores(scores=torch.zeros(8), ids=rec.ids, seconds=0.0, target={"name": "return"})
        theta = {name: p.detach() for name, p in model.named_parameters()}
        writer.write_round(rec, scores, theta, {"round": k})


def test_a_run_index_covers_every_saved_round_and_finds_the_teachers_top_records(tmp_path: Path) -> None:
    _write_run(tmp_path, rounds=3)
    run = load_run(tmp_path)
    batch, ids = run_batch(run, CFG)
    assert ids.shape == (24, 3) and ids[:, 0].tolist() == [0] * 8 + [1] * 8 + [2] * 8
    for k in range(3):  # each round's advantages normalised within that round, as round_batch does
        a = run.records(k).advantages
        torch.testing.assert_close(
            batch["norm_advantages"][8 * k : 8 * k + 8], (a - a.mean()) / (a.std() + 1e-8)
        )
    model, _ = make_round(n=8, seed=0)
    model.load_state_dict({k: v for k, v in run.theta(2).items()}, strict=False)
    q = _action_queries(1, 99)
    target = ActionTarget(q["observations"], q["actions"], "none").build(make_eval(model), run.records(2))[0]
    task = Task(model, ppo_record_loss(make_eval(model), CFG), target=target)
    teacher = GradDot(task)
    index = DistilledEmbedding(
        teacher,
        gradient_features(task),
        query_features=gradient_features(task, query=True),
        dim=24,
        solver="ridge",
        ridge=1e-12,
    )
    index.cache(batch).fit(_action_queries(40, 1))
    held_out = _action_queries(10, 2)
    values, top = index.search(held_out, 5)
    assert index._index().shape[0] == 24
    assert recall_at_k(index.attribute(held_out), teacher.attribute(held_out), 5) == 1.0
    torch.testing.assert_close(top, teacher.attribute(held_out).topk(5, dim=1).indices)


def test_run_batch_refuses_minibatch_normalisation(tmp_path: Path) -> None:
    _write_run(tmp_path, rounds=1)
    with pytest.raises(RlattrError, match="config: got advantage_norm='minibatch'"):
        run_batch(load_run(tmp_path), PPOLossConfig(advantage_norm="minibatch"))
