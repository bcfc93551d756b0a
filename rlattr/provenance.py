"""What produced a result: library versions, rlattr's git commit, the machine and the command.

:func:`provenance` is the one place every run folder (``run.json``, the SB3 runner's
``run_info.json``) and every experiment script gets this from, so a result document always says the
same things in the same keys.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

# the libraries whose versions shape the numbers (distribution names; None when not installed)
PACKAGES = ("torch", "numpy", "stable-baselines3", "gymnasium", "trl", "transformers", "scikit-learn")
# the folders of the rlattr checkout whose uncommitted changes make git_commit an incomplete record
SOURCE_DIRS = ("rlattr", "callbacks", "experiments", "configs")


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def rlattr_git() -> dict[str, Any]:
    """``{"git_commit": sha | None, "git_dirty": bool | None}`` of the checkout rlattr is imported
    from (None when rlattr is installed from a wheel, or git is missing)."""
    here = Path(__file__).resolve().parent
    commit = _git("rev-parse", "HEAD", cwd=here) or None
    top = _git("rev-parse", "--show-toplevel", cwd=here) if commit else None
    if not commit or not top:
        return {"git_commit": None, "git_dirty": None}
    status = _git("status", "--porcelain", "--", *SOURCE_DIRS, cwd=Path(top))
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def workdir_git(cwd: Path | None = None) -> dict[str, Any]:
    """``{"workdir_git_commit": sha | None, "workdir_git_dirty": bool | None}`` of the git checkout
    that holds the working directory (the user's project, which may not be rlattr's checkout)."""
    where = Path.cwd() if cwd is None else cwd
    commit = _git("rev-parse", "HEAD", cwd=where) or None
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=where) if commit else None
    return {"workdir_git_commit": commit, "workdir_git_dirty": None if status is None else bool(status)}


def provenance() -> dict[str, Any]:
    """Versions of rlattr, python and :data:`PACKAGES`, rlattr's git commit (and whether its sources
    differ from it), the git commit of the working directory's checkout (the user's code, kept apart
    from rlattr's own), the platform, the machine and the command line."""
    import rlattr

    out: dict[str, Any] = {"rlattr": rlattr.__version__, "python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out.update(rlattr_git())
    out.update(workdir_git())
    out["platform"] = platform.platform()
    out["machine"] = platform.machine()
    out["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    return out


__all__ = ["PACKAGES", "provenance", "rlattr_git", "workdir_git"]
