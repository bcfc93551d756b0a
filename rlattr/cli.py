"""The ``rlattr`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_demo_digits(args: argparse.Namespace) -> int:
    from rlattr.demos.digits import run

    run(out_dir=args.out, n_queries=args.queries, top_k=args.top_k, seed=args.seed)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from rlattr.callbacks.sb3.config import load_config

    overrides = {"runs_dir": args.runs_dir} if args.runs_dir else {}
    if args.seed is not None:
        overrides["seed"] = args.seed
    config = load_config(args.config, overrides)
    from rlattr.callbacks.sb3.train import train

    run_dir = train(config, progress_bar=not args.no_progress)
    print(f"run folder: {run_dir}\n  tensorboard --logdir {run_dir}\n  rlattr report {run_dir}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from rlattr.reporting.report import write_report

    index = write_report(args.run, args.out, recent=args.recent, top_k=args.top_k)
    print(f"report: {index}")
    return 0


def _cmd_demo_ppo(args: argparse.Namespace) -> int:
    from rlattr.demos.cartpole import run

    run(args.out, args.timesteps, progress_bar=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlattr", description="Training-data attribution for RL and supervised models"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    digits = sub.add_parser(
        "demo-digits", help="offline attribution on scikit-learn's digits (PNG grid + table)"
    )
    digits.add_argument("--out", default="demo_out/digits", help="output folder")
    digits.add_argument("--queries", type=int, default=3, help="number of test images to explain")
    digits.add_argument("--top-k", type=int, default=5, help="helpful and harmful images shown per query")
    digits.add_argument("--seed", type=int, default=0)
    digits.set_defaults(func=_cmd_demo_digits)
    demo = sub.add_parser("demo", help="PPO on CartPole-v1 with InfluenceCallback, then the report")
    demo.add_argument("--out", default="demo_out/ppo", help="folder that receives the run folder")
    demo.add_argument("--timesteps", type=int, default=20_480)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo_ppo)
    train = sub.add_parser("train", help="PPO + InfluenceCallback from a YAML config")
    train.add_argument("config", help="YAML file (see configs/cartpole.yaml)")
    train.add_argument("--runs-dir", default=None, help="override the config's runs_dir")
    train.add_argument("--seed", type=int, default=None, help="override the config's seed")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)
    report = sub.add_parser("report", help="index.html + PNG plots of a run")
    report.add_argument("run", help="run folder (or its rlattr/ subfolder)")
    report.add_argument("--out", default=None, help="output folder (default: RUN/report)")
    report.add_argument("--recent", type=int, default=5, help="rounds with a top/bottom table")
    report.add_argument("--top-k", type=int, default=10, help="rows per side of the tables")
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from rlattr.errors import RlattrError

    try:
        return int(args.func(args))
    except RlattrError as err:
        parser.exit(2, f"rlattr {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
