"""Sharded featurisation and block-wise scoring against the single-process cache / attribute, bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rlattr.core.methods.influence import InfluenceFunction
from rlattr.core.methods.representation import AirRep
from rlattr.core.methods.rif import NewtonStep, RescaledInfluence
from rlattr.core.methods.similarity import GradCos, GradDot
from rlattr.core.methods.tracin import TracIn
from rlattr.core.methods.trak import TRAK
from rlattr.core.projection import RandomProjection
from rlattr.core.store import load_tensors
from rlattr.errors import RlattrError
from rlattr.scale import (
    RayExecutor,
    attribute_blocks,
    attribute_grid,
    curvature_chunk,
    shard_bounds,
    sharded_cache,
    sharded_features,
)
from rlattr.testing.supervised import (
    ce_of_logits,
    classification_task,
    load_digits_split,
    make_model,
    margin_weight,
    per_record_logits,
    per_record_margin,
    train_classifier,
)

CHUNK = 16


@pytest.fixture(scope="module")
def digits():
    data = load_digits_split(n_train=150, seed=0)
    model = make_model("mlp", hidden=8, seed=0)
    train_classifier(model, data.x_train, data.y_train, steps=30)
    return model, data.train_batch(), {"x": data.x_test[:40], "y": data.y_test[:40]}


def _attributors(model):
    task = classification_task(model)
    params = task.tracked_params()
    later = {k: v + 0.01 for k, v in params.items()}
    proj = RandomProjection(task.num_params, 32, seed=3)
    return {
        "graddot": lambda: GradDot(task, projector=proj, chunk_size=CHUNK),
        "gradcos": lambda: GradCos(task, chunk_size=CHUNK),
        "tracin": lambda: TracIn(task, [params, later], [0.5, 0.25], projector=proj, chunk_size=CHUNK),
        "trak": lambda: TRAK(
            task,
            [params, later],
            proj_dim=24,
            output=per_record_margin(model),
            output_weight=margin_weight(model),
            chunk_size=CHUNK,
        ),
        "influence": lambda: InfluenceFunction(task, l2=1e-3, damping=0.5, chunk_size=CHUNK),
    }


@pytest.mark.parametrize("kind", ["graddot", "gradcos", "tracin", "trak", "influence"])
def test_sharded_cache_in_process_equals_cache(digits, kind: str) -> None:
    model, train, query = digits
    make = _attributors(model)[kind]
    expected = make().cache(train).attribute(query)
    got = sharded_cache(make(), train, shard_size=2 * CHUNK).attribute(query)
    assert torch.equal(got, expected)


def test_sharded_cache_on_ray_equals_cache_and_stores_ids(digits, ray_local, tmp_path: Path) -> None:
    model, train, query = digits
    for kind in ("tracin", "trak"):
        make = _attributors(model)[kind]
        expected = make().cache(train).attribute(query)
        executor = RayExecutor(workers=2)
        ids = torch.arange(150) * 7
        a = sharded_cache(
            make(), train, shard_size=3 * CHUNK, executor=executor, out_dir=tmp_path / kind, ids=ids
        )
        assert torch.equal(a.attribute(query), expected)
        assert executor.tasks == 4 and len(executor.peak_rss) >= 1
        stored = [load_tensors(tmp_path / kind / f"job_{j:05d}.safetensors")[0] for j in range(4)]
        assert torch.equal(torch.cat([s["ids"] for s in stored]), ids)
        assert [s["value"].shape[:2] for s in stored] == [(2, 48), (2, 48), (2, 48), (2, 6)]


def test_a_killed_featurisation_resumes_with_the_missing_shards_only(digits, tmp_path: Path) -> None:
    model, train, query = digits
    make = _attributors(model)["graddot"]
    expected = make().cache(train).attribute(query)
    a = make()
    checks: list[int] = []
    real = a.task.loss

    def dying(params, batch):  # the loss check of each shard's first chunk sees CHUNK rows; die in shard 3
        if batch["x"].shape[0] == CHUNK:
            checks.append(1)
            if len(checks) == 3:
                raise KeyboardInterrupt
        return real(params, batch)

    a.task.loss = dying
    with pytest.raises(KeyboardInterrupt):
        sharded_cache(a, train, shard_size=2 * CHUNK, out_dir=tmp_path)
    done = sorted(p.name for p in tmp_path.glob("job_*.safetensors"))
    assert done == ["job_00000.safetensors", "job_00001.safetensors"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("job_*.safetensors")}
    a.task.loss = real
    resumed = sharded_cache(make(), train, shard_size=2 * CHUNK, out_dir=tmp_path)
    assert torch.equal(resumed.attribute(query), expected)
    assert {p: tmp_path.joinpath(p).stat().st_mtime_ns for p in done} == mtimes  # not recomputed
    assert len(list(tmp_path.glob("job_*.safetensors"))) == 5


def test_attribute_blocks_equal_attribute_in_memory_and_streamed(digits, ray_local, tmp_path: Path) -> None:
    model, train, query = digits
    a = _attributors(model)["graddot"]().cache(train)
    expected = a.attribute(query)
    assert torch.equal(attribute_blocks(a, query, block_size=CHUNK), expected)
    out = tmp_path / "scores.npy"
    streamed = attribute_blocks(a, query, block_size=CHUNK, executor=RayExecutor(workers=2), out=out)
    assert torch.equal(streamed, expected)
    assert np.array_equal(np.load(out), expected.numpy()) and not list(tmp_path.glob("*.partial.npy"))


def test_bad_inputs_name_the_argument(digits, tmp_path: Path) -> None:
    model, train, query = digits
    make = _attributors(model)["graddot"]
    with pytest.raises(
        RlattrError, match=r"shard_size: got 20; supported: a multiple of the attributor's chunk_size \(16\)"
    ):
        sharded_cache(make(), train, shard_size=20)
    with pytest.raises(RlattrError, match=r"shard_size: expected an integer >= 1, got 0"):
        shard_bounds(10, 0)
    with pytest.raises(RlattrError, match=r"ids: got \(3,\); supported: a Tensor\[150\]"):
        sharded_cache(make(), train, shard_size=CHUNK, ids=torch.arange(3))
    air = AirRep.__new__(AirRep)
    with pytest.raises(
        RlattrError, match=r"attributor: got AirRep, which takes no precomputed features; supported: GradDot"
    ):
        sharded_cache(air, train, shard_size=CHUNK)
    with pytest.raises(RlattrError, match=r"out: got '.*scores.bin'; supported: a path ending in .npy"):
        attribute_blocks(make().cache(train), query, block_size=8, out=tmp_path / "scores.bin")
    with pytest.raises(RlattrError, match=r"workers: expected an integer >= 1, got 0"):
        RayExecutor(workers=0)
    with pytest.raises(RlattrError, match=r"cpus_per_task: got -1; supported: a number > 0"):
        RayExecutor(cpus_per_task=-1)
    with pytest.raises(RlattrError, match=r"queued: expected an integer >= 0, got -1"):
        RayExecutor(queued=-1)
    sharded_cache(make(), train, shard_size=CHUNK, out_dir=tmp_path / "a")
    with pytest.raises(RlattrError, match=r"out_dir: .* holds results of another configuration"):
        sharded_cache(make(), train, shard_size=2 * CHUNK, out_dir=tmp_path / "a")


def test_curvature_shards_on_ray_give_the_single_process_scores(digits, ray_local) -> None:
    """Curvature shards of one single-process chunk (256 records x 256 columns of the exact
    Hessian: all 150 records here) give the same scores; smaller shards and the Gauss-Newton matrix
    (which one process sums in one product over all records) differ by float32 rounding only."""
    model, train, query = digits
    task = classification_task(model)
    curv: dict[str, Any] = {"output": per_record_logits(model), "output_loss": ce_of_logits}
    makers = [
        lambda: InfluenceFunction(task, l2=1e-3, damping=0.5, chunk_size=CHUNK),
        lambda: RescaledInfluence(task, l2=1e-3, damping=0.1, chunk_size=CHUNK, **curv),
        lambda: NewtonStep(task, l2=1e-3, damping=0.1, hessian="gauss_newton", chunk_size=CHUNK, **curv),
    ]
    influence = InfluenceFunction(task, l2=1e-3, damping=0.5, chunk_size=CHUNK)
    assert curvature_chunk(influence.curvature_spec(train), influence.curvature_block) == 256
    ex = RayExecutor(workers=2)
    expected = makers[0]().cache(train).attribute(query)
    got = sharded_cache(influence, train, shard_size=2 * CHUNK, curvature_shard_size=256, executor=ex)
    assert torch.equal(got.attribute(query), expected)
    assert ex.tasks == 5 + 1  # 5 feature shards, 1 curvature shard
    for make in makers:
        expected = make().cache(train).attribute(query)
        got = sharded_cache(make(), train, shard_size=2 * CHUNK, curvature_shard_size=48, executor=ex)
        torch.testing.assert_close(got.attribute(query), expected, rtol=1e-4, atol=1e-5)


def test_tasks_write_their_own_shards_and_the_grid_scores_from_them(
    digits, ray_local, tmp_path: Path
) -> None:
    model, train, query = digits
    for kind in ("graddot", "tracin"):
        make = _attributors(model)[kind]
        expected = make().cache(train).attribute(query)
        ex = RayExecutor(workers=2)
        store = tmp_path / kind
        got = sharded_cache(
            make(), train, shard_size=3 * CHUNK, executor=ex, out_dir=store, store_in_task=True
        )
        assert torch.equal(got.attribute(query), expected)
        stored = [load_tensors(store / f"job_{j:05d}.safetensors")[0] for j in range(4)]
        assert torch.equal(torch.cat([t["ids"] for t in stored]), torch.arange(150))
        assert torch.equal(torch.cat([t["value"][0] for t in stored]), got._require_cache())
        mtimes = [p.stat().st_mtime_ns for p in sorted(store.glob("job_*.safetensors"))]
        again = sharded_features(make(), train, shard_size=3 * CHUNK, out_dir=store, store_in_task=True)
        assert torch.equal(again[0], got._require_cache())
        assert [p.stat().st_mtime_ns for p in sorted(store.glob("job_*.safetensors"))] == mtimes  # resumed
        grid = attribute_grid(make(), query, train, shards_dir=store, block_size=CHUNK, executor=ex)
        assert torch.equal(grid, expected)
        assert torch.equal(attribute_grid(make(), query, train, shards_dir=store, block_size=32), expected)
    with pytest.raises(RlattrError, match=r"attributor: got TRAK; supported: GradDot, GradCos, TracIn"):
        attribute_grid(
            _attributors(model)["trak"](), query, train, shards_dir=tmp_path / "graddot", block_size=8
        )
    with pytest.raises(RlattrError, match=r"shards_dir: holds GradDot features; supported: GradCos's"):
        attribute_grid(
            _attributors(model)["gradcos"](), query, train, shards_dir=tmp_path / "graddot", block_size=8
        )
