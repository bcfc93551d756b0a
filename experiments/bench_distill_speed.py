"""Issue 16: distilled embeddings' per-query cost against the teacher's fastest honest path, and a
per-layer factored query map that never forms the query's gradient features.

The digits MLP of ``tda_benchmark.py`` (``--n-train`` records, 500 full-batch Adam steps). Teacher:
IF explicit (Gauss-Newton + l2). Its fastest per-query path precomputes ``M = H^-1 G^T``
(``Tensor[P, n]``, once) and answers a query with its closed-form gradient features ``g_q`` (one
forward pass and two outer products) and ``g_q M``: ``P n`` multiply-adds. The distilled student
(``solver="ridge"``, fitted on ``--distill-images`` x 10 labels) answers with ``g_q Q`` then the
index product: ``P d + d n``. The factored student replaces ``Q`` by per-layer rank-``r`` factors of
each embedding dimension's slice (:func:`rlattr.core.methods.distill.factor_query_map`): ``(delta,
a)`` of each layer from the forward pass, then ``sum_l (out_l + in_l) d r + d n``.

Everything is answered in float32 on a batch of ``--timing-images`` x 10 queries (every label of
each image, so Python overhead is not the measurement); per-query time = median of ``--repeats``
timings of the whole batch / its size. Recall@10 is against the teacher on the first
``--n-queries`` test images (their true labels). Timing runs go through the benchmark lock:

    /tmp/quiet.sh .venv/bin/python experiments/bench_distill_speed.py   # writes docs/results/tda_distill_speed.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_new_families import every_label, mlp_gradients, mlp_parts  # noqa: E402
from tda_benchmark import BenchConfig, Setting  # noqa: E402

from rlattr.core.methods import DistilledEmbedding, InfluenceFunction, recall_at_k  # noqa: E402
from rlattr.core.methods.distill import factor_query_map, factored_embed  # noqa: E402
from rlattr.core.store import save_json  # noqa: E402
from rlattr.provenance import provenance  # noqa: E402
from rlattr.testing.supervised import ce_of_logits, load_digits_split  # noqa: E402


def param_order_columns(layers: tuple[tuple[int, int], ...] = ((64, 64), (10, 64))) -> Tensor:
    """``Tensor[P]``: for each parameter in ``model.parameters()`` order (weight, then bias, per
    layer), its column in :func:`mlp_gradients`' layout (each output row's weights, then its bias)."""
    cols, start = [], 0
    for o, i in layers:
        block = torch.arange(o * (i + 1)).reshape(o, i + 1) + start
        cols += [block[:, :i].flatten(), block[:, i]]
        start += o * (i + 1)
    return torch.cat(cols)


def per_query_ms(fn: Callable[[], Tensor], m: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / m


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-queries", type=int, default=100)
    p.add_argument("--mlp-steps", type=int, default=500)
    p.add_argument("--distill-images", type=int, default=400)
    p.add_argument("--timing-images", type=int, default=100)
    p.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", default="docs/results/tda_distill_speed.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = BenchConfig(n_train=a.n_train, n_queries=a.n_queries, mlp_steps=a.mlp_steps, models=["mlp"],
                      out="unused", doc="unused")  # fmt: skip
    s = Setting("mlp", cfg)
    x_test = load_digits_split(cfg.n_train, seed=cfg.seed, dtype=torch.float64).x_test
    fit_queries = every_label(x_test[2 * cfg.n_queries : 2 * cfg.n_queries + a.distill_images])
    timing = every_label(x_test[: a.timing_images])
    m = len(timing["y"])
    teacher = InfluenceFunction(
        s.task, strategy="explicit", l2=cfg.l2, output=s.output, output_loss=ce_of_logits
    )
    teacher.cache(s.train)
    truth = teacher.attribute(s.queries).detach()
    train_grads = teacher._require_cache()
    t0 = time.perf_counter()
    solved = torch.empty_like(train_grads.T)
    solved[param_order_columns()] = teacher.solver.solve(train_grads.T)  # M = H^-1 G^T, rows as the features
    solved = solved.float()
    m_seconds = time.perf_counter() - t0
    model32 = copy.deepcopy(s.model).float()
    feats, parts = mlp_gradients(model32), mlp_parts(model32)
    fast = mlp_gradients(s.model)(s.queries) @ solved.double()
    rel = float((fast - truth).abs().max() / truth.abs().max())
    out: dict[str, Any] = {
        "teacher_attribute_ms": per_query_ms(lambda: teacher.attribute(timing), m, 3),
        "teacher_fast_ms": per_query_ms(lambda: feats(timing) @ solved, m, a.repeats),
        "teacher_fast_max_rel_diff": rel, "teacher_fast_setup_s": m_seconds, "students": {},
    }  # fmt: skip
    print({k: v for k, v in out.items() if k != "students"}, flush=True)
    shapes = [(64, 65), (10, 65)]
    for dim in a.dims:
        d = DistilledEmbedding(teacher, mlp_gradients(s.model), dim=dim, solver="ridge")
        d.cache(s.train).fit(fit_queries).astype(torch.float32)
        d.query_features = feats
        assert isinstance(d.query_encoder, nn.Linear)
        q_map, index = d.query_encoder.weight.T.detach(), d._index()
        row: dict[str, Any] = {
            "dense": {
                "recall@10": recall_at_k(d.attribute(s.queries).double(), truth, 10),
                "ms": per_query_ms(lambda: feats(timing) @ q_map @ index.T, m, a.repeats),  # noqa: B023
            }
        }
        for r in a.ranks:
            factors = factor_query_map(q_map, shapes, r)
            student = factored_embed(parts(s.queries), factors) @ index.T
            row[f"rank {r}"] = {
                "recall@10": recall_at_k(student.double(), truth, 10),
                "ms": per_query_ms(lambda: factored_embed(parts(timing), factors) @ index.T, m, a.repeats),  # noqa: B023
            }
        out["students"][dim] = row
        print(dim, row, flush=True)
    save_json(a.json, {"config": vars(a), "provenance": provenance(), "results": out,
                       "n_params": s.task.num_params, "timing_queries": m})  # fmt: skip


if __name__ == "__main__":
    main()
