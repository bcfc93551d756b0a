"""TensorBoard logging of a round's attribution, under ``attr/`` tags, beside SB3's own tags.

Tags: ``attr/score_hist`` (histogram), the scalars of
:func:`rlattr.reporting.summary.score_summary` (``attr/score_mean``, ``attr/positive_fraction``, ...),
``attr/seconds``, ``attr/disk_mb``, ``attr/top_bottom`` (text table), with
``by_group`` ``attr/layer_share/{layer}`` (each layer's share of sum |score parts|), and every N
rounds ``attr/score_vs_advantage`` (image). The x-axis is the global timestep, as in SB3.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from rlattr.reporting.summary import SUMMARY_KEYS, markdown_table, top_bottom
from rlattr.rl.attribution import RoundScores
from rlattr.rl.records import RecordBatch, format_id, index_observations


def state_summary(obs: Tensor | dict[str, Tensor], max_values: int = 4) -> str:
    """A short printable summary of one observation ``Tensor[*obs_shape]`` (or a dict of them)."""
    if isinstance(obs, dict):
        return "; ".join(f"{k}: {state_summary(v, max_values)}" for k, v in obs.items())
    flat = obs.reshape(-1).float()
    if obs.dim() > 1 or flat.numel() > 8:
        return f"shape {tuple(obs.shape)} mean {float(flat.mean()):.3g}"
    vals = ", ".join(f"{float(v):.3g}" for v in flat[:max_values])
    return f"[{vals}{', ...' if flat.numel() > max_values else ''}]"


def top_bottom_table(records: RecordBatch, scores: Tensor, k: int) -> str:
    """Markdown table of the ``k`` highest and ``k`` lowest scored records of ``scores: Tensor[n]``."""
    return markdown_table(RECORD_HEADER, record_rows(records, scores, k))


def record_rows(
    records: RecordBatch | None, scores: Tensor, k: int, advantages: Tensor | None = None
) -> list[list[str]]:
    """Rows ``[rank, id, state, action, advantage, score]`` of the top and bottom ``k`` records.

    ``records`` may be None (pruned by retention): state and action then read "(pruned)" and the
    ids and advantages come from ``ids`` / ``advantages`` of the scores file via ``advantages``.
    """
    rows = []
    for end, rank, j in top_bottom(scores, k):
        state = action = "(pruned)"
        if records is not None:
            state = state_summary(index_observations(records.observations, j))
            action = ", ".join(f"{float(a):.3g}" for a in records.actions[j].reshape(-1)[:4])
        adv = advantages if advantages is not None else records.advantages  # type: ignore[union-attr]
        rid = format_id(records.ids[j]) if records is not None else ""
        rows.append([f"{end} {rank}", rid, state, action, f"{float(adv[j]):.3g}", f"{float(scores[j]):.4g}"])
    return rows


RECORD_HEADER = ("rank", "id", "state", "action", "advantage", "score")


class AttrWriter:
    """A SummaryWriter in the run folder (its own event file; TensorBoard merges the folder)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.writer = SummaryWriter(log_dir=str(run_dir), filename_suffix=".rlattr")

    def log_round(
        self,
        step: int,
        records: RecordBatch,
        scores: RoundScores,
        summary: dict[str, Any],
        top_k: int,
        *,
        image: bool,
    ) -> None:
        """Log one round; ``summary`` holds :func:`~rlattr.reporting.summary.score_summary`'s keys, seconds
        (and disk_bytes)."""
        s = scores.scores if scores.scores.dim() == 1 else scores.scores.mean(0)
        w = self.writer
        w.add_histogram("attr/score_hist", s.float().numpy(), step)
        for key in (*SUMMARY_KEYS, "seconds"):
            value = summary.get(key)
            if value is not None and math.isfinite(value):
                w.add_scalar(f"attr/{key}", value, step)
        if "disk_bytes" in summary:
            w.add_scalar("attr/disk_mb", summary["disk_bytes"] / 2**20, step)
        w.add_text("attr/top_bottom", top_bottom_table(records, s, top_k), step)
        if scores.by_group is not None and scores.by_group.dim() == 2:
            # share of each layer in the scores' total magnitude: where the attribution comes from
            mag = scores.by_group.abs().sum(0)
            for name, value in zip(
                scores.group_names, (mag / mag.sum().clamp_min(1e-30)).tolist(), strict=True
            ):
                w.add_scalar(f"attr/layer_share/{name}", value, step)
        if image:
            from rlattr.reporting.plots import score_vs_advantage

            title = f"round {records.round_index}"
            w.add_figure("attr/score_vs_advantage", score_vs_advantage(s, records.advantages, title), step)
        w.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
