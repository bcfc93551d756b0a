"""Ground-truth retrainings and whole-run scoring as Ray tasks, against the single-process path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from rlattr.errors import MissingError, RlattrError
from rlattr.eval.groundtruth import collect_jobs, leave_one_out, subset_masks, subset_retraining
from rlattr.rl.attribution import RoundScores, RoundSpec, score_round
from rlattr.rl.ppo import PolicyOutput, PPOLossConfig
from rlattr.rl.records import RecordBatch
from rlattr.rl.snapshots import SnapshotWriter, load_run
from rlattr.rl.targets import ReturnTarget
from rlattr.scale import RayExecutor, require_ray, same_scores, score_run
from rlattr.scale.shards import own_slice
from rlattr.testing.supervised import make_model, train_classifier

N = 40


def _problem():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 64, generator=g), torch.randint(0, 10, (N,), generator=g)
    xq, yq = torch.randn(5, 64, generator=g), torch.randint(0, 10, (5,), generator=g)

    def retrain(weights: torch.Tensor, seed: int) -> Any:
        model = make_model("mlp", hidden=6, seed=seed)
        return train_classifier(model, x, y, weights=weights, steps=15)

    def evaluate(model: Any) -> torch.Tensor:
        with torch.no_grad():
            return nn.functional.cross_entropy(model(xq), yq, reduction="none")

    return retrain, evaluate


def test_ground_truth_on_ray_equals_single_process(ray_local) -> None:
    retrain, evaluate = _problem()
    masks = subset_masks(N, 4, seed=1)
    expected = subset_retraining(retrain, evaluate, masks, seed=3)
    assert torch.equal(
        subset_retraining(retrain, evaluate, masks, seed=3, executor=RayExecutor(workers=2)), expected
    )
    loo = leave_one_out(retrain, evaluate, N, [0, 7, 9], executor=RayExecutor(workers=1))
    assert torch.equal(loo, leave_one_out(retrain, evaluate, N, [0, 7, 9]))


def test_payloads_reach_their_job_alone_in_process_forked_and_on_ray(ray_local) -> None:
    data = {"x": torch.arange(20.0).reshape(10, 2)}

    def job(j: int, part: dict[str, torch.Tensor]) -> torch.Tensor:
        # the shard arrives as its own storage: 2 records x 2 floats, not the 10 x 2 of the batch
        assert part["x"].untyped_storage().nbytes() == 2 * 2 * 4
        return part["x"].sum(0) * (j + 1)

    expected = [data["x"][2 * j : 2 * j + 2].sum(0) * (j + 1) for j in range(5)]

    def payload(j: int) -> dict[str, torch.Tensor]:
        return own_slice(data, 2 * j, 2 * j + 2)

    for kwargs in ({}, {"processes": 2}, {"executor": RayExecutor(workers=2)}):
        got = collect_jobs(job, 5, payload=payload, **kwargs)  # type: ignore[arg-type]
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), kwargs


def test_a_killed_ground_truth_run_on_ray_resumes_job_by_job(ray_local, tmp_path: Path) -> None:
    retrain, evaluate = _problem()
    masks = subset_masks(N, 5, seed=1)
    marks = tmp_path / "ran"
    marks.mkdir()

    def dying(weights: torch.Tensor, seed: int) -> Any:
        if seed == 3 + 3:  # subset 3 dies (the run is killed there)
            raise RuntimeError("killed")
        marks.joinpath(f"{seed - 3}").touch()
        return retrain(weights, seed)

    out = tmp_path / "gt"
    with pytest.raises(RuntimeError, match="killed"):
        one_at_a_time = RayExecutor(workers=1, queued=0)
        subset_retraining(dying, evaluate, masks, seed=3, out_dir=out, executor=one_at_a_time)
    stored = sorted(int(p.stem[4:]) for p in out.glob("job_*.safetensors"))
    assert stored == [0, 1, 2]  # one task at a time, none queued: the jobs before the failing one
    for p in marks.iterdir():
        p.unlink()

    def counting(weights: torch.Tensor, seed: int) -> Any:
        marks.joinpath(f"{seed - 3}").touch()
        return retrain(weights, seed)

    resumed = subset_retraining(
        counting, evaluate, masks, seed=3, out_dir=out, executor=RayExecutor(workers=2)
    )
    assert sorted(int(p.name) for p in marks.iterdir()) == [3, 4]  # finished jobs were skipped
    assert torch.equal(resumed, subset_retraining(retrain, evaluate, masks, seed=3))


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.body = nn.Linear(3, 5)
            self.head = nn.Linear(5, 4)


def _evaluate(model: Policy):  # (params, obs, actions) -> PolicyOutput of the tanh MLP policy
    def evaluate(params, obs, actions):
        h = torch.tanh(obs @ params["body.weight"].T + params["body.bias"])
        logits = h @ params["head.weight"].T + params["head.bias"]
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(1, actions.long().reshape(-1, 1)).squeeze(1)
        return PolicyOutput(logp, -(logp_all.exp() * logp_all).sum(-1), None)

    return evaluate


def build_spec(theta: dict[str, torch.Tensor], records: RecordBatch) -> RoundSpec:
    model = Policy()
    model.load_state_dict(theta)
    return RoundSpec(model, _evaluate(model), records, ReturnTarget(), PPOLossConfig())


def _write_run(root: Path, rounds: int, n: int = 24) -> None:
    writer = SnapshotWriter(root, {"snapshot_format": 1, "target": {"name": "return"}}, every=2)
    for k in range(rounds):
        g = torch.Generator().manual_seed(k)
        theta = {name: v.detach() + 0.1 * k for name, v in Policy().state_dict().items()}
        adv = torch.randn(n, 1, generator=g)
        records = RecordBatch.from_rollout(
            k,
            observations=torch.randn(n, 1, 3, generator=g),
            actions=torch.randint(0, 4, (n, 1, 1), generator=g),
            old_log_prob=torch.randn(n, 1, generator=g) - 1.5,
            values=torch.zeros(n, 1),
            rewards=torch.zeros(n, 1),
            returns=adv.clone(),
            advantages=adv,
            episode_starts=torch.zeros(n, 1),
        )
        scores = RoundScores(scores=torch.zeros(n), ids=records.ids, target={"name": "return"})
        writer.write_round(records, scores, theta, {"round": k})


def test_whole_run_on_ray_equals_scoring_round_by_round(ray_local, tmp_path: Path) -> None:
    _write_run(tmp_path, 5)
    local = score_run(tmp_path, build_spec)
    assert list(local) == [0, 2, 4]  # the rounds with a full snapshot (every=2)
    run = load_run(tmp_path)
    for k, got in local.items():  # the independent path: score_round on each round read back by hand
        assert torch.equal(got.scores, score_round(build_spec(run.theta(k), run.records(k))).scores)
    on_ray = score_run(tmp_path, build_spec, executor=RayExecutor(workers=2))
    assert same_scores(on_ray, local) and not same_scores(on_ray, {**local, 0: local[2]})
    with pytest.raises(MissingError, match=r"rounds: got \[1\] \(\[1\] without a full snapshot\)"):
        score_run(tmp_path, build_spec, rounds=[1])
    with pytest.raises(RlattrError, match="build_spec: got int"):
        score_run(tmp_path, 3)  # type: ignore[arg-type]


def test_require_ray_names_the_extra_when_ray_is_missing(monkeypatch) -> None:
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(
        RlattrError, match=r'ray: got no importable ray package .*pip install "rlattr\[ray\]"'
    ):
        require_ray()
