"""The body of every Ray Tune trial: build the trainer of a run kind, resume from the newest
readable checkpoint, train, report every step and checkpoint when due.

The checkpoint format is :mod:`pact_ray.training.checkpoints`; a checkpoint that is missing,
truncated or fails its checksum is skipped in favour of the previous one kept beside it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from ray import tune

from pact_ray.errors import SweepInterrupted, first_line
from pact_ray.kinds import RunKind, resolve_kind
from pact_ray.metrics import names as M
from pact_ray.training.checkpoints import read_checkpoint, write_checkpoint
from pact_ray.tune.interrupt import TrialStop

log = logging.getLogger(__name__)


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


def restore(trainer, checkpoint: tune.Checkpoint | None, kind: str, articulation: bool = False) -> str | None:
    """Load the newest readable checkpoint into ``trainer`` (nothing when there is none).
    Returns a one-line note when an unreadable checkpoint was skipped for an older one."""
    if checkpoint is None:
        return None
    errors = []
    for cand in _candidates(checkpoint):
        try:
            with cand.as_directory() as d:
                state = read_checkpoint(Path(d), kind, articulation)
            trainer.load_state_dict(state)
            if errors:
                note = f"fell back to checkpoint {os.path.basename(cand.path.rstrip('/'))} (step {trainer.step}) after: {'; '.join(errors)}"
                log.warning(note)
                return note
            return None
        except Exception as e:  # noqa: BLE001 - a bad checkpoint falls back to the previous one
            errors.append(first_line(e))
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


def run_trial(kind: RunKind | str, trial_config: Mapping[str, Any]) -> None:
    """Train one trial of ``kind`` (a matrix trial trains as its cell's own kind). When the
    sweep is interrupted (``pact_ray.tune.interrupt``) the trial checkpoints after its
    current step and ends with :class:`SweepInterrupted`, which ``--resume`` continues."""
    stop = TrialStop(_experiment_name())
    if stop.requested():
        raise SweepInterrupted("the sweep was interrupted before this trial started")
    kind, trial_config = resolve_kind(kind, trial_config)
    cfg = kind.config(trial_config)
    trainer = kind.trainer(cfg, device=assigned_device())
    note = restore(trainer, tune.get_checkpoint(), kind.name, articulation=cfg.predicts_articulation)
    every = cfg.checkpoint_every
    while trainer.step < cfg.steps:
        metrics = trainer.train_step()
        if note:  # the driver shows it (progress line, MLflow tag): worker logs stay on the workers
            metrics, note = {**metrics, M.RESUME_NOTE: note}, None
        due = trainer.step == cfg.steps or bool(every and trainer.step % every == 0)
        interrupted = stop.requested()
        if due or interrupted:
            with tempfile.TemporaryDirectory() as d:
                write_checkpoint(Path(d), trainer.state_dict())
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(metrics)
        if interrupted and trainer.step < cfg.steps:
            raise SweepInterrupted(f"the sweep was interrupted at step {trainer.step} of {cfg.steps} (checkpointed)")


def _experiment_name() -> str | None:
    try:
        return tune.get_context().get_experiment_name()
    except Exception:  # noqa: BLE001 - outside a Tune trial (tests, benchmarks)
        return None
