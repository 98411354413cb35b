"""The sweep manifest: ``<storage-path>/<name>/pact_ray_sweep.json``, written when a sweep
starts and read by ``--resume`` and by the summary of Ray's result folders (the run kind,
the tracking store, the MLflow parent run, the command line). It lives beside Ray's state,
on whatever storage the sweep uses (a local or shared folder, or an object store)."""

from __future__ import annotations

from typing import Any

from pact_ray.fileio import SWEEP_MANIFEST
from pact_ray.tune.storage import Storage

MANIFEST = SWEEP_MANIFEST


def write_manifest(exp_dir: Storage, content: dict[str, Any]) -> None:
    exp_dir.write_json(MANIFEST, content)


def load_manifest(exp_dir: Storage) -> dict[str, Any] | None:
    """The manifest of the sweep folder ``exp_dir``; None when it has none."""
    return exp_dir.read_json(MANIFEST)
