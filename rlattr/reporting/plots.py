"""Matplotlib figures (Agg backend, no display needed) shared by TensorBoard and the HTML report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402


def score_vs_advantage(scores: Tensor, advantages: Tensor, title: str = "") -> Figure:
    """Scatter of ``scores: Tensor[n]`` against raw ``advantages: Tensor[n]``."""
    fig, ax = plt.subplots(figsize=(5, 4), dpi=90)
    ax.scatter(advantages.float().numpy(), scores.float().numpy(), s=4, alpha=0.5)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("advantage (raw GAE)")
    ax.set_ylabel("influence score")
    ax.set_title(title or "score vs advantage")
    fig.tight_layout()
    return fig


def score_distributions(rounds: Sequence[int], scores: Sequence[Tensor], max_boxes: int = 30) -> Figure:
    """Box plots of the score distribution of each round (at most ``max_boxes``, evenly spaced)."""
    idx = np.unique(np.linspace(0, len(rounds) - 1, min(max_boxes, len(rounds))).round().astype(int))
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(idx) + 2), 4), dpi=90)
    ax.boxplot([scores[i].float().numpy() for i in idx], showfliers=False)
    ax.set_xticks(range(1, len(idx) + 1), [str(rounds[i]) for i in idx], rotation=60, fontsize=7)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("influence score")
    ax.set_title("score distribution per round")
    fig.tight_layout()
    return fig


def summary_curves(rounds: Sequence[int], series: Mapping[str, Sequence[float]]) -> Figure:
    """One panel per named series over rounds (e.g. positive fraction, seconds)."""
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), dpi=90, squeeze=False)
    for ax, (name, values) in zip(axes[0], series.items(), strict=True):
        ax.plot(list(rounds), list(values), marker=".", lw=1)
        ax.set_xlabel("round")
        ax.set_title(name)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: str) -> None:
    fig.savefig(path)
    plt.close(fig)
