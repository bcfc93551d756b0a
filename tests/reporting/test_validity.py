"""Validity figures: Markdown tables, plots and the report section from a validity document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlattr.reporting.validity import (
    check_validity,
    find_validity,
    intervention_table,
    plot_validity,
    validity_section,
    validity_table,
)


def document() -> dict:
    def lds(v: float) -> dict[str, float]:
        return {"lds": v, "lo": v - 0.1, "hi": v + 0.05}

    stage = {
        "env": "CartPole-v1",
        "stage": "early",
        "round": 1,
        "rollout_return": 22.5,
        "lds": {"buffer": {"grad_dot": lds(0.8), "tracin": lds(0.75)}, "validation": {"grad_dot": lds(0.4)}},
        "ceiling": {"buffer": 0.9, "validation": 0.5},
        "intervention": {
            "n_dropped": 300,
            "full": {"return": 20.0},
            "delta_bottom": {"return": 1.5, "buffer": 0.01, "validation": 0.002},
            "delta_random": {"return": -0.5, "buffer": -0.001, "validation": -0.0003},
        },
    }
    return {"format": 1, "kind": "rl_attribution_validity", "stages": [stage, {**stage, "stage": "late"}]}


def test_tables_show_the_numbers() -> None:
    table = validity_table(document(), "buffer").splitlines()
    assert table[0] == "| env | stage (round) | rollout return | grad_dot | tracin | ceiling |"
    assert table[2] == "| CartPole-v1 | early (1) | 22.5 | 0.80 [0.70, 0.85] | 0.75 [0.65, 0.80] | 0.90 |"
    assert "| 300 | 20.0 | +1.5 / -0.5 | +1.00e-02 / -1.00e-03 |" in intervention_table(document())
    with pytest.raises(ValueError, match="target: got 'nope'"):
        validity_table(document(), "nope")
    with pytest.raises(ValueError, match="results: expected a validity document"):
        check_validity({"stages": []})


def test_report_section_only_when_present(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "rlattr").mkdir(parents=True)
    assert find_validity(run) is None and validity_section(run, tmp_path / "report") == ""
    (run / "rlattr" / "validity.json").write_text(json.dumps(document()))
    assert find_validity(run / "rlattr") == run / "rlattr" / "validity.json"
    section = validity_section(run, tmp_path / "report")
    assert "validity_lds_buffer.png" in section and "0.80 [0.70, 0.85]" in section
    assert sorted(p.name for p in plot_validity(document(), tmp_path / "p")) == [
        "validity_lds_buffer.png",
        "validity_lds_validation.png",
    ]


@pytest.mark.parametrize("target", ["x'><img src=x onerror=alert(1)>", "../../escaped", "a/b"])
def test_a_hostile_target_name_writes_nothing_outside_and_is_shown_escaped(
    tmp_path: Path, target: str
) -> None:
    doc = document()
    for stage in doc["stages"]:
        stage["lds"] = {target: stage["lds"]["buffer"]}
        stage["ceiling"] = {target: 0.9}
    run = tmp_path / "a" / "b" / "run"
    (run / "rlattr").mkdir(parents=True)
    (run / "rlattr" / "validity.json").write_text(json.dumps(doc))
    out = tmp_path / "a" / "b" / "run" / "report"
    section = validity_section(run, out)
    assert "<img src=x" not in section and "onerror=alert(1)>" not in section
    assert "validity.json skipped" in section and "results: target name" in section
    written = {p for p in tmp_path.rglob("*.png")}
    assert all(out in p.parents for p in written), written
    with pytest.raises(ValueError, match="results: target name"):
        plot_validity(doc, out)


def test_a_malformed_document_is_named_not_raised(tmp_path: Path) -> None:
    (tmp_path / "validity.json").write_text(json.dumps({"kind": "rl_attribution_validity", "stages": [1]}))
    section = validity_section(tmp_path, tmp_path / "report")
    assert "validity.json skipped" in section
    (tmp_path / "validity.json").write_text("{not json")
    assert "validity.json skipped" in validity_section(tmp_path, tmp_path / "report")
