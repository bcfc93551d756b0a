"""TDA benchmark on scikit-learn's digits: every attribution method's LOO correlation, LDS and wall-clock.

Two settings, as in dattri's MNIST benchmark but on digits (1,000 training / 797 test images,
8x8, standardised): multinomial logistic regression (L-BFGS to convergence) and a 64-64-10 tanh
MLP (500 full-batch Adam steps), both minimising mean cross-entropy + (l2 / 2) ||theta||^2 in
float64. Ground truth (cached, resumable, under ``--out``):

* LOO: a fixed random subset of ``--n-loo`` training records, each removed and the model
  retrained (LR warm-started from the full solution, which changes nothing but the time of a
  convex problem; the MLP from its fixed initialisation, as the attributed model was trained);
  effect = change of each query's test loss. LOO correlation = Pearson across those records,
  averaged over the ``--n-queries`` test queries.
* LDS: ``--subsets`` random halves of the training set, retrained the same way; target = minus
  the query loss; Spearman across subsets, averaged over queries.

Learned weights (parameter groups = tensors: weight and bias of each layer) are fitted on another
``--n-queries`` unlabelled-by-attribution test points, disjoint from the evaluation queries.

    python experiments/tda_benchmark.py               # full run, writes docs/results/tda.md + .json
    python experiments/tda_benchmark.py --quick       # a few-minute smoke run into runs/
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np
import torch
from torch import nn

from rlattr.core.methods import (
    TRAK,
    GradCos,
    GradDot,
    InfluenceFunction,
    LearnedWeights,
    RescaledInfluence,
    TracIn,
)
from rlattr.core.store import atomic_write_bytes, load_json, save_json
from rlattr.eval.groundtruth import leave_one_out, subset_masks, subset_retraining
from rlattr.eval.metrics import lds, loo_correlation
from rlattr.provenance import provenance
from rlattr.testing.supervised import (
    ModelKind,
    ce_of_logits,
    classification_task,
    load_digits_split,
    make_model,
    margin_weight,
    model_sampled_batch,
    per_record_ce,
    per_record_logits,
    per_record_margin,
    train_classifier,
)

DATTRI = {  # dattri benchmark, MNIST, 5,000 train / 500 test (REFERENCE.md section 2)
    "logreg": {
        "loo": {"IF explicit": 0.88, "IF CG": 0.88, "IF LiSSA": 0.87, "TracIn": 0.28, "Grad-Dot": 0.28,
                "Grad-Cos": 0.16, "TRAK-10": 0.74},
        "lds": {"IF explicit": 0.80, "IF CG": 0.80, "IF LiSSA": 0.79, "TracIn": 0.33, "Grad-Dot": 0.33,
                "Grad-Cos": 0.19, "TRAK-10": 0.64},
    },
    "mlp": {"loo": {}, "lds": {"IF CG": 0.26, "IF LiSSA": 0.14, "TracIn": 0.15, "Grad-Dot": 0.10,
                               "Grad-Cos": 0.12, "TRAK-10": 0.33}},
}  # fmt: skip


BEGIN, END = "<!-- tda-table:begin (written by experiments/tda_benchmark.py) -->", "<!-- tda-table:end -->"


@dataclass
class BenchConfig:
    n_train: int = 1000
    n_queries: int = 100
    n_loo: int = 150
    subsets: int = 50
    fraction: float = 0.5
    l2: float = 1e-3
    mlp_steps: int = 500
    checkpoints: int = 10
    proj_dim: int = 256
    trak_damping: float = 0.1
    fisher_draws: int = 5
    trak_models: int = 10
    lissa_depth: int = 1000
    lissa_batch: int = 100
    cg_iters: int = 500
    processes: int = 2
    seed: int = 0
    models: list[str] = field(default_factory=lambda: ["logreg", "mlp"])
    out: str = "runs/tda_benchmark"
    doc: str = "docs/results/tda.md"


class Setting:
    """One model kind: data, the trained model, its Task, ground-truth retraining."""

    def __init__(self, kind: str, cfg: BenchConfig) -> None:
        if kind not in get_args(ModelKind):
            raise ValueError(f"models: got {kind!r}; supported: {list(get_args(ModelKind))}")
        self.kind: ModelKind = cast(ModelKind, kind)
        self.cfg = cfg
        data = load_digits_split(cfg.n_train, seed=cfg.seed, dtype=torch.float64)
        self.train = data.train_batch()
        self.queries = {"x": data.x_test[: cfg.n_queries], "y": data.y_test[: cfg.n_queries]}
        fit = slice(cfg.n_queries, 2 * cfg.n_queries)
        self.fit_queries = {"x": data.x_test[fit], "y": data.y_test[fit]}
        self.model = self.fit_model(torch.ones(cfg.n_train), init_seed=0, warm=None)
        self.task = classification_task(self.model, groups="tensor")
        self.output = per_record_logits(self.model)  # the curvature's output and its loss

    def fit_model(self, weights: torch.Tensor, init_seed: int, warm: nn.Module | None) -> nn.Module:
        model = copy.deepcopy(warm) if warm is not None else make_model(self.kind, seed=init_seed).double()
        steps = None if self.kind == "logreg" else self.cfg.mlp_steps
        return train_classifier(
            model, self.train["x"], self.train["y"], weights=weights, l2=self.cfg.l2, steps=steps
        )

    def retrain(self, weights: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        warm = self.model if self.kind == "logreg" else None  # convex: the start changes only the time
        model = self.fit_model(weights.double(), init_seed=0, warm=warm)
        return {k: v.detach() for k, v in model.named_parameters()}

    def query_loss(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return per_record_ce(self.model)(params, self.queries)

    def adam_checkpoints(self) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
        """TracIn checkpoints along a full-batch Adam run (lr 1e-2) of the same objective."""
        model = make_model(self.kind, seed=0).double()
        params = [p for p in model.parameters()]
        opt = torch.optim.Adam(params, lr=1e-2)
        steps = self.cfg.mlp_steps
        every = steps // self.cfg.checkpoints
        ckpts = []
        for step in range(1, steps + 1):
            opt.zero_grad()
            ce = nn.functional.cross_entropy(model(self.train["x"]), self.train["y"])
            (ce + 0.5 * self.cfg.l2 * sum(p.pow(2).sum() for p in params)).backward()
            opt.step()
            if step % every == 0:
                ckpts.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return ckpts, [1e-2] * len(ckpts)

    def ensemble(self) -> list[dict[str, torch.Tensor]]:
        members = [self.task.tracked_params()]
        for s in range(1, self.cfg.trak_models):
            if self.kind == "logreg":  # one optimum: the members differ by their projection only
                members.append(self.task.tracked_params())
            else:
                m = self.fit_model(torch.ones(self.cfg.n_train), init_seed=s, warm=None)
                members.append({k: v.detach() for k, v in m.named_parameters()})
        return members


def method_table(s: Setting) -> dict[str, Any]:
    """name -> zero-argument constructor of a cached-and-ready attributor."""
    cfg, task = s.cfg, s.task
    margin, weight = per_record_margin(s.model), margin_weight(s.model)

    def trak(members: list[dict[str, torch.Tensor]]) -> TRAK:
        return TRAK(
            task,
            members,
            proj_dim=cfg.proj_dim,
            damping=cfg.trak_damping,
            output=margin,
            output_weight=weight,
        )

    def curvature(strategy: str, **opts: Any) -> InfluenceFunction:
        return InfluenceFunction(
            task, strategy=strategy, l2=cfg.l2, output=s.output, output_loss=ce_of_logits, **opts
        )

    def influence(strategy: str, **opts: Any) -> Any:
        return lambda: curvature(strategy, **opts).cache(s.train)

    def weighted(base: Any) -> Any:
        return lambda: LearnedWeights(base()).cache(s.train).fit(s.fit_queries)

    fisher = model_sampled_batch(s.model, s.train, cfg.fisher_draws, seed=cfg.seed)  # true Fisher, MC
    ckpts = s.adam_checkpoints()
    members = s.ensemble()
    table = {
        "Grad-Dot": lambda: GradDot(task).cache(s.train),
        "Grad-Cos": lambda: GradCos(task).cache(s.train),
        "TracIn": lambda: TracIn(task, *ckpts).cache(s.train),
        "IF explicit": influence("explicit"),
        "IF CG": influence("cg", max_iter=cfg.cg_iters, tol=1e-6),
        "IF LiSSA": influence("lissa", depth=cfg.lissa_depth, batch_size=cfg.lissa_batch),
        "IF EK-FAC": lambda: InfluenceFunction(task, strategy="ekfac", l2=cfg.l2, hessian_data=fisher).cache(
            s.train
        ),
        "TRAK-1": lambda: trak(members[:1]).cache(s.train),
        "TRAK-10": lambda: trak(members).cache(s.train),
        "RIF": lambda: RescaledInfluence(task, l2=cfg.l2, output=s.output, output_loss=ce_of_logits).cache(
            s.train
        ),
    }
    table["LW(TracIn)"] = weighted(lambda: TracIn(task, *ckpts))
    table["LW(IF explicit)"] = weighted(lambda: curvature("explicit"))
    table["LW(TRAK-10)"] = weighted(lambda: trak(members))
    return table


def ground_truth(s: Setting) -> dict[str, Any]:
    cfg = s.cfg
    out = Path(cfg.out) / s.kind
    common = {
        "model": s.kind,
        "l2": cfg.l2,
        "n_train": cfg.n_train,
        "n_queries": cfg.n_queries,
        "steps": cfg.mlp_steps,
    }
    loo_idx = torch.randperm(cfg.n_train, generator=torch.Generator().manual_seed(cfg.seed + 1))[: cfg.n_loo]
    t0 = time.perf_counter()
    base = s.query_loss(s.retrain(torch.ones(cfg.n_train), 0))
    loo = leave_one_out(s.retrain, s.query_loss, cfg.n_train, loo_idx.tolist(), baseline=base,
                        out_dir=out / "loo", config=common, processes=cfg.processes)  # fmt: skip
    t_loo = time.perf_counter() - t0
    masks = subset_masks(cfg.n_train, cfg.subsets, cfg.fraction, seed=cfg.seed)
    t0 = time.perf_counter()
    values = subset_retraining(s.retrain, s.query_loss, masks, out_dir=out / "lds", config=common,
                               processes=cfg.processes)  # fmt: skip
    t_lds = time.perf_counter() - t0
    timing = out / "seconds.json"  # the wall-clock of the run that computed them, not of a resumed one
    if timing.exists():
        t_loo, t_lds = load_json(timing)
    else:
        save_json(timing, [t_loo, t_lds])
    return {"loo_idx": loo_idx, "loo": loo.T, "masks": masks, "targets": -values, "seconds": [t_loo, t_lds]}


def group_diagnostics(s: Setting, gt: dict[str, Any], lw: LearnedWeights) -> dict[str, Any]:
    """Learned weights, and the LDS of each parameter group's contribution alone (base method)."""
    contrib = lw.base.attribute_by_group(s.queries).detach().double()
    alone = {
        g: float(lds(contrib[..., j], gt["masks"], gt["targets"])) for j, g in enumerate(s.task.group_names)
    }
    return {"weights": lw.group_weights, "group_lds": alone}


def evaluate(s: Setting, gt: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for name, build in method_table(s).items():
        t0 = time.perf_counter()
        try:
            attr = build()
            scores = attr.attribute(s.queries).detach().double()
        except (ValueError, RuntimeError) as err:
            print(f"[{s.kind}] {name}: failed: {err}", flush=True)
            rows[name] = {"loo": float("nan"), "lds": float("nan"), "seconds": float("nan")}
            continue
        secs = time.perf_counter() - t0
        rows[name] = {
            "loo": float(loo_correlation(scores[:, gt["loo_idx"]], gt["loo"])),
            "lds": float(lds(scores, gt["masks"], gt["targets"])),
            "seconds": secs,
        }
        if isinstance(attr, LearnedWeights):
            rows[name].update(group_diagnostics(s, gt, attr))
        print(
            f"[{s.kind}] {name:16s} LOO {rows[name]['loo']:+.3f}  LDS {rows[name]['lds']:+.3f}  {secs:7.1f} s",
            flush=True,
        )
    return rows


def lw_lines(cfg: BenchConfig, results: dict[str, Any]) -> list[str]:
    """Learned group weights and the LDS of each group's contribution alone."""
    lines = [
        "| setting | method | learned weights | LDS of each group alone (base method) |",
        "|---|---|---|---|",
    ]
    for k in cfg.models:
        for name, r in results[k]["methods"].items():
            if "weights" in r:
                w = ", ".join(f"{g} {v:.2f}" for g, v in r["weights"].items())
                alone = ", ".join(f"{g} {v:.2f}" for g, v in r["group_lds"].items())
                lines.append(f"| {k} | {name} | {w} | {alone} |")
    return lines


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.2f}"


def write_doc(cfg: BenchConfig, results: dict[str, Any], meta: dict[str, Any]) -> None:
    lines = [
        "| method | "
        + " | ".join(f"{k} LOO | {k} LDS | {k} s | dattri {k} LOO / LDS" for k in cfg.models)
        + " |"
    ]
    lines.append("|---" * (1 + 4 * len(cfg.models)) + "|")
    names = list(next(iter(results.values()))["methods"])
    for name in names:
        cells = [name]
        for k in cfg.models:
            r = results[k]["methods"][name]
            d = DATTRI[k]
            dat = f"{_fmt(d['loo'].get(name))} / {_fmt(d['lds'].get(name))}"
            cells += [_fmt(r["loo"]), _fmt(r["lds"]), f"{r['seconds']:.1f}", dat]
        lines.append("| " + " | ".join(cells) + " |")
    gt = ", ".join(
        f"{k}: LOO {results[k]['gt_seconds'][0]:.0f} s, LDS {results[k]['gt_seconds'][1]:.0f} s"
        for k in cfg.models
    )
    block = "\n".join(
        [
            BEGIN,
            "\n".join(lines),
            "",
            f"Ground-truth retraining wall-clock ({cfg.processes} processes): {gt}.",
            "",
            *lw_lines(cfg, results),
            "",
            f"Run: `{meta['command']}` at commit `{str(meta['git_commit'])[:10]}`, torch {meta['torch']}, "
            f"numpy {meta['numpy']}, scikit-learn {meta['scikit-learn']}, Python {meta['python']}; "
            f"config and per-method numbers in `{Path(cfg.doc).with_suffix('.json').name}`.",
            END,
        ]
    )
    doc = Path(cfg.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    old = doc.read_text() if doc.exists() else f"# TDA benchmark on digits\n\n{BEGIN}\n{END}\n"
    if BEGIN not in old or END not in old:
        old = old.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = old.split(BEGIN, 1)
    atomic_write_bytes(doc, (head + block + rest.split(END, 1)[1]).encode())


def plot(cfg: BenchConfig, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(results.values()))["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, metric in zip(axes, ("loo", "lds"), strict=True):
        width = 0.8 / len(cfg.models)
        for j, k in enumerate(cfg.models):
            vals = [results[k]["methods"][n][metric] for n in names]
            ax.bar(np.arange(len(names)) + j * width, np.nan_to_num(vals), width, label=k)
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=60, ha="right")
        ax.set_title({"loo": "LOO correlation (Pearson)", "lds": "LDS (Spearman, 50% subsets)"}[metric])
        ax.axhline(0, color="k", lw=0.5)
        ax.legend()
    fig.tight_layout()
    fig.savefig(Path(cfg.doc).with_name("tda_metrics.png"), dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchConfig()
    for name, value in asdict(defaults).items():
        if isinstance(value, list):
            parser.add_argument(f"--{name.replace('_', '-')}", nargs="+", default=value)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run into runs/tda_quick")
    args = vars(parser.parse_args(argv))
    quick = args.pop("quick")
    cfg = BenchConfig(**args)
    if quick:
        cfg = BenchConfig(n_train=200, n_queries=20, n_loo=20, subsets=10, mlp_steps=100, trak_models=2,
                          lissa_depth=50, proj_dim=256, out="runs/tda_quick", doc="runs/tda_quick/tda.md")  # fmt: skip
    torch.set_num_threads(1)
    meta = provenance()
    results: dict[str, Any] = {}
    for kind in cfg.models:
        s = Setting(kind, cfg)
        gt = ground_truth(s)
        print(
            f"[{kind}] ground truth: {gt['seconds'][0]:.0f} s LOO, {gt['seconds'][1]:.0f} s LDS", flush=True
        )
        results[kind] = {"methods": evaluate(s, gt), "gt_seconds": gt["seconds"]}
    save_json(
        Path(cfg.doc).with_suffix(".json"), {"config": asdict(cfg), "provenance": meta, "results": results}
    )
    write_doc(cfg, results, meta)
    plot(cfg, results)


if __name__ == "__main__":
    main()
