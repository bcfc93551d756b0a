"""The observe-only callback's one-off start-up, piece by piece (issue 20).

Each piece is paid once per process, so every repeat runs in a fresh interpreter (``--repeats``,
median reported): the forward-AD warm-up (``torch.func.jvp``'s first call), the TensorBoard
writer (import and open), matplotlib (import) and the first figure (drawn at round 0 and written
as a TensorBoard image). Then the cut, end to end: a short observe-only run (CartPole, 4 rounds
of 256 steps, TensorBoard on, ``image_every`` 10) in a fresh interpreter, once with the callback as
it is (the first image after ``image_every`` scored rounds, so this run draws none) and once with
the image rule before the cut (an image at round 0, restored by overriding ``_image_due``),
alternating, wall and process CPU seconds of ``learn()`` each. Writes ``results/iif/startup.json``
with provenance.

    flock /tmp/rlattr-bench.lock nice -n 10 .venv/bin/python experiments/iif_startup_bench.py --repeats 5
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

RUN = r"""
import json, sys, tempfile, time
import torch
torch.set_num_threads(1)
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from rlattr.callbacks.sb3.influence import InfluenceCallback

class RoundZeroImage(InfluenceCallback):
    def _image_due(self):  # the rule before the cut: an image at scored rounds 0, image_every, ...
        return self.n_scored % self.image_every == 0

cls = RoundZeroImage if sys.argv[1] == "before" else InfluenceCallback
model = PPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1, seed=0), n_steps=256, batch_size=64,
            n_epochs=4, seed=0, device="cpu")
cb = cls(log_dir=tempfile.mkdtemp() + "/run", image_every=10)
w0, c0 = time.perf_counter(), time.process_time()
model.learn(4 * 256, callback=cb)
w1, c1 = time.perf_counter(), time.process_time()
print(json.dumps({"wall": w1 - w0, "cpu": c1 - c0, "matplotlib": "matplotlib" in sys.modules}))
"""


def _probe(code: str, *args: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, cwd=REPO
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "iif" / "startup.json")
    args = ap.parse_args()
    runs = [_probe(PROBE) for _ in range(args.repeats)]
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    median["total"] = sum(median.values())
    short: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for _ in range(args.repeats):
        for arm in short:  # alternating, so that both arms see the same machine state
            short[arm].append(_probe(RUN, arm))
    short_median = {
        arm: {k: statistics.median(float(r[k]) for r in rs) for k in ("wall", "cpu", "matplotlib")}
        for arm, rs in short.items()
    }
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    result = {
        "median_seconds": median,
        "runs": runs,
        "short_run": {"setup": "CartPole, 4 rounds x 256 steps, image_every=10", "median": short_median},
        "short_runs": short,
        "load_average": load,
        "provenance": provenance(),
    }
    save_json(args.out, result)
    print(json.dumps({"pieces": median, "short_run": short_median}, indent=1))


if __name__ == "__main__":
    main()
