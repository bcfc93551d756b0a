"""The ``rlattr`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def _cmd_demo_digits(args: argparse.Namespace) -> int:
    from rlattr.demos.digits import run

    run(out_dir=args.out, n_queries=args.queries, top_k=args.top_k, seed=args.seed)
    return 0


def _load_train_config(config: str, overrides: dict[str, Any]) -> Any:
    """A TrainConfig from a YAML file or a shipped config's name, with command-line overrides."""
    from rlattr.callbacks.sb3.config import config_from_dict, parse_yaml
    from rlattr.configs import check_not_study_config, resolve

    source, text = resolve(config)
    data = parse_yaml(text, source)  # duplicate keys refused, 1e5 read as a number
    check_not_study_config(data, source)
    if isinstance(data, dict):
        data = {**data, **overrides}
    return config_from_dict(data, source)


def _cmd_train(args: argparse.Namespace) -> int:
    from rlattr.errors import RlattrError

    names = {"runs_dir": args.runs_dir, "seed": args.seed, "total_timesteps": args.total_timesteps}
    overrides = {k: v for k, v in names.items() if v is not None}
    if args.resume is not None:
        if args.config is not None or overrides:
            raise RlattrError(
                "resume: got --resume with a config or overrides; a resumed run keeps its config.yaml"
            )
        from rlattr.callbacks.sb3.train import resume

        run_dir = resume(args.resume, progress_bar=not args.no_progress)
        print(f"run folder (resumed): {run_dir}\n  rlattr report {run_dir}")
        return 0
    if args.config is None:
        raise RlattrError("config: missing; give a YAML file or a shipped config name, or --resume RUN")
    config = _load_train_config(args.config, overrides)
    from rlattr.callbacks.sb3.train import train

    run_dir = train(config, progress_bar=not args.no_progress)
    print(f"run folder: {run_dir}\n  tensorboard --logdir {run_dir}\n  rlattr report {run_dir}")
    return 0


def _cmd_init_config(args: argparse.Namespace) -> int:
    from rlattr.configs import write_copy

    out = write_copy(args.name, args.path)
    print(f"wrote {out}; edit it, then: rlattr train {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from rlattr.reporting.report import write_report

    progress = False if args.no_progress else None  # None: a bar when the console is a terminal
    index = write_report(args.run, args.out, recent=args.recent, top_k=args.top_k, progress=progress)
    print(f"report: {index}")
    return 0


def _cmd_demo_ppo(args: argparse.Namespace) -> int:
    from rlattr.demos.cartpole import run

    run(args.out, args.timesteps, progress_bar=not args.no_progress)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rlattr.callbacks.sb3.verify import VerifyOptions, verify_round

    options = VerifyOptions(args.epsilon, args.delta, args.queries, args.calibration, args.seed)
    transcript = verify_round(args.run, args.round, options)
    out = Path(args.out) if args.out else Path(args.run) / f"verify_round_{args.round:05d}.json"
    transcript.save(out)
    print(
        f"{transcript.decision.upper()}: {transcript.reason}\n  Verifier retrainings: "
        f"{transcript.n_retrainings}; Prover answers: {len(transcript.answers)}\n  transcript: {out}"
    )
    return 0 if transcript.accepted else 1


def _sub(sub: Any, name: str, help: str, func: Any) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from rlattr import __version__

    parser = argparse.ArgumentParser(
        prog="rlattr",
        description="Training-data attribution for RL (SB3 PPO, TRL GRPO/RLOO) and supervised models",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rlattr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    digits = _sub(
        sub,
        "demo-digits",
        "offline attribution on scikit-learn's digits (PNG grid + table)",
        _cmd_demo_digits,
    )
    digits.add_argument("--out", default="demo_out/digits", help="output folder")
    digits.add_argument("--queries", type=int, default=3, help="number of test images to explain")
    digits.add_argument("--top-k", type=int, default=5, help="helpful and harmful images shown per query")
    digits.add_argument("--seed", type=int, default=0, help="seed of the data split and the model")
    demo = _sub(sub, "demo", "PPO on CartPole-v1 with InfluenceCallback, then the report", _cmd_demo_ppo)
    demo.add_argument("--out", default="demo_out/ppo", help="folder that receives the run folder")
    demo.add_argument("--timesteps", type=int, default=20_480, help="environment steps to train for")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    train = _sub(sub, "train", "PPO + InfluenceCallback from a YAML config", _cmd_train)
    train.add_argument(
        "config",
        nargs="?",
        default=None,
        help="a YAML file, or the name of a shipped config (cartpole, lunarlander); "
        "`rlattr init-config NAME` writes one to edit",
    )
    train.add_argument(
        "--resume",
        default=None,
        metavar="RUN",
        help="continue the killed run in folder RUN from its last checkpoint (no config then)",
    )
    train.add_argument("--runs-dir", default=None, help="override the config's runs_dir")
    train.add_argument("--seed", type=int, default=None, help="override the config's seed")
    train.add_argument(
        "--total-timesteps", type=int, default=None, help="override the config's total_timesteps"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    init = _sub(sub, "init-config", "write a copy of a shipped config to edit", _cmd_init_config)
    init.add_argument("name", help="shipped config: cartpole or lunarlander")
    init.add_argument("path", nargs="?", default=None, help="file (or folder) to write; default ./NAME.yaml")
    report = _sub(sub, "report", "index.html + PNG plots of a run", _cmd_report)
    report.add_argument("run", help="run folder (or its rlattr/ subfolder)")
    report.add_argument("--out", default=None, help="output folder; None: RUN/report")
    report.add_argument("--recent", type=int, default=5, help="rounds with a top/bottom table")
    report.add_argument("--top-k", type=int, default=10, help="rows per side of the tables")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify = _sub(
        sub, "verify", "verify a PPO round's stored scores as a datamodel (Prover / Verifier)", _cmd_verify
    )
    verify.add_argument("run", help="run folder written by `rlattr train`")
    verify.add_argument("--round", type=int, required=True, help="round with a full snapshot")
    verify.add_argument("--epsilon", type=float, default=0.2, help="tolerated excess MSE / Var(f), in (0, 1)")
    verify.add_argument("--delta", type=float, default=0.05, help="failure probability, in (0, 1)")
    verify.add_argument("--queries", type=int, default=None, help="Prover answers; None: 4 sqrt(n+1)/epsilon")
    verify.add_argument("--calibration", type=int, default=32, help="Prover retrainings to fit scale")
    verify.add_argument("--seed", type=int, default=None, help="Verifier's secret seed; None: from the OS")
    verify.add_argument("--out", default=None, help="transcript file; None: RUN/verify_round_K.json")
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
