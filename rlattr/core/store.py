"""On-disk storage: tensors in safetensors, metadata as JSON, versioned and written atomically.

One tensor file holds ``dict[str, Tensor]`` plus a JSON metadata document in the safetensors
header (key ``"rlattr"``), so tensors and their metadata can never be out of step. The metadata
carries the format version and a SHA-256 of the tensor bytes; loading checks both. Every write
goes to a temporary file in the same folder and is then renamed over the destination, so an
interrupted write leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import Tensor

from rlattr.errors import StoreError

FORMAT_VERSION = 1
_META_KEY = "rlattr"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def load_json(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"path: no such file {str(path)!r}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StoreError(f"path: {str(path)!r} is not valid JSON ({err})") from err


def _digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return h.hexdigest()


def save_tensors(
    path: str | os.PathLike[str],
    tensors: dict[str, Tensor],
    metadata: dict[str, Any] | None = None,
    *,
    _write: Callable[[str | os.PathLike[str], bytes], Path] = atomic_write_bytes,
) -> Path:
    """Atomically write ``tensors`` and JSON-serialisable ``metadata`` to one safetensors file."""
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise TypeError("tensors: expected dict[str, Tensor]")
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    doc = {"format_version": FORMAT_VERSION, "sha256": _digest(clean), "metadata": metadata or {}}
    header = {_META_KEY: json.dumps(doc, default=str)}
    return _write(path, st_save(clean, metadata=header))


def _read_doc(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise StoreError(f"path: no such file {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise StoreError(f"path: {str(path)!r} is corrupt or not a safetensors file ({err})") from err
    if _META_KEY not in header:
        raise StoreError(f"path: {str(path)!r} was not written by rlattr (no {_META_KEY!r} metadata)")
    try:
        doc = json.loads(header[_META_KEY])
    except json.JSONDecodeError as err:
        raise StoreError(f"path: {str(path)!r} has corrupt metadata ({err})") from err
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"path: {str(path)!r} has format version {version!r}; this rlattr reads versions up to "
            f"{FORMAT_VERSION}: upgrade rlattr"
        )
    return doc


def stored_digest(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a tensor file's tensors, as its header records it (hex), without reading them."""
    return str(_read_doc(Path(path))["sha256"])


def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a tensor file, without reading its tensors."""
    return dict(_read_doc(Path(path))["metadata"])


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read ``(tensors, metadata)``; raises :class:`StoreError` if anything is off."""
    path = Path(path)
    doc = _read_doc(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise StoreError(f"path: {str(path)!r} is corrupt ({err})") from err
    if _digest(tensors) != doc.get("sha256"):
        raise StoreError(f"path: {str(path)!r} is corrupt (checksum mismatch)")
    return tensors, dict(doc["metadata"])
