"""The example configs of ``rlattr train``, shipped inside the package.

``rlattr train cartpole`` reads ``cartpole.yaml`` from here (from any folder);
``rlattr init-config cartpole my.yaml`` copies it out to edit. The study configs in the
repository's ``configs/iif/`` and ``configs/validity.yaml`` belong to the study scripts in
``experiments/``: :func:`check_not_study_config` names the command that reads them.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from rlattr.errors import ConfigError

# top-level keys that only a study config has -> the command that reads that kind of config
_STUDY_KEYS: dict[str, tuple[frozenset[str], str]] = {
    "IIF sample-efficiency study": (
        frozenset({"rounds", "iif", "eval", "metric", "notes", "optimizer"}),
        "python experiments/iif_sample_efficiency.py CONFIG",
    ),
    "counterfactual validity study": (
        frozenset({"subsets", "fraction", "noise_subsets", "scorers", "intervention", "envs"}),
        "python experiments/rl_attribution_validity.py --config CONFIG",
    ),
}


def shipped_names() -> list[str]:
    """Names of the shipped configs (``["cartpole", "lunarlander"]``)."""
    root = resources.files(__name__)
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def shipped_text(name: str) -> str:
    """The YAML text of the shipped config ``name`` (``"cartpole"`` or ``"cartpole.yaml"``)."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if stem not in shipped_names():
        raise ConfigError(
            f"config: got {name!r}, neither a file nor a shipped config; supported: {shipped_names()}"
        )
    return resources.files(__name__).joinpath(f"{stem}.yaml").read_text()


def resolve(config: str | os.PathLike[str]) -> tuple[str, str]:
    """``(source, yaml_text)`` for a YAML file path, or else the name of a shipped config."""
    path = Path(config)
    if path.is_file():
        return str(path), path.read_text()
    return f"<shipped config {str(config)!r}>", shipped_text(str(config))


def check_not_study_config(data: Any, source: str) -> None:
    """Fail with the command that reads it when ``data`` is a study config, not a ``rlattr train`` one."""
    if not isinstance(data, dict) or "callback" in data:
        return
    for study, (keys, command) in _STUDY_KEYS.items():
        found = sorted(keys & set(data))
        if found:
            raise ConfigError(
                f"{source}: this is a config of the {study} (keys {found}), not of `rlattr train`; "
                f"run it with `{command.replace('CONFIG', source)}`. `rlattr train` reads the schema "
                f"of `rlattr init-config cartpole` (shipped: {shipped_names()})"
            )


def write_copy(name: str, path: str | os.PathLike[str] | None = None) -> Path:
    """Copy the shipped config ``name`` to ``path`` (default ``./{name}.yaml``); never overwrites."""
    from rlattr.core.store import atomic_write_bytes

    text = shipped_text(name)
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    out = Path(path) if path is not None else Path(f"{stem}.yaml")
    if out.is_dir():
        out = out / f"{stem}.yaml"
    if out.exists():
        raise ConfigError(f"path: {str(out)!r} exists already; supported: a new file name")
    atomic_write_bytes(out, text.encode())
    return out


__all__ = ["check_not_study_config", "resolve", "shipped_names", "shipped_text", "write_copy"]
