"""The observe-only callback's one-off start-up, piece by piece (issue 20).

Each piece is paid once per process, so every repeat runs in a fresh interpreter (``--repeats``,
median reported): the forward-AD warm-up (``torch.func.jvp``'s first call), the TensorBoard
writer (import and open), matplotlib (import) and the first figure (drawn at round 0 and written
as a TensorBoard image). Writes ``results/iif/startup.json`` with provenance.

    nice -n 10 .venv/bin/python experiments/iif_startup_bench.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from rlattr.core.store import save_json
from rlattr.provenance import provenance

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, tempfile, time
import torch
torch.set_num_threads(1)
import rlattr.callbacks.sb3.influence  # SB3, torch and rlattr already imported, as in a training run
t0 = time.perf_counter()
torch.func.jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),))
t1 = time.perf_counter()
from rlattr.reporting.tensorboard import AttrWriter
writer = AttrWriter(tempfile.mkdtemp())
t2 = time.perf_counter()
import matplotlib
matplotlib.use("Agg")
from rlattr.reporting.plots import score_vs_advantage
t3 = time.perf_counter()
writer.writer.add_figure("x", score_vs_advantage(torch.randn(256), torch.randn(256), "r"), 0)
t4 = time.perf_counter()
print(json.dumps({"jvp_warmup": t1 - t0, "tensorboard_writer": t2 - t1, "matplotlib_import": t3 - t2,
                  "first_figure": t4 - t3}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "iif" / "startup.json")
    args = ap.parse_args()
    runs = []
    for _ in range(args.repeats):
        done = subprocess.run(
            [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, cwd=REPO
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    median["total"] = sum(median.values())
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    result = {"median_seconds": median, "runs": runs, "load_average": load, "provenance": provenance()}
    save_json(args.out, result)
    print(json.dumps(median, indent=1))


if __name__ == "__main__":
    main()
