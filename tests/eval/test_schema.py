"""The validity results document: built and checked by the library, every fault named."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rlattr.errors import RlattrError, StoreError
from rlattr.eval.schema import (
    VALIDITY_FORMAT,
    VALIDITY_KIND,
    check_stage,
    check_validity,
    load_validity,
    validity_document,
)

REPO = Path(__file__).resolve().parents[2]


def stage(name: str = "early") -> dict[str, Any]:
    def cell() -> dict[str, float]:
        return {"lds": 0.8, "lo": 0.7, "hi": 0.85}

    return {
        "env": "CartPole-v1",
        "stage": name,
        "round": 1,
        "rollout_return": 22.5,
        "lds": {"buffer": {"grad_dot": cell(), "tracin": cell()}, "validation": {"grad_dot": cell()}},
        "ceiling": {"buffer": 0.9, "validation": 0.5},
        "intervention": {
            "n_dropped": 300,
            "full": {"return": 20.0},
            "delta_bottom": {"return": 1.5, "buffer": 0.01, "validation": 0.002},
            "delta_random": {"return": -0.5, "buffer": -0.001, "validation": -0.0003},
        },
        "seconds": 3.0,  # extra fields are kept, not checked
    }


def test_a_built_document_round_trips(tmp_path: Path) -> None:
    doc = validity_document([stage(), stage("late")], config={"subsets": 4}, seed=3, seconds=1.5)
    assert (doc["format"], doc["kind"], doc["seed"], doc["config"]) == (
        VALIDITY_FORMAT,
        VALIDITY_KIND,
        3,
        {"subsets": 4},
    )
    assert doc["provenance"]["torch"] and "git_commit" in doc["provenance"]
    (tmp_path / "v.json").write_text(json.dumps(doc))
    assert load_validity(tmp_path / "v.json") == doc
    assert check_stage("s", stage()) == {"buffer": ["grad_dot", "tracin"], "validation": ["grad_dot"]}


def test_the_stored_study_document_is_valid() -> None:
    doc = load_validity(REPO / "docs" / "results" / "validity" / "results.json")
    assert len(check_validity(doc)) == len(doc["stages"]) > 0


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set(["kind"], "other"), "results: expected a validity document (kind 'rl_attribution_validity')"),
        (_set(["format"], 2), "results: format got 2; supported: 1 to 1"),
        (_set(["stages"], []), "results: 'stages' must be a non-empty list"),
        (_set(["stages", 0, "round"], -1), "results: stages[0].round must be an int >= 0, got -1"),
        (_set(["stages", 1, "env"], 3), "results: stages[1].env must be a non-empty string, got 3"),
        (
            _set(["stages", 0, "lds", "../x"], {}),
            "results: target name '../x' in stages[0]; supported: letters, digits, '_' and '-' (at most 64)",
        ),
        (
            _set(["stages", 0, "lds", "buffer", "<b>"], {"lds": 1, "lo": 0, "hi": 1}),
            "results: scorer name '<b>' in stages[0].lds.buffer; supported: letters, digits",
        ),
        (
            _set(["stages", 0, "lds", "buffer", "tracin", "lo"], "0.7"),
            "results: stages[0].lds.buffer.tracin.lo must be a number, got '0.7'",
        ),
        (
            _set(["stages", 0, "ceiling", "validation"], KeyError),
            "results: stages[0].ceiling.validation must be a number, got None",
        ),
        (
            _set(["stages", 0, "intervention", "delta_random", "buffer"], KeyError),
            "results: stages[0].intervention.delta_random.buffer must be a number, got None",
        ),
        (
            _set(["stages", 0, "intervention", "n_dropped"], True),
            "results: stages[0].intervention.n_dropped must be an int >= 0, got True",
        ),
        (
            _set(["stages", 1, "lds", "validation", "tracin"], {"lds": 1, "lo": 0, "hi": 1}),
            "results: stages[1] has targets/scorers",
        ),
    ],
)
def test_each_fault_is_named(edit: Callable[[dict[str, Any]], None], message: str) -> None:
    doc = {"format": 1, "kind": VALIDITY_KIND, "stages": [stage(), stage("late")]}
    check_validity(copy.deepcopy(doc))
    edit(doc)
    with pytest.raises(RlattrError) as err:
        check_validity(doc)
    assert str(err.value).startswith(message)


def test_loading_names_the_file_and_the_fault(tmp_path: Path) -> None:
    (tmp_path / "v.json").write_text("{not json")
    with pytest.raises(StoreError, match="is not valid JSON"):
        load_validity(tmp_path / "v.json")
    (tmp_path / "v.json").write_text(json.dumps({"kind": VALIDITY_KIND, "format": 1, "stages": [1]}))
    with pytest.raises(RlattrError, match=r"^results: stages\[0\] must be a non-empty object, got 1$"):
        load_validity(tmp_path / "v.json")
    with pytest.raises(RlattrError, match="^seconds: must be finite, got nan$"):
        validity_document([stage()], config={}, seed=0, seconds=float("nan"))
