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


def summary_curves(
    rounds: Sequence[float],
    series: Mapping[str, Sequence[float]],
    ylabels: Mapping[str, str] | None = None,
    max_cols: int = 5,
) -> Figure:
    """One panel per named series over rounds (e.g. positive fraction, seconds), ``max_cols`` a row.

    Every panel has a y-label: ``ylabels[name]`` when given, else the series name.
    """
    n = len(series)
    cols = min(n, max_cols)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), dpi=90, squeeze=False)
    flat = list(axes.reshape(-1))
    for ax, (name, values) in zip(flat, series.items(), strict=False):
        ax.plot(list(rounds), list(values), marker=".", lw=1)
        ax.set_xlabel("round")
        ax.set_ylabel((ylabels or {}).get(name, name))
        ax.set_title(name, fontsize=10)
    for ax in flat[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def dropped_vs_kept(scores: Tensor, advantages: Tensor, kept: Tensor) -> Figure:
    """Histograms of ``scores: Tensor[n]`` and raw ``advantages: Tensor[n]``, dropped against kept
    (``kept: bool Tensor[n]``), as densities so that the smaller group stays visible."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), dpi=90)
    for ax, values, name in (
        (axes[0], scores, "influence score"),
        (axes[1], advantages, "advantage (raw GAE)"),
    ):
        v = values.float().numpy()
        edges = np.histogram_bin_edges(v, bins=40)
        for mask, label, color in ((kept, "kept", "tab:blue"), (~kept, "dropped", "tab:red")):
            m = mask.numpy()
            if m.any():
                ax.hist(
                    v[m], bins=edges, density=True, alpha=0.5, color=color, label=f"{label} ({int(m.sum())})"
                )
        ax.set_xlabel(name)
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    axes[0].set_title("scores: dropped vs kept")
    axes[1].set_title("advantages: dropped vs kept")
    fig.tight_layout()
    return fig


def save(fig: Figure, path: str) -> None:
    fig.savefig(path)
    plt.close(fig)
