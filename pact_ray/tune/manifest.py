"""The sweep manifest: ``<storage-path>/<name>/pact_ray_sweep.json``, written when a sweep
starts and read by ``--resume`` and by the summary of Ray's result folders (the run kind,
the tracking store, the MLflow parent run, the command line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pact_ray.fileio import write_json_atomic

MANIFEST = "pact_ray_sweep.json"


def write_manifest(exp_dir: Path, content: dict[str, Any]) -> None:
    write_json_atomic(exp_dir / MANIFEST, content)


def load_manifest(exp_dir: Path) -> dict[str, Any] | None:
    """The manifest of the sweep folder ``exp_dir``; None when it has none."""
    path = exp_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
