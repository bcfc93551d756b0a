"""Every Python block of README.md runs as written (short, through ``RLATTR_README_FAST=1``).

Each block runs in a fresh interpreter in an empty folder, so a block that relies on a name it does
not define, or on the repository's working directory, fails here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# a fenced python block and the nearest heading above it (the test id)
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[str, str]]:
    """``[(heading, code)]`` of the README's fenced ``python`` blocks, in order."""
    out = []
    for match in _BLOCK.finditer(text):
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        out.append((headings[-1] if headings else "top", match.group(1)))
    return out


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_its_python_blocks() -> None:
    names = " | ".join(name for name, _ in BLOCKS)
    for section in ("stable-baselines3", "TRL", "offline core"):  # a new block is picked up below too
        assert section in names, names
    assert all(code.strip() for _, code in BLOCKS)


def test_block_extraction() -> None:
    text = "# A\n```python\nx = 1\n```\n## B\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [("A", "x = 1\n"), ("B", "y = 2\n")]


@pytest.mark.slow
@pytest.mark.parametrize(("heading", "code"), BLOCKS, ids=[re.sub(r"\W+", "-", h)[:40] for h, _ in BLOCKS])
def test_readme_block_runs(heading: str, code: str, tmp_path) -> None:
    for module in re.findall(r"^(?:from|import) (\w+)", code, re.M):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (its extra is not)")
    script = tmp_path / "block.py"
    script.write_text(code)
    env = {**os.environ, "RLATTR_README_FAST": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, f"README block under '{heading}' failed:\n{out.stderr[-3000:]}"
