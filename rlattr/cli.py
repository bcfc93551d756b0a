"""The ``rlattr`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_demo_digits(args: argparse.Namespace) -> int:
    from rlattr.demo_digits import run

    run(out_dir=args.out, n_queries=args.queries, top_k=args.top_k, seed=args.seed)
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
    demo = sub.add_parser("demo", help="the main demo (for now: the digits demo)")
    demo.add_argument("--out", default="demo_out/digits")
    demo.add_argument("--queries", type=int, default=3)
    demo.add_argument("--top-k", type=int, default=5)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo_digits)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
