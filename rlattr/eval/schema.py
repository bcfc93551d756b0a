"""The results documents of rlattr's evaluations: field names, version, building and checking.

The library owns the format, not the script that happens to write it: an experiment builds its
document with :func:`validity_document` (which checks it before it is saved), and a reader
(:mod:`rlattr.reporting.validity`, ``rlattr report``) loads one with :func:`load_validity` or checks
it with :func:`check_validity`, which name the first faulty field in a :class:`RlattrError`.

RL validity (``kind = "rl_attribution_validity"``, format 1)::

    {"format": 1, "kind": "rl_attribution_validity", "config": {...}, "seed": 0, "seconds": ..,
     "provenance": {...}, "stages": [
        {"env": "CartPole-v1", "stage": "early", "round": 1, "rollout_return": 22.5,
         "lds": {TARGET: {SCORER: {"lds": .., "lo": .., "hi": ..}, ...}, ...},
         "ceiling": {TARGET: ..},
         "intervention": {"n_dropped": 300, "full": {"return": ..},
                          "delta_bottom": {"return": .., TARGET: ..}, "delta_random": {...}}, ...}]}

TARGET and SCORER names become file names and page text, so only plain tokens are accepted. A stage
may carry more fields (timings, replay checks, correlations); these are not checked.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from rlattr.core.store import load_json
from rlattr.errors import RlattrError
from rlattr.provenance import provenance

VALIDITY_KIND = "rl_attribution_validity"
VALIDITY_FORMAT = 1
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOKEN_HELP = "letters, digits, '_' and '-' (at most 64)"
LDS_FIELDS = ("lds", "lo", "hi")


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RlattrError(f"results: {where} must be a number, got {value!r}")
    return float(value)


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        raise RlattrError(f"results: {where} must be a non-empty object, got {value!r}")
    return value


def _token(kind: str, name: Any, where: str) -> str:
    if not isinstance(name, str) or not TOKEN.fullmatch(name):
        raise RlattrError(f"results: {kind} name {name!r} in {where}; supported: {TOKEN_HELP}")
    return name


def _check_lds(where: str, lds: Any) -> dict[str, list[str]]:
    """``{target: [scorer, ...]}`` of a stage's ``lds`` mapping, every entry checked."""
    names: dict[str, list[str]] = {}
    for target, by_scorer in _mapping(f"{where}.lds", lds).items():
        _token("target", target, where)
        names[target] = []
        for scorer, value in _mapping(f"{where}.lds.{target}", by_scorer).items():
            _token("scorer", scorer, f"{where}.lds.{target}")
            cell = _mapping(f"{where}.lds.{target}.{scorer}", value)
            for key in LDS_FIELDS:
                _number(f"{where}.lds.{target}.{scorer}.{key}", cell.get(key))
            names[target].append(scorer)
    return names


def _check_intervention(where: str, iv: Any, targets: list[str]) -> None:
    iv = _mapping(f"{where}.intervention", iv)
    n = iv.get("n_dropped")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise RlattrError(f"results: {where}.intervention.n_dropped must be an int >= 0, got {n!r}")
    full = _mapping(f"{where}.intervention.full", iv.get("full"))
    _number(f"{where}.intervention.full.return", full.get("return"))
    for arm in ("delta_bottom", "delta_random"):
        delta = _mapping(f"{where}.intervention.{arm}", iv.get(arm))
        for key in ("return", *targets):
            _number(f"{where}.intervention.{arm}.{key}", delta.get(key))


def check_stage(where: str, stage: Any) -> dict[str, list[str]]:
    """Check one stage; returns its ``{target: [scorer, ...]}``."""
    stage = _mapping(where, stage)
    for key in ("env", "stage"):
        if not isinstance(stage.get(key), str) or not stage[key]:
            raise RlattrError(f"results: {where}.{key} must be a non-empty string, got {stage.get(key)!r}")
    k = stage.get("round")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise RlattrError(f"results: {where}.round must be an int >= 0, got {k!r}")
    if "rollout_return" in stage:
        _number(f"{where}.rollout_return", stage["rollout_return"])
    names = _check_lds(where, stage.get("lds"))
    ceiling = _mapping(f"{where}.ceiling", stage.get("ceiling"))
    for target in names:
        _number(f"{where}.ceiling.{target}", ceiling.get(target))
    _check_intervention(where, stage.get("intervention"), list(names))
    return names


def check_validity(results: Any) -> list[dict[str, Any]]:
    """The stages of a validity document, every field a reader uses checked; raises RlattrError."""
    if not isinstance(results, dict) or results.get("kind") != VALIDITY_KIND:
        raise RlattrError(f"results: expected a validity document (kind {VALIDITY_KIND!r})")
    fmt = results.get("format")
    if isinstance(fmt, bool) or not isinstance(fmt, int) or not 1 <= fmt <= VALIDITY_FORMAT:
        raise RlattrError(f"results: format got {fmt!r}; supported: 1 to {VALIDITY_FORMAT}")
    stages = results.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RlattrError("results: 'stages' must be a non-empty list")
    first = check_stage("stages[0]", stages[0])
    for i, stage in enumerate(stages[1:], start=1):
        names = check_stage(f"stages[{i}]", stage)
        if names != first:
            # tables and plots line stages up by the first stage's targets and scorers
            raise RlattrError(f"results: stages[{i}] has targets/scorers {names}; stages[0] has {first}")
    return stages


def validity_document(
    stages: list[dict[str, Any]], *, config: dict[str, Any], seed: int, seconds: float
) -> dict[str, Any]:
    """The validity document of ``stages`` (format, kind and provenance added), checked."""
    if not math.isfinite(seconds):
        raise RlattrError(f"seconds: must be finite, got {seconds!r}")
    doc = {
        "format": VALIDITY_FORMAT,
        "kind": VALIDITY_KIND,
        "config": config,
        "seed": seed,
        "seconds": seconds,
        "provenance": provenance(),
        "stages": stages,
    }
    check_validity(doc)
    return doc


def load_validity(path: str | Path) -> dict[str, Any]:
    """Read and check a validity document (an untrusted file: nothing in it is executed)."""
    doc = load_json(path)
    check_validity(doc)
    return doc


__all__ = [
    "VALIDITY_FORMAT",
    "VALIDITY_KIND",
    "check_stage",
    "check_validity",
    "load_validity",
    "validity_document",
]
