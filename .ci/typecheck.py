"""Run mypy over the tree with `callbacks/` checked under its installed name, `rlattr.callbacks`.

setuptools installs the top-level `callbacks/` folder as the subpackage `rlattr.callbacks`
(`package-dir` in pyproject.toml). mypy has no such mapping and cannot follow the editable
install's import hook, so plain `mypy callbacks tests` names those files `callbacks.*` and every
`from rlattr.callbacks ... import X` silently becomes `Any`. This script takes mypy's own command
line, renames the sources under `callbacks/` to `rlattr.callbacks.*`, and runs the same build.

Usage: python .ci/typecheck.py rlattr callbacks experiments tests   (any mypy arguments)

`callbacks/` is always added to the sources: outside them, `rlattr.callbacks` cannot be resolved
and would again be `Any`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mypy import util
from mypy.fscache import FileSystemCache
from mypy.main import process_options, run_build

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ROOT / "callbacks"


def installed_name(path: str | None, module: str) -> str:
    """The module name a source file has once installed: callbacks.sb3.iif -> rlattr.callbacks.sb3.iif."""
    if path is None or not Path(path).resolve().is_relative_to(ADAPTERS):
        return module
    return module if module.startswith("rlattr.") else f"rlattr.{module}"


def main(args: list[str]) -> int:
    t0 = time.time()
    fscache = FileSystemCache()
    sources, options = process_options(args, fscache=fscache)
    if not any(installed_name(s.path, s.module) != s.module for s in sources):
        sources, options = process_options([*args, str(ADAPTERS)], fscache=fscache)
    for source in sources:
        source.module = installed_name(source.path, source.module)
    # lets `import rlattr.callbacks.x` resolve to the renamed sources instead of the search path
    options.fast_module_lookup = True
    _, messages, blockers = run_build(sources, options, fscache, t0, sys.stdout, sys.stderr)
    formatter = util.FancyFormatter(sys.stdout, sys.stderr, options.hide_error_codes)
    n_errors, n_notes, n_files = util.count_stats(messages)
    if n_errors:
        summary = formatter.format_error(n_errors, n_files, len(sources), blockers=blockers)
        sys.stdout.write(summary + "\n")
        return 2 if blockers else 1
    sys.stdout.write(formatter.format_success(len(sources)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
