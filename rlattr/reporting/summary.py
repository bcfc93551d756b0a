"""One summary of a round's (or a generation batch's) scores, and one top/bottom table, for SB3 and TRL.

The names are the ``attr/*`` tags both adapters log (without the prefix): ``score_mean``,
``score_std``, ``positive_fraction``, ``kept_fraction``, ``n_dropped``, ``score_adv_corr``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import torch
from torch import Tensor

SUMMARY_KEYS = (
    "score_mean",
    "score_std",
    "positive_fraction",
    "kept_fraction",
    "n_dropped",
    "score_adv_corr",
)
# rounds.json written before the names were unified used these; readers accept both
LEGACY_KEYS = {"score_mean": "mean", "score_std": "std"}


def score_summary(
    scores: Tensor, advantages: Tensor | None = None, kept: Tensor | None = None
) -> dict[str, float]:
    """Scalar summaries of ``scores: Tensor[n]`` (``advantages: Tensor[n]``, ``kept: bool Tensor[n]``).

    ``score_adv_corr`` is the Pearson correlation of scores and advantages (NaN when either is
    constant); ``kept_fraction`` and ``n_dropped`` are 1 and 0 when ``kept`` is None.
    """
    s = scores.detach().double().reshape(-1)
    out = {
        "score_mean": float(s.mean()),
        "score_std": float(s.std()) if s.numel() > 1 else 0.0,
        "positive_fraction": float((s > 0).double().mean()),
        "kept_fraction": 1.0 if kept is None else float(kept.double().mean()),
        "n_dropped": 0.0 if kept is None else float((~kept.bool()).sum()),
    }
    corr = float("nan")
    if advantages is not None:
        adv = advantages.detach().double().reshape(-1)
        if s.numel() > 1 and float(s.std()) > 0 and float(adv.std()) > 0:
            corr = float(torch.corrcoef(torch.stack([s, adv]))[0, 1])
    out["score_adv_corr"] = corr
    return out


def summary_value(summary: dict[str, float], key: str) -> float | None:
    """``summary[key]``, falling back to the name an older rlattr stored it under."""
    if key in summary:
        return summary[key]
    legacy = LEGACY_KEYS.get(key)
    return summary.get(legacy) if legacy is not None else None


def top_bottom(scores: Tensor, k: int) -> list[tuple[str, int, int]]:
    """The ``k`` highest then the ``k`` lowest of ``scores: Tensor[n]`` as ``(end, rank, position)``.

    ``end`` is "top" or "bottom", ``rank`` counts from 1 at each end; ties keep the original order.
    A position is listed once even when ``2k > n``.
    """
    order = torch.argsort(scores.detach().reshape(-1), descending=True, stable=True)
    k = max(0, min(k, order.numel()))
    picks = [("top", i + 1, int(j)) for i, j in enumerate(order[:k])]
    seen = {p for _, _, p in picks}
    bottom = [int(j) for j in order.flip(0)[:k]]
    picks += [("bottom", i + 1, j) for i, j in enumerate(bottom) if j not in seen]
    return picks


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (TensorBoard text); ``|`` and newlines in cells are escaped."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table; every cell is escaped (run folders may come from someone else)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


__all__ = [
    "LEGACY_KEYS",
    "SUMMARY_KEYS",
    "html_table",
    "markdown_table",
    "score_summary",
    "summary_value",
    "top_bottom",
]
