"""The body of every Ray Tune trial: build the trainer of a run kind, resume from the newest
readable checkpoint, train, report every step and checkpoint when due.

Checkpoints are a folder with ``state.pt`` (model, optimiser, step, RNG, config; loaded with
``weights_only=True``) and ``meta.json`` (step, kind, sha256 of ``state.pt``). A checkpoint
whose file is missing, truncated or fails its checksum is skipped in favour of the previous
one kept beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from pact_ray.runkinds import resolve_kind

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    torch.save(state, folder / STATE_FILE)
    meta = {"step": state["step"], "kind": state["kind"], "sha256": _sha256(folder / STATE_FILE), "config": state["config"]}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))


def read_checkpoint(folder: Path, kind: str) -> dict[str, Any]:
    """Load and verify one checkpoint folder; raises ValueError with the reason."""
    meta_path, state_path = folder / META_FILE, folder / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise ValueError(f"checkpoint {folder} lacks {META_FILE} or {STATE_FILE}")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"checkpoint {folder} is a {meta.get('kind')!r} checkpoint, not {kind!r}")
    if _sha256(state_path) != meta.get("sha256"):
        raise ValueError(f"checkpoint {folder} is corrupted (checksum mismatch)")
    return torch.load(state_path, map_location="cpu", weights_only=True)


def _candidates(checkpoint: tune.Checkpoint) -> list[tune.Checkpoint]:
    """The checkpoint Ray hands back, then older ones kept beside it, newest first."""
    out = [checkpoint]
    try:
        fs, path = checkpoint.filesystem, checkpoint.path
        parent = os.path.dirname(path.rstrip("/"))
        from pyarrow.fs import FileSelector, FileType

        siblings = [i.path for i in fs.get_file_info(FileSelector(parent)) if i.type == FileType.Directory
                    and os.path.basename(i.path).startswith("checkpoint_") and i.path.rstrip("/") != path.rstrip("/")]
        out += [tune.Checkpoint(p, filesystem=fs) for p in sorted(siblings, reverse=True)]
    except Exception as e:  # noqa: BLE001 - listing is best effort; the main checkpoint is still tried
        log.warning("could not list older checkpoints: %s", e)
    return out


def restore(trainer, checkpoint: tune.Checkpoint | None, kind: str) -> None:
    if checkpoint is None:
        return
    errors = []
    for cand in _candidates(checkpoint):
        try:
            with cand.as_directory() as d:
                state = read_checkpoint(Path(d), kind)
            trainer.load_state_dict(state)
            if errors:
                log.warning("fell back to checkpoint %s after: %s", cand.path, "; ".join(errors))
            return
        except Exception as e:  # noqa: BLE001 - a bad checkpoint falls back to the previous one
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    raise RuntimeError("no readable checkpoint to resume from: " + "; ".join(errors))


def assigned_device() -> torch.device:
    """CUDA when Ray assigned this trial a GPU (fractional ones included), else CPU."""
    try:
        import ray

        res = ray.get_runtime_context().get_assigned_resources()
    except Exception:  # noqa: BLE001 - outside Ray (tests, benchmarks)
        res = {}
    cpus = res.get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
    if res.get("GPU", 0) > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def run_trial(kind_name: str, trial_config: dict[str, Any]) -> None:
    """Train one trial of ``kind_name`` (a matrix trial trains as its cell's own kind)."""
    kind, trial_config = resolve_kind(kind_name, trial_config)
    cfg = kind.config(trial_config)
    trainer = kind.trainer_cls()(cfg, device=assigned_device())
    restore(trainer, tune.get_checkpoint(), kind.name)
    every = cfg.checkpoint_every
    while trainer.step < cfg.steps:
        metrics = trainer.train_step()
        if trainer.step == cfg.steps or (every and trainer.step % every == 0):
            with tempfile.TemporaryDirectory() as d:
                write_checkpoint(Path(d), trainer.state_dict())
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(metrics)
