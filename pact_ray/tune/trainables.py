"""The Ray Tune function trainables, one per run kind (thin: the body is ``trial.run_trial``).

Ray pickles them by reference (module and name), so every worker imports this module. It is
torch-free, and so is the driver that hands them to Tune: ``trial`` (torch) is imported by the
trial itself, in the worker.
"""

from __future__ import annotations

from typing import Callable

from pact_ray.runs.kinds import MATRIX, STAGE1, STAGE2, WORLD_MODEL, RunKind


def _run(kind: RunKind, config: dict) -> None:
    from pact_ray.tune.trial import run_trial

    run_trial(kind, config)


def train_stage1(config: dict) -> None:
    """One Stage1 trial: ``config`` holds variant, profile, model, seed and overrides."""
    _run(STAGE1, config)


def train_stage2(config: dict) -> None:
    """One Stage2 trial: ``config`` holds variant, profile, model, seed and overrides."""
    _run(STAGE2, config)


def train_matrix(config: dict) -> None:
    """One OT-matrix trial: ``config["variant"]`` names a cell "<kind>_<variant>" (registry.MATRIX_CELLS)."""
    _run(MATRIX, config)


def train_world_model(config: dict) -> None:
    """One world-model trial: ``config`` holds variant, profile, model, seed and overrides."""
    _run(WORLD_MODEL, config)


TRAINABLES: dict[str, Callable[[dict], None]] = {
    STAGE1.name: train_stage1, STAGE2.name: train_stage2, MATRIX.name: train_matrix, WORLD_MODEL.name: train_world_model,
}
