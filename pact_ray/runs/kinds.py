"""The run kinds a sweep can train. Each ties a config class, its trainer, model builder and
dataset together, so the Ray Tune layer, the MLflow callback and the summary need no
per-kind code. The OT matrix is a kind whose trials are trials of other kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pact_ray.errors import ConfigError
from pact_ray.metrics import names as M
from pact_ray.runs.config import RunConfig
from pact_ray.runs.registry import (
    MATRIX_CELLS,
    STAGE1_KNOBS,
    WM_KNOBS,
    Knob,
    Profile,
    Variant,
)
from pact_ray.runs.stage1 import Stage1RunConfig
from pact_ray.runs.stage2 import Stage2RunConfig
from pact_ray.runs.world_model import WorldModelRunConfig


@dataclass(frozen=True)
class _Lazy:
    """``module.name``, imported on the first call. The trainers, models and datasets need
    torch; the configs do not, so a sweep's driver reads the kinds and checks every config
    without it, and imports torch while Ray starts (pact_ray.tune.sweep)."""

    module: str
    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)


def _training(module: str, trainer: str) -> dict[str, _Lazy]:
    where = f"pact_ray.training.{module}"
    return {"trainer": _Lazy(where, trainer), "build_model": _Lazy(where, "build_model"), "dataset": _Lazy(where, "dataset_for")}


@dataclass(frozen=True)
class RunKind:
    name: str  # "stage1"
    script: str  # the sweep script; also the MLflow experiment "pact-ray/<script>"
    title: str  # "Stage1" in run labels
    config_cls: type[RunConfig] | None  # None for the matrix (each trial has its cell's kind)
    trainer: Callable[..., Any] | None  # trainer class: (config, device=None) -> Trainer
    build_model: Callable[[Any], Any] | None  # config -> model
    dataset: Callable[[Any], Any] | None  # config -> validated dataset
    knobs: Mapping[str, Knob]  # what --search optuna may tune, by flat config key
    metric: str = M.LOSS  # what Tune's searchers and schedulers read: reported at every step
    mode: str = "min"
    # The primary metric: what the verdicts compare variants on (held-out, at equal steps), what
    # Optuna optimises and adaptive seeds decide on. --metric picks another of val_metrics.
    val_metric: str = M.VAL_LOSS
    # Shown beside the primary metric with their intervals, outside the verdicts' family.
    secondary_metrics: tuple[str, ...] = ()
    # Every validation metric the kind logs at its evaluation steps (what --metric accepts).
    val_metrics: tuple[str, ...] = (M.VAL_LOSS, M.VAL_FLOW_LOSS)

    @property
    def val_mode(self) -> str:
        """"min" or "max" for the primary metric."""
        return M.metric_mode(self.val_metric)

    @property
    def variants(self) -> Mapping[str, Variant]:
        return self.config_cls.variants

    @property
    def profiles(self) -> Mapping[str, Profile]:
        return self.config_cls.profiles

    @property
    def presets(self) -> tuple[str, ...]:
        return self.config_cls.presets

    @property
    def experiment(self) -> str:
        return f"pact-ray/{self.script}"

    def config(self, trial_config: Mapping[str, Any]) -> RunConfig:
        """The full run config of one trial's ``config`` (variant, profile, model, seed, overrides)."""
        return self.config_cls.for_variant(**trial_config)


STAGE1 = RunKind(
    name="stage1", script="stage1_router", title="Stage1", config_cls=Stage1RunConfig,
    **_training("stage1", "Stage1Trainer"), knobs=STAGE1_KNOBS,
)
# Stage2 exists to regress articulation: PAct's Stage2 is judged on it (the articulation
# error over the valid slots), with the decoded joint-type and label accuracies beside it; the
# flow loss is the latent half of the objective.
STAGE2 = RunKind(
    name="stage2", script="stage2_spatial", title="Stage2", config_cls=Stage2RunConfig,
    **_training("stage2", "Stage2Trainer"), knobs={}, val_metric=M.VAL_ART_L2,
    secondary_metrics=(M.VAL_ART_TYPE_ACC, M.VAL_ART_LABEL_ACC, M.VAL_LOSS),
    val_metrics=(M.VAL_ART_L2, M.VAL_ART_TYPE_ACC, M.VAL_ART_LABEL_ACC, M.VAL_LOSS, M.VAL_FLOW_LOSS),
)
# Compared, tuned and early-stopped on val_mse (ASHA at validated rungs); the best weights
# follow val_mse too.
WORLD_MODEL = RunKind(
    name="world_model", script="mae_world_model", title="World model", config_cls=WorldModelRunConfig,
    **_training("world_model", "WorldModelTrainer"), knobs=WM_KNOBS, val_metric=M.VAL_MSE,
    secondary_metrics=(M.VAL_MSE_VISUAL, M.VAL_MSE_MOTOR_STRIP),
    val_metrics=(M.VAL_MSE, M.VAL_MSE_VISUAL, M.VAL_MSE_MOTOR_STRIP, M.VAL_MSE_STATIC, M.VAL_MSE_DYNAMIC),
)
RUN_KINDS: dict[str, RunKind] = {k.name: k for k in (STAGE1, STAGE2, WORLD_MODEL)}


@dataclass(frozen=True)
class MatrixKind(RunKind):
    """Trials of several run kinds in one sweep: each variant is a cell "<kind>_<variant>",
    and a trial of that cell is a trial of that kind (its config, trainer, checkpoints and
    MLflow tags). Use :func:`resolve_kind` to get a trial's own kind.

    Trial-config keys apply to every cell, except keys scoped to one kind,
    ``"<kind>.<key>"`` (``--set stage2.init_checkpoint=/w/stage2.pt``), which apply to
    that kind's cells only, as ``<key>``.
    """

    cells: Mapping[str, tuple[str, str]] = None  # type: ignore[assignment]

    @property
    def variants(self) -> Mapping[str, Variant]:
        return {cell: RUN_KINDS[kind].variants[variant] for cell, (kind, variant) in self.cells.items()}

    @property
    def profiles(self) -> Mapping[str, Profile]:
        # The profile names every kind of the matrix shares; each trial uses its own kind's profile.
        return RUN_KINDS["stage1"].profiles

    @property
    def presets(self) -> tuple[str, ...]:
        return RUN_KINDS["stage1"].presets

    def resolve(self, trial_config: Mapping[str, Any]) -> tuple[RunKind, dict[str, Any]]:
        kind, variant = self.cells[trial_config["variant"]]
        kinds = {k for k, _ in self.cells.values()}
        own: dict[str, Any] = {}
        for key, value in trial_config.items():
            scope, dot, rest = key.partition(".")
            if not (dot and scope in kinds):
                own[key] = value
            elif scope == kind:
                own[rest] = value
        return RUN_KINDS[kind], {**own, "variant": variant}

    def config(self, trial_config: Mapping[str, Any]) -> RunConfig:
        kind, own = self.resolve(trial_config)
        return kind.config(own)


MATRIX = MatrixKind(
    name="matrix", script="ot_matrix", title="Matrix", config_cls=None, trainer=None, build_model=None, dataset=None,
    knobs={}, cells=MATRIX_CELLS,
)
RUN_KINDS[MATRIX.name] = MATRIX


def get_kind(name: str) -> RunKind:
    if name not in RUN_KINDS:
        raise ConfigError(f"unknown run kind {name!r}; known: {', '.join(RUN_KINDS)}")
    return RUN_KINDS[name]


def resolve_kind(kind: RunKind | str, trial_config: Mapping[str, Any]) -> tuple[RunKind, dict[str, Any]]:
    """The run kind a trial really is, and its trial config in that kind's terms: the kind
    itself for a plain kind; for the matrix, the kind of the trial's cell."""
    kind = get_kind(kind) if isinstance(kind, str) else kind
    if isinstance(kind, MatrixKind):
        return kind.resolve(trial_config)
    return kind, dict(trial_config)
