"""SnapshotWriter and load_run on a bad day: torn index lines, stray folders, wrong JSON, retention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlattr.errors import MissingError, StoreError
from rlattr.rl.attribution import RoundScores
from rlattr.rl.records import RecordBatch
from rlattr.rl.snapshots import SnapshotWriter, dir_bytes, load_run


def _round(k: int, n: int = 6) -> tuple[RecordBatch, RoundScores]:
    g = torch.Generator().manual_seed(k)
    ids = torch.stack([torch.full((n,), k), torch.arange(n), torch.zeros(n, dtype=torch.long)], 1)
    vec = [torch.randn(n, generator=g) for _ in range(6)]
    records = RecordBatch(
        observations=torch.randn(n, 3, generator=g),
        actions=torch.randint(0, 2, (n, 1), generator=g),
        old_log_prob=vec[0],
        values=vec[1],
        rewards=vec[2],
        returns=vec[3],
        advantages=vec[4],
        episode_starts=torch.zeros(n),
        ids=ids,
    )
    return records, RoundScores(scores=vec[5], ids=ids, seconds=0.5, target={"name": "return"})


def _write(root: Path, n_rounds: int, **kwargs) -> SnapshotWriter:
    writer = SnapshotWriter(root, {"snapshot_format": 1, "target": {"name": "return"}}, **kwargs)
    for k in range(n_rounds):
        records, scores = _round(k)
        theta = {"w": torch.full((4,), float(k))}
        writer.write_round(records, scores, theta, {"round": k, "score_mean": float(scores.scores.mean())})
    return writer


def test_round_index_is_append_only_and_survives_a_torn_last_line(tmp_path: Path) -> None:
    _write(tmp_path, 3)
    index = tmp_path / "rounds.jsonl"
    lines = index.read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2]
    with index.open("a") as fh:  # a kill in the middle of the 4th append
        fh.write('{"round": 3, "score_me')
    with pytest.warns(UserWarning, match="rounds.jsonl: skipped 1 unreadable line"):
        run = load_run(tmp_path)
    assert [s["round"] for s in run.summaries] == [0, 1, 2]
    assert run.rounds == [0, 1, 2]


def test_disk_accounting_is_incremental_and_exact(tmp_path: Path, monkeypatch) -> None:
    calls: list[Path] = []
    import rlattr.rl.snapshots as snapshots

    real = snapshots.dir_bytes

    def counted(path: Path) -> int:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(snapshots, "dir_bytes", counted)
    writer = _write(tmp_path, 5, keep_last=2)
    assert len(calls) <= 1  # one walk when the writer starts, none per round
    assert writer.disk_bytes == real(tmp_path)  # an independent walk of the folder


def test_retention_covers_score_files_and_round_folders(tmp_path: Path) -> None:
    (tmp_path / "iif").mkdir(parents=True)
    (tmp_path / "iif" / "round_00000.json").write_text("{}")  # written by an earlier part of the run
    writer = _write(tmp_path, 6, keep_last=1, keep_rounds=3)
    writer.write_json("iif/round_00005.json", {"round": 5}, round_index=5)
    assert sorted(p.name for p in (tmp_path / "iif").iterdir()) == ["round_00005.json"]
    assert sorted(p.name for p in tmp_path.glob("round_*")) == ["round_00003", "round_00004", "round_00005"]
    run = load_run(tmp_path)
    assert run.rounds == [3, 4, 5]
    assert [s["round"] for s in run.summaries] == list(range(6))  # the summaries stay
    assert [k for k in run.rounds if run.has_snapshot(k)] == [5]
    with pytest.raises(MissingError, match="was not scored|pruned"):
        run.scores(0)
    assert writer.disk_bytes == dir_bytes(tmp_path)


def test_stray_folders_are_skipped_with_a_warning(tmp_path: Path) -> None:
    _write(tmp_path, 2)
    for name in ("round_00001.bak", "round_abc", "round_"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "scores.safetensors").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="not round folders"):
        run = load_run(tmp_path)
    assert run.rounds == [0, 1]


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("run.json", "[]", "run.json: expected a JSON object, got list"),
        ("run.json", '{"snapshot_format": "1"}', "snapshot format '1'"),
    ],
)
def test_wrong_json_types_in_run_json_are_named(tmp_path: Path, name: str, text: str, match: str) -> None:
    _write(tmp_path, 1)
    (tmp_path / name).write_text(text)
    with pytest.raises(StoreError, match=match):
        load_run(tmp_path)


@pytest.mark.parametrize("text", ["{}", '[1, "x"]', "not json"])
def test_a_bad_legacy_rounds_json_is_skipped(tmp_path: Path, text: str) -> None:
    _write(tmp_path, 2)
    (tmp_path / "rounds.jsonl").unlink()
    (tmp_path / "rounds.json").write_text(text)
    with pytest.warns(UserWarning, match="rounds.json"):
        run = load_run(tmp_path)
    assert run.rounds == [0, 1] and run.summaries == []


def test_a_legacy_rounds_json_still_reads(tmp_path: Path) -> None:
    _write(tmp_path, 2)
    (tmp_path / "rounds.jsonl").unlink()
    (tmp_path / "rounds.json").write_text(json.dumps([{"round": 0}, {"round": 1}]))
    assert [s["round"] for s in load_run(tmp_path).summaries] == [0, 1]


def test_resume_appends_to_the_same_run(tmp_path: Path) -> None:
    _write(tmp_path, 2)
    with (tmp_path / "rounds.jsonl").open("a") as fh:
        fh.write('{"round": 2, "sc')  # killed mid-append
    writer = SnapshotWriter(tmp_path, {}, resume=True)
    assert writer.next_round == 2
    records, scores = _round(2)
    with pytest.warns(UserWarning, match="unreadable line"):
        writer.write_round(records, scores, {"w": torch.zeros(4)}, {"round": 2})
        run = load_run(tmp_path)
    assert run.rounds == [0, 1, 2] and [s["round"] for s in run.summaries] == [0, 1, 2]
    assert writer.disk_bytes == dir_bytes(tmp_path)


def test_discard_from_forgets_the_rounds_after_a_checkpoint(tmp_path: Path) -> None:
    _write(tmp_path, 4)
    writer = SnapshotWriter(tmp_path, {}, resume=True)
    writer.discard_from(2)
    assert writer.next_round == 2 and writer.disk_bytes == dir_bytes(tmp_path)
    run = load_run(tmp_path)
    assert run.rounds == [0, 1] and [s["round"] for s in run.summaries] == [0, 1]


def test_run_json_sections_of_the_wrong_type_are_dropped_with_a_warning(tmp_path: Path) -> None:
    _write(tmp_path, 1)
    (tmp_path / "run.json").write_text(json.dumps({"snapshot_format": 1, "target": "x", "callback": [1]}))
    with pytest.warns(UserWarning, match="run.json: 'target' ignored"):
        run = load_run(tmp_path)
    assert run.meta["target"] == {} and run.meta["callback"] == {}
