"""Issue 16: unlearning, distilled embeddings and AirRep-style scores on the digits MLP protocol.

The protocol of ``tda_benchmark.py`` (its ``Setting`` and ground truth) at a reduced size that fits a
few minutes on a loaded 2-core machine: ``--n-train`` records, ``--n-queries`` evaluation queries,
``--subsets`` LDS subsets and ``--n-loo`` LOO records. Baselines: Grad-Dot, TracIn, IF explicit. The
distilled embedding uses IF explicit as its teacher and AirRep is trained on ``--air-subsets``
*other* retrained subsets measured on ``--n-queries`` fit queries disjoint from the evaluation
queries. Both embed the features ``(p - e_y) (x) [h, 1]`` (h: the MLP's hidden layer), the exact
last-layer gradient of each record. For each method: one-off seconds (cache + fit), per-query
milliseconds after it, LOO and LDS.

    python experiments/bench_new_families.py     # writes docs/results/tda_new_families.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tda_benchmark import BenchConfig, Setting, ground_truth  # noqa: E402  (script beside this one)

from rlattr.core.methods import (  # noqa: E402
    AirRep,
    Attributor,
    DistilledEmbedding,
    GradDot,
    InfluenceFunction,
    TracIn,
    Unlearning,
    recall_at_k,
)
from rlattr.core.store import save_json  # noqa: E402
from rlattr.eval.groundtruth import subset_masks, subset_retraining  # noqa: E402
from rlattr.eval.metrics import lds, loo_correlation  # noqa: E402
from rlattr.provenance import provenance  # noqa: E402
from rlattr.testing.supervised import ce_of_logits  # noqa: E402


def features(model: nn.Module) -> Any:
    """``batch -> Tensor[n, 10 * 65]``: ``(softmax - onehot) (x) [hidden, 1]``."""
    assert isinstance(model, nn.Sequential)  # the MLP: Linear, Tanh, Linear

    def f(batch: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            h = model[1](model[0](batch["x"]))
            err = torch.softmax(model[2](h), 1) - nn.functional.one_hot(batch["y"], 10).to(h)
            hb = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
            return (err[:, :, None] * hb[:, None, :]).flatten(1)

    return f


def timed(build: Any, queries: dict[str, Tensor]) -> tuple[Attributor, Tensor, float, float]:
    t0 = time.perf_counter()
    attr = build()
    t1 = time.perf_counter()
    scores = attr.attribute(queries).detach().double()
    t2 = time.perf_counter()
    return attr, scores, t1 - t0, 1e3 * (t2 - t1) / len(queries["y"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-queries", type=int, default=50)
    p.add_argument("--n-loo", type=int, default=50)
    p.add_argument("--subsets", type=int, default=40)
    p.add_argument("--air-subsets", type=int, default=120)
    p.add_argument("--mlp-steps", type=int, default=300)
    p.add_argument("--out", default="runs/tda_new_families")
    p.add_argument("--json", default="docs/results/tda_new_families.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = BenchConfig(n_train=a.n_train, n_queries=a.n_queries, n_loo=a.n_loo, subsets=a.subsets,
                      mlp_steps=a.mlp_steps, models=["mlp"], out=a.out, doc="unused")  # fmt: skip
    s = Setting("mlp", cfg)
    gt = ground_truth(s)
    print(f"ground truth: {gt['seconds']}", flush=True)
    t0 = time.perf_counter()
    air_masks = subset_masks(cfg.n_train, a.air_subsets, 0.5, seed=1000)  # not the LDS subsets

    def fit_loss(params: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            return s.task.loss(params, s.fit_queries)

    air_effects = -subset_retraining(s.retrain, fit_loss, air_masks, seed=1000, out_dir=Path(a.out) / "air",
                                     config={"n_train": cfg.n_train, "steps": cfg.mlp_steps}, processes=2)  # fmt: skip
    t_labels = time.perf_counter() - t0
    ckpts = s.adam_checkpoints()
    feats = features(s.model)

    def teacher() -> InfluenceFunction:
        return InfluenceFunction(
            s.task, strategy="explicit", l2=cfg.l2, output=s.output, output_loss=ce_of_logits
        )

    table = {
        "Grad-Dot": lambda: GradDot(s.task).cache(s.train),
        "TracIn": lambda: TracIn(s.task, *ckpts).cache(s.train),
        "IF explicit": lambda: teacher().cache(s.train),
        "Unlearning (MUCS-style)": lambda: Unlearning(s.task, lr=0.05, max_step=0.5).cache(s.train),
        "Distilled (IF explicit)": lambda: DistilledEmbedding(teacher(), feats, dim=32, hidden=0, steps=800,
                                                              lr=1e-2, mse_weight=1.0).cache(s.train).fit(s.fit_queries),
        "AirRep-style": lambda: AirRep(s.task, feats, dim=32, hidden=0, steps=800, lr=1e-2).cache(s.train).fit(
            s.fit_queries, air_masks, air_effects),
    }  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    all_scores: dict[str, Tensor] = {}
    for name, build in table.items():
        _, scores, one_off, per_query = timed(build, s.queries)
        all_scores[name] = scores
        rows[name] = {
            "loo": float(loo_correlation(scores[:, gt["loo_idx"]], gt["loo"])),
            "lds": float(lds(scores, gt["masks"], gt["targets"])),
            "one_off_s": one_off,
            "per_query_ms": per_query,
        }
        print(name, {k: round(v, 4) for k, v in rows[name].items()}, flush=True)
    rows["AirRep-style"]["label_retraining_s"] = t_labels
    teacher_scores = all_scores["IF explicit"]
    for k in (10, 20):
        rows["Distilled (IF explicit)"][f"recall@{k}"] = recall_at_k(all_scores["Distilled (IF explicit)"],
                                                                     teacher_scores, k)  # fmt: skip
    print("distilled recall", {k: v for k, v in rows["Distilled (IF explicit)"].items() if "recall" in k})
    save_json(a.json, {"config": {**vars(a), **asdict(cfg)}, "provenance": provenance(), "results": rows,
                       "ground_truth_s": gt["seconds"]})  # fmt: skip


if __name__ == "__main__":
    main()
