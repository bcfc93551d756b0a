"""The store: round trip, atomic writes, version and corruption errors."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from rlattr.core import store
from rlattr.core.store import StoreError, load_metadata, load_tensors, save_json, save_tensors


def _tensors() -> dict[str, torch.Tensor]:
    return {"scores": torch.arange(6, dtype=torch.float64) - 2.5, "ids": torch.arange(12).reshape(6, 2)}


def test_round_trip(tmp_path: Path) -> None:
    path = save_tensors(tmp_path / "a" / "round.safetensors", _tensors(), {"target": "return", "k": 3})
    tensors, meta = load_tensors(path)
    assert meta == {"target": "return", "k": 3}
    assert load_metadata(path) == meta
    for name, value in _tensors().items():
        assert torch.equal(tensors[name], value) and tensors[name].dtype == value.dtype


def test_interrupted_write_leaves_previous_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "round.safetensors"
    save_tensors(path, _tensors(), {"version": "old"})

    def crash(src: str, dst: str) -> None:
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(store.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_tensors(path, {"scores": torch.zeros(3)}, {"version": "new"})
    monkeypatch.undo()
    tensors, meta = load_tensors(path)
    assert meta == {"version": "old"} and torch.equal(tensors["scores"], _tensors()["scores"])
    assert [p.name for p in tmp_path.iterdir()] == ["round.safetensors"]  # no temp file left behind


def _rewrite_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    doc = json.loads(header["__metadata__"]["rlattr"])
    edit(doc)
    header["__metadata__"]["rlattr"] = json.dumps(doc)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    path = save_tensors(tmp_path / "r.safetensors", _tensors())
    _rewrite_header(path, lambda doc: doc.update(format_version=store.FORMAT_VERSION + 1))
    with pytest.raises(StoreError, match="format version 2; this rlattr reads versions up to 1"):
        load_tensors(path)


def test_flipped_tensor_byte_is_detected(tmp_path: Path) -> None:
    path = save_tensors(tmp_path / "r.safetensors", _tensors())
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="checksum mismatch"):
        load_tensors(path)


def test_truncated_and_missing_files_are_reported(tmp_path: Path) -> None:
    path = save_tensors(tmp_path / "r.safetensors", _tensors())
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(StoreError, match="corrupt"):
        load_tensors(path)
    with pytest.raises(StoreError, match="no such file"):
        load_tensors(tmp_path / "missing.safetensors")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        store.load_json(tmp_path / "bad.json")


def test_save_json_is_atomic_and_readable(tmp_path: Path) -> None:
    path = save_json(tmp_path / "cfg.json", {"seed": 3, "env": "CartPole-v1"})
    assert store.load_json(path) == {"seed": 3, "env": "CartPole-v1"}
    assert oct(os.stat(path).st_mode)[-3:] in {"600", "644", "664"}


def test_zero_dim_tensors_round_trip_and_their_bytes_are_checked(tmp_path: Path) -> None:
    # an optimiser's step counter is a 0-dim tensor; the checksum viewed it as bytes and failed
    step = torch.tensor(7.0)
    path = save_tensors(tmp_path / "s.safetensors", {"step": step, "w": torch.ones(2)})
    tensors, _ = load_tensors(path)
    assert torch.equal(tensors["step"], step) and tensors["step"].shape == ()
    assert store._digest({"step": step}) != store._digest({"step": torch.tensor(8.0)})
    # the digest of an n-dim tensor is unchanged by the 0-dim fix: its bytes in row-major order
    w = torch.arange(6.0).reshape(2, 3)
    h = hashlib.sha256(b"w" + b"torch.float32(2, 3)" + w.numpy().tobytes())
    assert store._digest({"w": w}) == h.hexdigest()
