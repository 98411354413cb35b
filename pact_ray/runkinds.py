"""The run kinds a sweep can train: each ties a config dataclass, its variants and profiles,
its trainer and its Ray trainable together, so the sweep harness, the MLflow callback and
the summary need no per-kind code."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from pact_ray.config import RunConfig, Stage1RunConfig
from pact_ray.ot.router import ConfigError
from pact_ray.variants import INT_KNOBS, KNOB_RANGES, STAGE1_PROFILES, STAGE1_VARIANTS, Profile, Variant


@dataclass(frozen=True)
class RunKind:
    name: str  # "stage1"
    script: str  # the sweep script; also the MLflow experiment "pact-ray/<script>"
    title: str  # "Stage1" in run labels
    config_cls: type[RunConfig]
    variants: dict[str, Variant]
    profiles: dict[str, Profile]
    trainer: str  # "module:Class"
    trainable: str  # "module:function" (the Ray Tune function trainable)
    model: str  # "module:function": config -> model
    dataset: str  # "module:function": config -> validated dataset
    metric: str = "loss"
    mode: str = "min"
    # What --search optuna tunes: a variant's knobs, named "<knob_prefix><knob>" in the trial
    # config, with (low, high, log scale) ranges; knobs in int_knobs are integers.
    knob_prefix: str = "router."
    knob_ranges: dict[str, tuple[float, float, bool]] = field(default_factory=lambda: dict(KNOB_RANGES))
    int_knobs: frozenset[str] = INT_KNOBS

    @property
    def experiment(self) -> str:
        return f"pact-ray/{self.script}"

    def config(self, trial_config: dict[str, Any]) -> RunConfig:
        """The full run config of one trial's ``config`` (variant, profile, model, seed, overrides)."""
        return self.config_cls.for_variant(**trial_config)  # type: ignore[attr-defined]

    def trainer_cls(self):
        return _load(self.trainer)

    def trainable_fn(self):
        return _load(self.trainable)

    def model_fn(self):
        return _load(self.model)

    def dataset_fn(self):
        return _load(self.dataset)


def _load(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


RUN_KINDS: dict[str, RunKind] = {
    "stage1": RunKind(
        name="stage1", script="stage1_router", title="Stage1", config_cls=Stage1RunConfig,
        variants=STAGE1_VARIANTS, profiles=STAGE1_PROFILES,
        trainer="pact_ray.training.stage1:Stage1Trainer", trainable="trainables.stage1:train_stage1",
        model="pact_ray.training.stage1:build_model", dataset="pact_ray.training.stage1:dataset_for",
    ),
}


def get_kind(name: str) -> RunKind:
    if name not in RUN_KINDS:
        raise ConfigError(f"unknown run kind {name!r}; known: {', '.join(RUN_KINDS)}")
    return RUN_KINDS[name]


# ---------------------------------------------------------------------- Stage2 and the matrix

from pact_ray.config import Stage2RunConfig  # noqa: E402
from pact_ray.variants import STAGE2_PROFILES, STAGE2_VARIANTS  # noqa: E402

RUN_KINDS["stage2"] = RunKind(
    name="stage2", script="stage2_spatial", title="Stage2", config_cls=Stage2RunConfig,
    variants=STAGE2_VARIANTS, profiles=STAGE2_PROFILES,
    trainer="pact_ray.training.stage2:Stage2Trainer", trainable="trainables.stage2:train_stage2",
    model="pact_ray.training.stage2:build_model", dataset="pact_ray.training.stage2:dataset_for",
)

# The seed's OT matrix: its cells, named "<kind>_<variant>" (the seed's run names).
MATRIX_CELLS: dict[str, tuple[str, str]] = {
    f"{kind}_{variant}": (kind, variant)
    for kind, variants in [
        ("stage1", ("baseline", "ot_first", "mask_prior", "rgb_edge", "virtual_patch", "first_third_edge")),
        ("stage2", ("spatial_diag", "spatial_adapter")),
    ]
    for variant in variants
}


@dataclass(frozen=True)
class MatrixKind(RunKind):
    """Trials of several run kinds in one sweep: each variant is a cell "<kind>_<variant>",
    and a trial of that cell is a trial of that kind (its config, trainer, checkpoints and
    MLflow tags). Use :func:`resolve_kind` to get a trial's own kind; the trainer, model and
    dataset references of the matrix itself are empty.

    Trial-config keys apply to every cell, except keys scoped to one kind,
    ``"<kind>.<key>"`` (``--set stage2.init_checkpoint=/w/stage2.pt``), which apply to
    that kind's cells only, as ``<key>``.
    """

    cells: dict[str, tuple[str, str]] | None = None

    def resolve(self, trial_config: dict[str, Any]) -> tuple[RunKind, dict[str, Any]]:
        kind, variant = self.cells[trial_config["variant"]]  # type: ignore[index]
        kinds = {k for k, _ in self.cells.values()}  # type: ignore[union-attr]
        own: dict[str, Any] = {}
        for key, value in trial_config.items():
            scope, dot, rest = key.partition(".")
            if not (dot and scope in kinds):
                own[key] = value
            elif scope == kind:
                own[rest] = value
        return get_kind(kind), {**own, "variant": variant}

    def config(self, trial_config: dict[str, Any]) -> RunConfig:
        kind, own = self.resolve(trial_config)
        return kind.config(own)


RUN_KINDS["matrix"] = MatrixKind(
    name="matrix", script="ot_matrix", title="Matrix", config_cls=RunConfig,
    variants={cell: RUN_KINDS[kind].variants[variant] for cell, (kind, variant) in MATRIX_CELLS.items()},
    profiles=STAGE1_PROFILES,  # the profile names every kind shares; each trial uses its own kind's profile
    trainer="", trainable="trainables.matrix:train_matrix", model="", dataset="", cells=MATRIX_CELLS,
)


def resolve_kind(kind: RunKind | str, trial_config: dict[str, Any]) -> tuple[RunKind, dict[str, Any]]:
    """The run kind a trial really is, and its trial config in that kind's terms: the kind
    itself for a plain kind; for the matrix, the kind of the trial's cell."""
    kind = get_kind(kind) if isinstance(kind, str) else kind
    if isinstance(kind, MatrixKind):
        return kind.resolve(trial_config)
    return kind, trial_config

# ---------------------------------------------------------------------- world model

from pact_ray.world_model_config import WM_KNOB_RANGES, WM_PROFILES, WM_VARIANTS, WorldModelRunConfig  # noqa: E402

# Tuned and early-stopped on the training loss: Tune checks its metric in every result, and
# the validation metrics come only every eval_every steps (the best weights follow val_mse).
RUN_KINDS["world_model"] = RunKind(
    name="world_model", script="mae_world_model", title="World model", config_cls=WorldModelRunConfig,
    variants=WM_VARIANTS, profiles=WM_PROFILES,
    trainer="pact_ray.training.world_model:WorldModelTrainer", trainable="trainables.world_model:train_world_model",
    model="pact_ray.training.world_model:build_model", dataset="pact_ray.training.world_model:dataset_for",
    metric="loss", mode="min", knob_prefix="", knob_ranges=WM_KNOB_RANGES, int_knobs=frozenset(),
)
