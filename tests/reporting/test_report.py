"""``rlattr report`` on received, damaged and odd runs: escaped, partial when it must be, one-line errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from rlattr.cli import main
from rlattr.errors import RlattrError
from rlattr.reporting.report import write_report
from rlattr.rl.snapshots import SnapshotWriter
from tests.rl.test_snapshots import _round

HOSTILE = "<script>alert(1)</script>"


def _run(root: Path, n_rounds: int = 3) -> Path:
    meta = {
        "snapshot_format": 1,
        "target": {"name": HOSTILE, HOSTILE: HOSTILE},
        "hyperparameters": {"algorithm": HOSTILE, "policy": "<b>", "n_steps": HOSTILE},
    }
    writer = SnapshotWriter(root / "rlattr", meta)
    for k in range(n_rounds):
        records, scores = _round(k)
        writer.write_round(records, scores, {"w": torch.zeros(2)}, {"round": k, "score_mean": 0.0})
    return root


def test_everything_a_received_run_says_is_escaped(tmp_path: Path) -> None:
    page = write_report(_run(tmp_path)).read_text()
    assert "<script>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_one_corrupt_scores_file_leaves_the_other_rounds_readable(tmp_path: Path) -> None:
    run = _run(tmp_path, 4)
    (run / "rlattr" / "round_00002" / "scores.safetensors").write_bytes(b"\x00" * 40)
    with pytest.warns(UserWarning, match="round 2"):
        page = write_report(run).read_text()
    assert "<h3>round 3</h3>" in page and "<h3>round 1</h3>" in page
    assert "unreadable rounds (skipped): 2" in page


def test_no_readable_round_is_one_clear_error(tmp_path: Path) -> None:
    run = _run(tmp_path, 1)
    (run / "rlattr" / "round_00000" / "scores.safetensors").write_bytes(b"junk")
    with pytest.raises(RlattrError, match="no readable scored round"), pytest.warns(UserWarning):
        write_report(run)
    empty = tmp_path / "empty"
    SnapshotWriter(empty / "rlattr", {"snapshot_format": 1})
    with pytest.raises(RlattrError, match="no scored round yet"):
        write_report(empty)


def test_an_unwritable_output_folder_is_one_clear_error(tmp_path: Path) -> None:
    run = _run(tmp_path, 1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RlattrError, match="out: cannot write the report"):
        write_report(run, tmp_path / "file" / "report")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"recent": 0}, "recent: expected an integer >= 1, got 0"),
        ({"top_k": -1}, "top_k: expected an integer"),
    ],
)
def test_report_arguments_are_checked(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(RlattrError, match=match):
        write_report(_run(tmp_path, 1), **kwargs)


@pytest.mark.parametrize("flag", [["--recent", "0"], ["--top-k", "-1"]])
def test_cli_report_rejects_bad_numbers_in_one_line(tmp_path: Path, capsys, flag: list[str]) -> None:
    with pytest.raises(SystemExit) as err:
        main(["report", str(_run(tmp_path, 1)), *flag])
    message = capsys.readouterr().err.strip()
    assert err.value.code == 2 and len(message.splitlines()) == 1 and "expected an integer >= 1" in message


@pytest.mark.parametrize(
    "meta",
    [
        {"hyperparameters": [], "target": "return", "callback": []},
        {"hyperparameters": {"n_steps": {"x": 1}}, "target": {"name": 5}, "callback": {"iif_rule": HOSTILE}},
        {"tracked_params": 3, "versions": HOSTILE},
    ],
)
def test_wrong_json_types_in_run_json_still_render(tmp_path: Path, meta: dict) -> None:
    writer = SnapshotWriter(tmp_path / "rlattr", {"snapshot_format": 1, **meta})
    records, scores = _round(0)
    writer.write_round(records, scores, {"w": torch.zeros(2)}, {"round": 0})
    writer.write_json("iif/round_00000.json", {"round": 0, "note": HOSTILE, "dropped_ids": [[0, 1, HOSTILE]]})
    (tmp_path / "rlattr" / "rounds.jsonl").write_text('{"round": 0, "score_mean": "<i>x</i>"}\n[1, 2]\n')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        page = write_report(tmp_path).read_text()
    assert "<script>" not in page and "<i>x</i>" not in page
