"""Files that are never seen half-written: write beside, then rename into place."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# The manifest in each sweep's folder (pact_ray.tune.manifest writes it, the report's reader of
# Ray's result folders finds sweeps by it): the file name is the one thing both need.
SWEEP_MANIFEST = "pact_ray_sweep.json"


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``: a
    reader sees the old file or the new one, never a part of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True))


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
