"""The run kinds a sweep can train, listed once (:data:`RUN_KINDS`): each ties a config
class to its trainer, model builder, dataset and sweep summary, so that the Ray Tune layer
(its trainables, its help and ``--set`` examples), the MLflow callback and the report need
no per-kind code. The OT matrix is a kind whose trials are trials of other kinds.

The trainers, models and datasets need torch and the summaries need MLflow's client; the
configs need neither. So each kind names them by plain functions that import them when
called: a sweep's driver reads the kinds and checks every config without torch, and imports
the rest while Ray starts (:mod:`pact_ray.tune.prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Mapping

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

if TYPE_CHECKING:
    from pact_ray.report.sweep_summary import SummaryRequest, SweepSummary


# ------------------------------------------ what each kind runs (imported when called)

def _stage1_training() -> ModuleType:
    import pact_ray.training.stage1 as module

    return module


def _stage1_trainer(cfg: Any, device: Any = None) -> Any:
    return _stage1_training().Stage1Trainer(cfg, device=device)


def _stage1_model(cfg: Any) -> Any:
    return _stage1_training().build_model(cfg)


def _stage1_dataset(cfg: Any) -> Any:
    return _stage1_training().dataset_for(cfg)


def _stage2_training() -> ModuleType:
    import pact_ray.training.stage2 as module

    return module


def _stage2_trainer(cfg: Any, device: Any = None) -> Any:
    return _stage2_training().Stage2Trainer(cfg, device=device)


def _stage2_model(cfg: Any) -> Any:
    return _stage2_training().build_model(cfg)


def _stage2_dataset(cfg: Any) -> Any:
    return _stage2_training().dataset_for(cfg)


def _world_model_training() -> ModuleType:
    import pact_ray.training.world_model as module

    return module


def _world_model_trainer(cfg: Any, device: Any = None) -> Any:
    return _world_model_training().WorldModelTrainer(cfg, device=device)


def _world_model_model(cfg: Any) -> Any:
    return _world_model_training().build_model(cfg)


def _world_model_dataset(cfg: Any) -> Any:
    return _world_model_training().dataset_for(cfg)


def _ablation_summary(request: SummaryRequest) -> SweepSummary:
    from pact_ray.report.sweep_summary import ablation_summary

    return ablation_summary(request)


def _world_model_summary(request: SummaryRequest) -> SweepSummary:
    from pact_ray.report.sweep_summary import world_model_summary

    return world_model_summary(request)


@dataclass(frozen=True)
class RunKind:
    name: str  # "stage1"
    script: str  # the sweep script; also the MLflow experiment "pact-ray/<script>"
    title: str  # "Stage1" in run labels
    config_cls: type[RunConfig] | None  # None for the matrix (each trial has its cell's kind)
    trainer: Callable[..., Any] | None  # (config, device=None) -> Trainer
    build_model: Callable[[Any], Any] | None  # config -> model
    dataset: Callable[[Any], Any] | None  # config -> validated dataset
    training: Callable[[], ModuleType] | None  # imports the kind's training module (torch): the trainer's, model's and data's
    # The name of that module: what a local Ray's idle workers import as they boot (Ray's
    # preload takes names; pact_ray.tune.fast_start). tests/test_layout.py checks it.
    trainer_module: str | None
    knobs: Mapping[str, Knob]  # what --search optuna may tune, by flat config key
    summarize: Callable[[SummaryRequest], SweepSummary]  # the sweep's summary: files, printout, verdicts
    set_example: str  # a --set example for the help: keys of this kind's config
    # Variants compared with a baseline in the ablation dashboard (the world model has its own report).
    ablation: bool = True
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
    trainer=_stage1_trainer, build_model=_stage1_model, dataset=_stage1_dataset, training=_stage1_training, trainer_module="pact_ray.training.stage1",
    knobs=STAGE1_KNOBS, summarize=_ablation_summary, set_example="lr=3e-4, batch_size=4, router.eps=0.1",
)
# Stage2 exists to regress articulation: PAct's Stage2 is judged on it (the articulation
# error over the valid slots), with the decoded joint-type and label accuracies beside it; the
# flow loss is the latent half of the objective.
STAGE2 = RunKind(
    name="stage2", script="stage2_spatial", title="Stage2", config_cls=Stage2RunConfig,
    trainer=_stage2_trainer, build_model=_stage2_model, dataset=_stage2_dataset, training=_stage2_training, trainer_module="pact_ray.training.stage2",
    knobs={}, summarize=_ablation_summary, set_example="lr=3e-4, art_weight=0.5, max_tokens=32", val_metric=M.VAL_ART_L2,
    secondary_metrics=(M.VAL_ART_TYPE_ACC, M.VAL_ART_LABEL_ACC, M.VAL_LOSS),
    val_metrics=(M.VAL_ART_L2, M.VAL_ART_TYPE_ACC, M.VAL_ART_LABEL_ACC, M.VAL_LOSS, M.VAL_FLOW_LOSS),
)
# Compared, tuned and early-stopped on val_mse (ASHA at validated rungs); the best weights
# follow val_mse too.
WORLD_MODEL = RunKind(
    name="world_model", script="mae_world_model", title="World model", config_cls=WorldModelRunConfig,
    trainer=_world_model_trainer, build_model=_world_model_model, dataset=_world_model_dataset, training=_world_model_training,
    trainer_module="pact_ray.training.world_model", knobs=WM_KNOBS, summarize=_world_model_summary, ablation=False,
    set_example="lr=5e-4, mask=target_random, eval_every=10", val_metric=M.VAL_MSE,
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
    training=None, trainer_module=None, knobs={}, summarize=_ablation_summary,
    set_example="lr=3e-4, stage1.router.eps=0.1, stage2.art_weight=0.5", cells=MATRIX_CELLS,
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
