"""Offline attribution demo on scikit-learn's digits: which training images helped or hurt a test image.

Trains a small MLP on 1000 digits, scores every training image against a few test images with
Grad-Dot (positive = training on it lowers the test image's loss), and writes a PNG grid and a
printed table of the most helpful and most harmful training images.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from rlattr.core.methods import GradDot
from rlattr.core.store import save_json
from rlattr.errors import RlattrError
from rlattr.testing.supervised import (
    accuracy,
    classification_task,
    load_digits_split,
    make_model,
    train_classifier,
)


def _pick_queries(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n: int) -> list[int]:
    """The first misclassified test image (if any), then the first test image of distinct classes."""
    with torch.no_grad():
        wrong = (model(x).argmax(1) != y).nonzero().flatten().tolist()
    picks = wrong[:1]
    for i in range(len(y)):
        if len(picks) >= n:
            break
        if int(y[i]) not in {int(y[j]) for j in picks}:
            picks.append(i)
    return picks


def _plot(path: Path, data, queries: list[int], scores: torch.Tensor, preds: torch.Tensor, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(queries), 2 * k + 1, figsize=(1.3 * (2 * k + 1), 1.6 * len(queries)))
    for r, q in enumerate(queries):
        order = torch.argsort(scores[r], descending=True)
        cells = [
            ("query", data.images_test[q], f"test y={int(data.y_test[q])}\npred {int(preds[q])}", "black")
        ]
        cells += [
            ("help", data.images_train[i], f"y={int(data.y_train[i])}\n{scores[r, i]:+.2f}", "green")
            for i in order[:k].tolist()
        ]
        cells += [
            ("harm", data.images_train[i], f"y={int(data.y_train[i])}\n{scores[r, i]:+.2f}", "red")
            for i in order[-k:].flip(0).tolist()
        ]
        for c, (_, img, title, colour) in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(img.numpy(), cmap="gray_r")
            ax.set_title(title, fontsize=7, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"digits MLP: query | {k} most helpful (green) | {k} most harmful (red), Grad-Dot", fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(data, row: torch.Tensor, ids: list[int]) -> str:
    return ", ".join(f"#{i} ({int(data.y_train[i])}, {row[i]:+.2f})" for i in ids)


def run(out_dir: str | Path = "demo_out/digits", n_queries: int = 3, top_k: int = 5, seed: int = 0) -> Path:
    """Train, attribute and write ``grid.png`` and ``scores.json`` under ``out_dir``; returns the PNG path."""
    if n_queries < 1 or top_k < 1:
        raise RlattrError(f"n_queries, top_k: must be >= 1, got {n_queries}, {top_k}")
    console = Console()
    t0 = time.perf_counter()
    data = load_digits_split(n_train=1000, seed=seed)
    model = make_model("mlp", seed=seed)
    train_classifier(model, data.x_train, data.y_train)
    console.print(
        f"trained a 64-64-10 MLP on 1000 digits: test accuracy {accuracy(model, data.x_test, data.y_test):.3f}"
    )
    with torch.no_grad():
        preds = model(data.x_test).argmax(1)
    queries = _pick_queries(model, data.x_test, data.y_test, n_queries)
    attributor = GradDot(classification_task(model)).cache(data.train_batch())
    scores = attributor.attribute({"x": data.x_test[queries], "y": data.y_test[queries]})
    out = Path(out_dir)
    png = out / "grid.png"
    _plot(png, data, queries, scores, preds, top_k)
    table = Table(title="Grad-Dot attribution (positive = training on the image lowers the query's loss)")
    for col in (
        "test image",
        "label / pred",
        "most helpful train (label, score)",
        "most harmful train (label, score)",
    ):
        table.add_column(col)
    summary = []
    for r, q in enumerate(queries):
        order = torch.argsort(scores[r], descending=True).tolist()
        helpful, harmful = order[:top_k], order[::-1][:top_k]
        table.add_row(
            f"#{q}",
            f"{int(data.y_test[q])} / {int(preds[q])}",
            _fmt(data, scores[r], helpful),
            _fmt(data, scores[r], harmful),
        )
        summary.append(
            {
                "test_index": q,
                "helpful": helpful,
                "harmful": harmful,
                "helpful_scores": scores[r, helpful].tolist(),
                "harmful_scores": scores[r, harmful].tolist(),
            }
        )
    console.print(table)
    save_json(out / "scores.json", {"seed": seed, "method": "GradDot", "queries": summary})
    console.print(f"picture: {png}   ({time.perf_counter() - t0:.1f} s)")
    return png
