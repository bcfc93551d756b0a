"""Issue 16: learned parameter-group weights on a model with tens of groups (a small CNN on digits).

``rlattr.testing.supervised.make_cnn``: ``--conv`` 3x3 convolutions (default 4) and two Linear
layers, 2 conv + 4 groups (12 by default) (each weight and bias its own, ``groups="tensor"``), trained like the MLP of
``tda_benchmark.py`` (mean cross-entropy + (l2/2)||theta||^2, ``--steps`` full-batch Adam steps,
lr 1e-2, fixed initialisation), in float32 (half the retraining time of float64 on a loaded machine). LDS ground truth: ``--subsets`` random halves of the
``--n-train`` records, retrained the same way (cached under ``--out``); queries are the first
``--n-queries`` test images, and the weights are fitted label-free on the next ``--n-queries``.
Base methods Grad-Dot, TracIn (10 checkpoints of the training run) and TRAK-1 (margin gradients,
k = 256); for each, the LDS of the base, of LW(base) and of every group's contribution alone.

    nice -n 19 python experiments/bench_learned_weights_cnn.py   # writes docs/results/lw_cnn.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import Tensor, nn

from rlattr.core.methods import TRAK, Attributor, GradDot, LearnedWeights, TracIn
from rlattr.core.store import save_json
from rlattr.eval.groundtruth import subset_masks, subset_retraining
from rlattr.eval.metrics import lds
from rlattr.provenance import provenance
from rlattr.testing.supervised import (
    classification_task,
    load_digits_split,
    make_cnn,
    margin_weight,
    per_record_ce,
    per_record_margin,
)


def train(
    x: Tensor, y: Tensor, weights: Tensor, a: argparse.Namespace, every: int = 0
) -> tuple[nn.Module, list]:
    """Full-batch Adam on the weighted objective; checkpoints every ``every`` steps (0: none)."""
    model = make_cnn(conv=a.conv, seed=0)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    ckpts = []
    for step in range(1, a.steps + 1):
        opt.zero_grad()
        ce = nn.functional.cross_entropy(model(x), y, reduction="none")
        ((weights * ce).sum() / weights.sum() + 0.5 * a.l2 * sum(p.pow(2).sum() for p in params)).backward()
        opt.step()
        if every and step % every == 0:
            ckpts.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return model, ckpts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-queries", type=int, default=40)
    p.add_argument("--subsets", type=int, default=30)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--l2", type=float, default=1e-3)
    p.add_argument("--conv", type=int, default=4)
    p.add_argument("--out", default="runs/lw_cnn")
    p.add_argument("--json", default="docs/results/lw_cnn.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    data = load_digits_split(a.n_train, seed=0, dtype=torch.float32)
    xs, ys = data.x_train, data.y_train
    queries = {"x": data.x_test[: a.n_queries], "y": data.y_test[: a.n_queries]}
    fit_queries = {
        "x": data.x_test[a.n_queries : 2 * a.n_queries],
        "y": data.y_test[a.n_queries : 2 * a.n_queries],
    }
    model, ckpts = train(xs, ys, torch.ones(a.n_train), a, every=a.steps // 10)
    task = classification_task(model, groups="tensor")
    query_loss = per_record_ce(model)

    def retrain(weights: Tensor, seed: int) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in train(xs, ys, weights.float(), a)[0].named_parameters()}

    def evaluate(params: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            return query_loss(params, queries)

    masks = subset_masks(a.n_train, a.subsets, 0.5, seed=0)
    t0 = time.perf_counter()
    targets = -subset_retraining(retrain, evaluate, masks, out_dir=f"{a.out}/lds", processes=2,
                                 config={"n_train": a.n_train, "steps": a.steps, "l2": a.l2, "conv": a.conv})  # fmt: skip
    print(f"ground truth {time.perf_counter() - t0:.0f} s", flush=True)
    train_batch = {"x": xs, "y": ys}
    bases: dict[str, Attributor] = {
        "Grad-Dot": GradDot(task),
        "TracIn": TracIn(task, ckpts, [1e-2] * len(ckpts)),
        "TRAK-1": TRAK(task, [task.tracked_params()], proj_dim=256, damping=0.1,
                       output=per_record_margin(model), output_weight=margin_weight(model)),
    }  # fmt: skip
    rows: dict[str, Any] = {}
    for name, base in bases.items():
        base.cache(train_batch)
        contrib = base.attribute_by_group(queries).detach().double()
        lw = LearnedWeights(base).cache(train_batch).fit(fit_queries)
        rows[name] = {
            "lds": float(lds(contrib.sum(-1), masks, targets)),
            "lds_learned_weights": float(lds(lw.attribute(queries).detach().double(), masks, targets)),
            "weights": lw.group_weights,
            "group_lds": {
                g: float(lds(contrib[..., j], masks, targets)) for j, g in enumerate(task.group_names)
            },
        }
        print(name, {k: v for k, v in rows[name].items() if k.startswith("lds")}, flush=True)
    save_json(a.json, {"config": vars(a), "provenance": provenance(), "results": rows,
                       "n_params": task.num_params, "groups": task.group_names})  # fmt: skip


if __name__ == "__main__":
    main()
