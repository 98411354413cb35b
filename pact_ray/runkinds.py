"""The run kinds a sweep can train: each ties a config dataclass, its variants and profiles,
its trainer and its Ray trainable together, so the sweep harness, the MLflow callback and
the summary need no per-kind code."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from pact_ray.config import RunConfig, Stage1RunConfig
from pact_ray.ot.router import ConfigError
from pact_ray.variants import STAGE1_PROFILES, STAGE1_VARIANTS, Profile, Variant


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
