"""``RayExecutor(address=...)`` against a Ray head started outside the test (``ray start --head``).

The driver runs in a subprocess of its own: a process connects to one Ray at a time, and this
one may hold the package's local instance (``ray_local``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_REASON = 'ray is not installed (the optional extra: pip install "rlattr[ray]"); make test installs it'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``host:port`` of a one-CPU Ray head in its own process group, stopped (with everything it
    started) in teardown. Ray 2.60 authenticates with a token: the head and this driver share a
    fresh one through the environment."""
    pytest.importorskip("ray", reason=_REASON)
    ray_cli = Path(sys.executable).with_name("ray")
    cli = str(ray_cli) if ray_cli.exists() else shutil.which("ray")
    if cli is None:
        pytest.skip("no `ray` command beside this Python or on PATH to start a head with")
    port = _free_port()
    # --block: the command holds the head's processes and stops them when it is terminated
    cmd = [cli, "start", "--head", "--block", "--num-cpus=1", f"--port={port}", "--include-dashboard=false"]
    temp = tempfile.mkdtemp(prefix="rlray-", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    cmd += [f"--temp-dir={temp}", "--disable-usage-stats"]
    log_path = tmp_path / "head.log"
    log = log_path.open("w")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                last = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
                pytest.skip(f"`ray start --head` did not start a head on port {port} within 60 s: {last[0]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # --block's clean stop can take 30 s: the group goes at once
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


DRIVER = """
import json, sys
import torch
import ray
from rlattr.scale import RayExecutor

ex = RayExecutor(workers=1, address=sys.argv[1])
got = dict(ex.map(lambda j, x: x * (j + 1), range(3), lambda j: torch.full((2,), float(j))))
cpus = ray.cluster_resources().get("CPU")
ray.shutdown()
print(json.dumps({"got": {j: v.tolist() for j, v in got.items()}, "cpus": cpus, "tasks": ex.tasks}))
"""


def test_the_executor_connects_to_a_cluster_by_address(head: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, head], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["got"] == {"0": [0.0, 0.0], "1": [2.0, 2.0], "2": [6.0, 6.0]}
    assert result["tasks"] == 3
    # the head's one CPU is the cluster's: the driver joined it rather than starting its own Ray
    assert result["cpus"] == 1.0
