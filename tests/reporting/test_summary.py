"""The one score summary and top/bottom table, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from rlattr.reporting.summary import html_table, markdown_table, score_summary, summary_value, top_bottom


def test_score_summary_hand_computed() -> None:
    s = torch.tensor([1.0, -2.0, 3.0, 0.0])
    adv = torch.tensor([2.0, -4.0, 6.0, 0.0])  # adv = 2 s: correlation exactly 1
    keep = torch.tensor([True, False, True, True])
    out = score_summary(s, adv, keep)
    assert out["score_mean"] == pytest.approx(0.5)
    assert out["score_std"] == pytest.approx(math.sqrt((0.25 + 6.25 + 6.25 + 0.25) / 3))
    assert out["positive_fraction"] == pytest.approx(0.5)
    assert out["kept_fraction"] == pytest.approx(0.75) and out["n_dropped"] == 1.0
    assert out["score_adv_corr"] == pytest.approx(1.0)
    plain = score_summary(s)
    assert plain["kept_fraction"] == 1.0 and plain["n_dropped"] == 0.0 and math.isnan(plain["score_adv_corr"])


def test_summary_value_reads_legacy_names() -> None:
    assert summary_value({"mean": 2.0}, "score_mean") == 2.0
    assert summary_value({"score_mean": 3.0, "mean": 2.0}, "score_mean") == 3.0
    assert summary_value({}, "positive_fraction") is None


def test_top_bottom_order_and_no_repeats() -> None:
    s = torch.tensor([0.5, 3.0, -1.0, 2.0])
    assert top_bottom(s, 2) == [("top", 1, 1), ("top", 2, 3), ("bottom", 1, 2), ("bottom", 2, 0)]
    both = top_bottom(s, 3)  # 2k > n: each position once
    assert sorted(p for _, _, p in both) == [0, 1, 2, 3]


def test_tables_escape_cells() -> None:
    md = markdown_table(("a", "b"), [["x|y", "line\nbreak"]])
    assert md.splitlines()[2] == "| x\\|y | line break |"
    page = html_table(("h",), [["<img src=x onerror=alert(1)>"]])
    assert "<img" not in page and "&lt;img" in page
