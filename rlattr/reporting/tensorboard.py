"""TensorBoard logging of a round's attribution, under ``attr/`` tags, beside SB3's own tags.

Tags: ``attr/score_hist`` (histogram), ``attr/positive_fraction``, ``attr/score_mean``,
``attr/score_std``, ``attr/seconds``, ``attr/disk_mb``, ``attr/top_bottom`` (text table), with
``by_group`` ``attr/layer_share/{layer}`` (each layer's share of sum |score parts|), and every N
rounds ``attr/score_vs_advantage`` (image). The x-axis is the global timestep, as in SB3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

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
    order = scores.argsort(descending=True)
    k = min(k, len(order))
    rows = ["| rank | id | state | action | advantage | score |", "|---|---|---|---|---|---|"]
    picks = [("top", i, int(j)) for i, j in enumerate(order[:k])]
    picks += [("bottom", i, int(j)) for i, j in enumerate(order.flip(0)[:k])]
    for side, i, j in picks:
        action = ", ".join(f"{float(a):.3g}" for a in records.actions[j].reshape(-1)[:4])
        rows.append(
            f"| {side} {i + 1} | {format_id(records.ids[j])} | {state_summary(index_observations(records.observations, j))} | "
            f"{action} | {float(records.advantages[j]):.3g} | {float(scores[j]):.4g} |"
        )
    return "\n".join(rows)


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
        """Log one round; ``summary`` holds mean, std, positive_fraction, seconds (and disk_bytes)."""
        s = scores.scores if scores.scores.dim() == 1 else scores.scores.mean(0)
        w = self.writer
        w.add_histogram("attr/score_hist", s.float().numpy(), step)
        w.add_scalar("attr/positive_fraction", summary["positive_fraction"], step)
        w.add_scalar("attr/score_mean", summary["mean"], step)
        w.add_scalar("attr/score_std", summary["std"], step)
        w.add_scalar("attr/seconds", summary["seconds"], step)
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
