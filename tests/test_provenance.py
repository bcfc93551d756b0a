"""Provenance keeps the user's working-directory commit apart from rlattr's own checkout."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from rlattr.provenance import provenance, rlattr_git, workdir_git

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(cwd, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_workdir_commit_is_the_users_checkout(tmp_path, monkeypatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    _git(project, "init", "-q")
    (project / "train.py").write_text("print(1)\n")
    _git(project, "add", "train.py")
    _git(project, "commit", "-q", "-m", "first")
    sha = _git(project, "rev-parse", "HEAD")
    monkeypatch.chdir(project)
    info = provenance()
    assert info["workdir_git_commit"] == sha and info["workdir_git_dirty"] is False
    assert info["git_commit"] == rlattr_git()["git_commit"] != sha  # rlattr's own, recorded apart
    (project / "train.py").write_text("print(2)\n")
    assert workdir_git() == {"workdir_git_commit": sha, "workdir_git_dirty": True}


def test_no_checkout_no_commit(tmp_path) -> None:
    assert workdir_git(tmp_path) == {"workdir_git_commit": None, "workdir_git_dirty": None}
