"""RLHF runs on disk (rlattr.rl.pair_runs) and their report page (rlattr.reporting.rlhf), without TRL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlattr import load_run
from rlattr.errors import RunExistsError, StoreError
from rlattr.reporting.report import write_report
from rlattr.rl.pair_runs import (
    PairRun,
    PairRunWriter,
    batch_tensors,
    format_pair_id,
    pair_ids,
    pair_run_metadata,
)

EVIL = "<script>alert(1)</script>"


def _record(k: int, scores: list[float], keep: list[bool]) -> dict:
    n = len(scores)
    return {
        "round": k,
        "global_step": 2 * k,
        "scores": torch.tensor(scores),
        "keep": torch.tensor(keep),
        "advantages": torch.linspace(-1, 1, n),
        "group_size": 2,
        "target_reward": 0.5 + k,
        "seconds": 0.1,
        "seconds_target": 0.05,
        "note": f"note {EVIL}",
        "prompts": [f"p{i} {EVIL}" for i in range(n)],
        "completions": [[{"role": "assistant", "content": f"c{i}"}] if i == 0 else f"c{i}" for i in range(n)],
    }


def _write(root: Path, records: list[dict]) -> None:
    writer = PairRunWriter(root, pair_run_metadata(trainer="IIFGRPOTrainer", attribution={"drop": True}))
    for rec in records:
        tensors, meta = batch_tensors(rec)
        writer.write_batch(
            rec["round"], tensors, meta, {"score_mean": float(rec["scores"].mean()), "x": float("nan")}
        )


def test_pair_run_round_trips_and_load_run_dispatches(tmp_path: Path) -> None:
    recs = [
        _record(0, [0.5, -1.0, 2.0, 0.0], [True, False, True, True]),
        _record(1, [1.0, 3.0, -2.0, 1.5], [True] * 4),
    ]
    _write(tmp_path / "rlattr", recs)
    run = load_run(tmp_path)
    assert isinstance(run, PairRun) and run.rounds == [0, 1]
    b = run.batch(0)
    assert torch.equal(b.scores, recs[0]["scores"]) and torch.equal(b.keep, recs[0]["keep"])
    assert torch.equal(b.advantages, recs[0]["advantages"]) and b.global_step == 0 and b.target_reward == 0.5
    assert b.prompts[1] == f"p1 {EVIL}" and b.completions[1] == "c1"
    assert json.loads(b.completions[0]) == [{"role": "assistant", "content": "c0"}]  # chat messages as JSON
    # ids (round, group, member) with group size 2: position 3 is the second completion of group 1
    assert b.ids.tolist()[3] == [0, 1, 1] and format_pair_id(run.batch(1).ids[2]) == "b1/g1/c0"
    assert torch.equal(run.scores(1).scores, recs[1]["scores"])  # the SB3 reader's view works too
    assert [s["round"] for s in run.summaries] == [0, 1] and run.summaries[0]["x"] is None  # NaN -> null
    assert run.summaries[1]["score_mean"] == pytest.approx(0.875)
    with pytest.raises(RunExistsError, match="already holds an rlattr run"):
        PairRunWriter(tmp_path / "rlattr", pair_run_metadata())


def test_pair_ids_are_round_group_member() -> None:
    ids = pair_ids(7, 6, 3)
    assert ids.tolist() == [[7, g, c] for g in range(2) for c in range(3)]


def test_report_of_an_rlhf_run_escapes_every_text(tmp_path: Path) -> None:
    recs = [_record(k, [0.5, -1.0, 2.0, float(k)], [True, False, True, True]) for k in range(3)]
    _write(tmp_path / "rlattr", recs)
    index = write_report(tmp_path, tmp_path / "out", recent=2, top_k=1)
    page = index.read_text()
    assert EVIL not in page and "&lt;script&gt;" in page
    assert "generation batch 2" in page and "generation batch 0 " not in page  # recent=2 batches
    # top 1 of batch 2 is position 2 (score 2.0), bottom 1 is position 1 (-1.0, dropped)
    assert "b2/g1/c0" in page and "b2/g0/c1" in page and "dropped" in page
    for png in ("summary.png", "distributions.png", "score_vs_adv.png"):
        assert (tmp_path / "out" / png).stat().st_size > 0


def test_a_malformed_batch_is_named_and_skipped(tmp_path: Path) -> None:
    recs = [_record(k, [0.5, -1.0, 2.0, 1.0], [True] * 4) for k in range(2)]
    recs[1]["prompts"] = recs[1]["prompts"][:2]  # fewer texts than pairs
    _write(tmp_path / "rlattr", recs)
    with pytest.raises(StoreError, match="2 prompts for 4 pairs"):
        load_run(tmp_path).batch(1)  # type: ignore[attr-defined]
    with pytest.warns(UserWarning, match="round 1: skipped"):
        page = write_report(tmp_path, tmp_path / "out").read_text()
    assert "Unreadable generation batches (skipped): [1]" in page
