"""Benchmark of the round snapshot writer: does a round cost the same at round 10 and round 400?

Writes ``--rounds`` CartPole-sized rounds (2,048 records of a 4-dim observation, the SB3 default
64x64 policy's ~9k parameters as theta) with :class:`rlattr.rl.snapshots.SnapshotWriter`, as the
SB3 callback does every round, and times each ``write_round`` (records, theta, scores, the fsynced
``rounds.jsonl`` line, retention). Two settings: every round kept, and ``keep_rounds=20`` (old
rounds pruned). The figure is the median write time of the last 20 rounds over that of rounds 5-24
(after a warm-up): 1.0 means the writer does not slow down as the run grows (the writer before issue 14 rewrote
its round index and walked the folder every round: 35.6 -> 172.3 ms over 400 rounds, x4.85).

    python experiments/bench_snapshots.py                       # 400 rounds, both settings
    python experiments/bench_snapshots.py --rounds 100 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rlattr.core.store import save_json
from rlattr.provenance import provenance
from rlattr.rl.attribution import RoundScores
from rlattr.rl.records import RecordBatch
from rlattr.rl.snapshots import SnapshotWriter

N_STEPS, N_ENVS, OBS_DIM = 512, 4, 4
WINDOW = 20
WARMUP = 5  # the first rounds pay imports and the file system's first allocations


def _round(k: int, theta_numel: int) -> tuple[RecordBatch, RoundScores, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(k)

    def vec() -> torch.Tensor:
        return torch.randn(N_STEPS, N_ENVS, generator=g)

    records = RecordBatch.from_rollout(
        k,
        observations=torch.randn(N_STEPS, N_ENVS, OBS_DIM, generator=g),
        actions=torch.randint(0, 2, (N_STEPS, N_ENVS, 1), generator=g),
        old_log_prob=vec(),
        values=vec(),
        rewards=vec(),
        returns=vec(),
        advantages=vec(),
        episode_starts=torch.zeros(N_STEPS, N_ENVS),
    )
    n = N_STEPS * N_ENVS
    scores = RoundScores(
        scores=torch.randn(n, generator=g), ids=records.ids, seconds=0.1, target={"name": "return"}
    )
    theta = {"policy": torch.randn(theta_numel, generator=g)}
    return records, scores, theta


def run_setting(rounds: int, keep_rounds: int | None, theta_numel: int) -> dict[str, Any]:
    """Per-round ``write_round`` seconds of one fresh run folder."""
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        writer = SnapshotWriter(Path(tmp) / "rlattr", {"snapshot_format": 1}, keep_rounds=keep_rounds)
        for k in range(rounds):
            records, scores, theta = _round(k, theta_numel)
            t0 = time.perf_counter()
            writer.write_round(records, scores, theta, {"round": k})
            times.append(time.perf_counter() - t0)
        disk = writer.disk_bytes
    first = statistics.median(times[WARMUP : WARMUP + WINDOW]) * 1e3
    last = statistics.median(times[-WINDOW:]) * 1e3
    return {
        "keep_rounds": keep_rounds,
        "rounds": rounds,
        "first_ms": round(first, 2),
        "last_ms": round(last, 2),
        "last_over_first": round(last / first, 3),
        "disk_mib": round(disk / 2**20, 1),
        "ms_per_round": [round(t * 1e3, 3) for t in times],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument(
        "--theta", type=int, default=9_155, help="parameters in theta (SB3's 64x64 CartPole policy)"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/results/bench_snapshots.json"))
    args = parser.parse_args()
    if args.rounds < 2 * WINDOW + WARMUP:
        parser.error(f"--rounds: got {args.rounds}; supported: at least {2 * WINDOW + WARMUP}")
    torch.set_num_threads(1)
    rows = [run_setting(args.rounds, keep, args.theta) for keep in (None, 20)]
    print(f"{'keep_rounds':>12} {'rounds 5-24 ms':>12} {'last 20 ms':>11} {'last/first':>10} {'disk MiB':>9}")
    for r in rows:
        keep = "all" if r["keep_rounds"] is None else str(r["keep_rounds"])
        print(
            f"{keep:>12} {r['first_ms']:>12} {r['last_ms']:>11} {r['last_over_first']:>10} {r['disk_mib']:>9}"
        )
    save_json(args.out, {"settings": rows, "window": WINDOW, "warmup": WARMUP, "provenance": provenance()})
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
