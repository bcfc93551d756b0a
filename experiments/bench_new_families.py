"""Issue 16: unlearning, distilled embeddings and AirRep-style scores on the digits MLP protocol.

The protocol of ``tda_benchmark.py`` (its ``Setting`` and ground truth) at a reduced size that fits a
few minutes on a loaded 2-core machine: ``--n-train`` records, ``--n-queries`` evaluation queries,
``--subsets`` LDS subsets and ``--n-loo`` LOO records. Baselines: Grad-Dot, TracIn, IF explicit.

* Features of both embedding methods: each record's (and query's) full loss gradient, computed in
  closed form from one forward pass (no autograd, no pass over the training set per query):
  ``(p - e_y) (x) [h, 1]`` for the output layer and ``((p - e_y) W_2 * (1 - h^2)) (x) [x, 1]``
  for the hidden layer.
* Distilled: teacher IF explicit, fitted on ``--distill-images`` test images disjoint from both
  query sets, each with all 10 labels (the teacher is linear in the query gradient, and every label
  of an image is a cheap extra query), closed-form reduced-rank fit (``solver="ridge"``) to
  ``--dim``, answered in float32.
* AirRep-style: starts from the distilled encoders and fine-tunes them (and the attention gate) on
  ``--air-subsets`` *other* retrained subsets measured on ``--n-queries`` fit queries disjoint from
  the evaluation queries (ListNet over subsets). ``--air-steps`` is chosen on held-out label subsets
  (the last ``--air-val`` of them), never on the evaluation ground truth.

For each method: one-off seconds (cache + fit), per-query milliseconds after it (median of
``--repeats`` timings of the whole query batch, in this process), LOO and LDS; recall@k of the
distilled embedding against its teacher on the evaluation queries.

    flock /tmp/rlattr-bench.lock python experiments/bench_new_families.py   # writes docs/results/tda_new_families.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
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
from rlattr.testing.supervised import ce_of_logits, load_digits_split  # noqa: E402

Parts = list[tuple[Tensor, Tensor]]


def mlp_parts(model: nn.Module) -> Callable[[dict[str, Tensor]], Parts]:
    """``batch -> [(delta_1, [x, 1]), (err, [h, 1])]``: each layer's gradient factors, closed form."""
    assert isinstance(model, nn.Sequential)  # the MLP: Linear, Tanh, Linear

    def f(batch: dict[str, Tensor]) -> Parts:
        with torch.no_grad():
            w2 = model[2].weight
            assert isinstance(w2, Tensor)
            x = batch["x"].to(w2.dtype)
            h = model[1](model[0](x))
            err = torch.softmax(model[2](h), 1) - nn.functional.one_hot(batch["y"], 10).to(h)
            one = torch.ones(len(x), 1, dtype=x.dtype)
            return [((err @ w2) * (1 - h * h), torch.cat([x, one], 1)), (err, torch.cat([h, one], 1))]

    return f


def mlp_gradients(model: nn.Module) -> Callable[[dict[str, Tensor]], Tensor]:
    """``batch -> Tensor[n, 4810]``: each record's cross-entropy gradient (both layers), closed form:
    the outer products of :func:`mlp_parts`, in the order of model.parameters()."""
    parts = mlp_parts(model)

    def f(batch: dict[str, Tensor]) -> Tensor:
        return torch.cat([(d[:, :, None] * a[:, None, :]).flatten(1) for d, a in parts(batch)], 1)

    return f


def every_label(x: Tensor) -> dict[str, Tensor]:
    """Each image once per class: ``10 n`` queries."""
    return {"x": x.repeat_interleave(10, 0), "y": torch.arange(10).repeat(len(x))}


def per_query_ms(attr: Attributor, queries: dict[str, Tensor], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        attr.attribute(queries)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / len(queries["y"])


def air_labels(s: Setting, a: argparse.Namespace) -> tuple[Tensor, Tensor, float]:
    """Masks and effects (minus the fit-query losses) of the AirRep label subsets."""
    masks = subset_masks(s.cfg.n_train, a.air_subsets, 0.5, seed=1000)  # not the LDS subsets
    label_dir = "air" if a.air_subsets == 120 else f"air_{a.air_subsets}"  # the store keeps one mask set

    def fit_loss(params: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            return s.task.loss(params, s.fit_queries)

    t0 = time.perf_counter()
    effects = -subset_retraining(s.retrain, fit_loss, masks, seed=1000, out_dir=Path(a.out) / label_dir,
                                 config={"n_train": s.cfg.n_train, "steps": s.cfg.mlp_steps}, processes=2)  # fmt: skip
    return masks, effects, time.perf_counter() - t0


def pick_air_steps(
    s: Setting, a: argparse.Namespace, init: DistilledEmbedding, labels: Any
) -> dict[str, dict[int, float]]:
    """LDS on the held-out label subsets (fit queries) for each objective and number of steps."""
    masks, effects, _ = labels
    k = masks.shape[0] - a.air_val
    out: dict[str, dict[int, float]] = {}
    for objective in a.air_objectives:
        out[objective] = {}
        for steps in a.air_steps:
            air = AirRep(s.task, init.features, query_features=init.query_features, steps=steps,
                         lr=a.air_lr, init=init, objective=objective)  # fmt: skip
            air.cache(s.train)
            scores = air.fit(s.fit_queries, masks[:k], effects[:k]).attribute(s.fit_queries).double()
            out[objective][steps] = float(lds(scores, masks[k:], effects[k:]))
        print("AirRep-style", objective, "held-out-subset LDS by steps", out[objective], flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-queries", type=int, default=50)
    p.add_argument("--n-loo", type=int, default=50)
    p.add_argument("--subsets", type=int, default=40)
    p.add_argument("--air-subsets", type=int, default=120)
    p.add_argument("--air-val", type=int, default=30)
    p.add_argument("--air-steps", type=int, nargs="+", default=[0, 10, 30, 100])
    p.add_argument("--air-lr", type=float, default=3e-4)
    p.add_argument("--air-objectives", nargs="+", default=["listnet", "rank_corr", "pairwise"])
    p.add_argument("--distill-images", type=int, default=400)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--mlp-steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="runs/tda_new_families")
    p.add_argument("--json", default="docs/results/tda_new_families.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = BenchConfig(n_train=a.n_train, n_queries=a.n_queries, n_loo=a.n_loo, subsets=a.subsets,
                      mlp_steps=a.mlp_steps, models=["mlp"], out=a.out, doc="unused")  # fmt: skip
    s = Setting("mlp", cfg)
    gt = ground_truth(s)
    labels = air_labels(s, a)
    ckpts = s.adam_checkpoints()
    feats = mlp_gradients(s.model)
    query_feats = mlp_gradients(copy.deepcopy(s.model).float())  # queries answered in float32
    x_test = load_digits_split(cfg.n_train, seed=cfg.seed, dtype=torch.float64).x_test
    distill_queries = every_label(x_test[2 * cfg.n_queries : 2 * cfg.n_queries + a.distill_images])

    def teacher() -> InfluenceFunction:
        return InfluenceFunction(
            s.task, strategy="explicit", l2=cfg.l2, output=s.output, output_loss=ce_of_logits
        )

    def distilled() -> DistilledEmbedding:
        d = DistilledEmbedding(
            teacher().cache(s.train), feats, query_features=query_feats, dim=a.dim, solver="ridge"
        )
        return d.cache(s.train).fit(distill_queries).astype(torch.float32)

    built: dict[str, Any] = {}
    table: dict[str, Callable[[], Attributor]] = {
        "Grad-Dot": lambda: GradDot(s.task).cache(s.train),
        "TracIn": lambda: TracIn(s.task, *ckpts).cache(s.train),
        "IF explicit": lambda: teacher().cache(s.train),
        "Unlearning (MUCS-style)": lambda: Unlearning(s.task, lr=0.05, max_step=0.5).cache(s.train),
        "Distilled (IF explicit)": distilled,
    }  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    scores: dict[str, Tensor] = {}

    def evaluate(name: str, build: Callable[[], Attributor]) -> None:
        t0 = time.perf_counter()
        built[name] = attr = build()
        one_off = time.perf_counter() - t0
        scores[name] = sc = attr.attribute(s.queries).detach().double()
        rows[name] = {"loo": float(loo_correlation(sc[:, gt["loo_idx"]], gt["loo"])),
                      "lds": float(lds(sc, gt["masks"], gt["targets"])), "one_off_s": one_off,
                      "per_query_ms": per_query_ms(attr, s.queries, a.repeats)}  # fmt: skip
        print(name, {k: round(v, 4) for k, v in rows[name].items()}, flush=True)

    for name, build in table.items():
        evaluate(name, build)
    init = built["Distilled (IF explicit)"]  # its encoders are copied to float64 to train
    val = pick_air_steps(s, a, init, labels)
    objective, best = max(((o, k) for o in val for k in val[o]), key=lambda ok: val[ok[0]][ok[1]])
    print("AirRep-style pick:", objective, best, flush=True)
    masks, effects, t_labels = labels
    evaluate("AirRep-style", lambda: AirRep(s.task, feats, query_features=query_feats, steps=best, lr=a.air_lr,
                                            init=init, objective=objective)
             .cache(s.train).fit(s.fit_queries, masks, effects).astype(torch.float32))  # fmt: skip
    rows["AirRep-style"].update({"label_retraining_s": t_labels, "val_lds_by_objective_steps": val,
                                 "steps": best, "objective": objective})  # fmt: skip
    for k in (10, 20):
        rows["Distilled (IF explicit)"][f"recall@{k}"] = recall_at_k(scores["Distilled (IF explicit)"],
                                                                     scores["IF explicit"], k)  # fmt: skip
    print("distilled recall", {k: v for k, v in rows["Distilled (IF explicit)"].items() if "recall" in k})
    save_json(a.json, {"config": {**vars(a), **asdict(cfg)}, "provenance": provenance(), "results": rows,
                       "ground_truth_s": gt["seconds"]})  # fmt: skip


if __name__ == "__main__":
    main()
