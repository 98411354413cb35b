"""Run configurations: one dataclass per run kind, the single source for the search space,
the MLflow params, the checkpoint and the summary table.

A config travels as a *flat* dict of scalars (``router.eps`` for nested fields): that is
what Ray Tune's ``param_space`` holds, what MLflow logs as params and what a checkpoint
stores. ``from_flat`` rebuilds and validates it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from pact_ray.ot.router import ConfigError, RouterConfig
from pact_ray.variants import STAGE1_PROFILES, STAGE1_VARIANTS, Profile, Variant, get_profile, get_variant

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
INITS = ("scratch", "official")


class RunConfig:
    """Flat-dict (de)serialisation shared by every run config dataclass."""

    kind: ClassVar[str] = ""
    nested: ClassVar[dict[str, type]] = {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[arg-type]

    def flat(self) -> dict[str, Any]:
        """Flattened scalars, nested dataclasses as ``name.field``; a missing nested block is omitted."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out.update({f"{f.name}.{k}": v for k, v in asdict(value).items()})
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, Any]):
        own = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            if rest and head in cls.nested:
                nested.setdefault(head, {})[rest] = value
            elif key in own:
                top[key] = value
            else:
                raise ConfigError(f"unknown {cls.kind} config key {key!r}")
        return cls._assemble(top, nested)

    @classmethod
    def _assemble(cls, top: dict[str, Any], nested: dict[str, dict[str, Any]]):
        from pact_ray.coerce import CoercionError, coerce_fields

        for name, sub in nested.items():
            top[name] = cls.nested[name].from_dict(sub)
        try:
            top = coerce_fields(cls, top)
        except CoercionError as e:
            raise ConfigError(str(e)) from None
        return cls(**top).validate()  # type: ignore[call-arg]

    def to_json(self) -> str:
        return json.dumps(self.flat(), sort_keys=True)

    def validate(self):
        return self


@dataclass
class Stage1RunConfig(RunConfig):
    """One Stage1 training run (a Ray Tune trial)."""

    kind: ClassVar[str] = "stage1"
    nested: ClassVar[dict[str, type]] = {"router": RouterConfig}

    variant: str = "baseline"  # named variant (pact_ray.variants); its router fields are the defaults
    profile: str = "quick"  # named profile: steps, optimizer, export, init
    model: str = "small"  # Stage1 preset: tiny, small, pact
    seed: int = 0  # model init, data order, timesteps and noise
    steps: int = 8  # optimiser steps
    batch_size: int = 2  # objects per step (all their parts are rows)
    optimizer: str = "adamw"  # adamw or sgd
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max grad norm; 0 disables clipping
    precision: str = "fp32"  # fp32, bf16 or fp16 autocast (fp16 with a grad scaler, CUDA only)
    grad_checkpointing: bool | None = None  # activation checkpointing of the blocks (None: the preset's choice)
    checkpoint_every: int = 0  # Ray checkpoint every N steps (0: only the final one)
    export_final: bool = False  # log the final checkpoint as an MLflow artifact
    init: str = "scratch"  # scratch or official (load init_checkpoint strictly)
    init_checkpoint: str = ""  # official PAct Stage1 weights (.safetensors or .pt)
    p_uncond: float = 0.0  # probability of dropping image and mask condition (CFG training)
    data: str = ""  # dataset folder; empty = synthetic data generated for the preset
    synthetic_samples: int = 32  # objects in the synthetic dataset
    data_seed: int = 0  # seed of the synthetic dataset
    fail_at_step: int = -1  # test-only fault injection: raise at this step (-1: never)
    fail_mode: str = "once"  # "once": only in an attempt that started without a checkpoint; "always"
    fail_variants: str = ""  # comma-separated variants the fault applies to ("" = every variant)
    router: RouterConfig | None = None  # None = no OT router (filled from the variant)

    @classmethod
    def for_variant(cls, variant: str, profile: str = "quick", model: str = "small", seed: int = 0, **overrides: Any) -> "Stage1RunConfig":
        """The config of ``variant`` under ``profile``; ``overrides`` may use ``router.*`` keys."""
        v = get_variant(variant, STAGE1_VARIANTS)
        p = get_profile(profile, STAGE1_PROFILES)
        flat = cls.profile_defaults(v, p)
        flat.update(variant=variant, profile=profile, model=model, seed=seed)
        flat.update(overrides)
        return cls.from_flat(flat)

    @staticmethod
    def profile_defaults(v: Variant, p: Profile) -> dict[str, Any]:
        flat: dict[str, Any] = dict(
            steps=p.steps_for(v), optimizer=p.optimizer, lr=p.lr, export_final=p.export_final,
            init=p.init, checkpoint_every=p.checkpoint_every, **p.extra,
        )
        if v.router is not None:
            flat.update({f"router.{k}": val for k, val in v.router.items()})
        return flat

    @classmethod
    def _assemble(cls, top, nested):
        # A flat dict that names a variant but carries no router block gets the variant's router.
        variant = top.get("variant", "baseline")
        v = get_variant(variant, STAGE1_VARIANTS)
        if v.router is not None:
            merged = dict(v.router)
            merged.update(nested.get("router", {}))
            nested["router"] = merged
        elif nested.get("router"):
            raise ConfigError(f"variant {variant!r} has no OT router, so router.* keys do not apply")
        return super()._assemble(top, nested)

    def validate(self) -> "Stage1RunConfig":
        from pact_ray.models.stage1 import STAGE1_PRESETS

        get_variant(self.variant, STAGE1_VARIANTS)
        get_profile(self.profile, STAGE1_PROFILES)
        if self.model not in STAGE1_PRESETS:
            raise ConfigError(f"unknown model preset {self.model!r}; choose from {', '.join(STAGE1_PRESETS)}")
        validate_training_fields(self, "the official Stage1 weights")
        if self.router is not None:
            self.router.validate()
            from pact_ray.ot.router import resolve_blocks

            resolve_blocks(self.router.blocks, STAGE1_PRESETS[self.model]["num_blocks"])
        return self

    @property
    def variant_info(self) -> Variant:
        return STAGE1_VARIANTS[self.variant]

    @property
    def phase(self) -> str:
        return STAGE1_PROFILES[self.profile].phase or self.variant_info.phase



# ---------------------------------------------------------------------- Stage2

from pact_ray.presets import STAGE2_PRESETS  # noqa: E402
from pact_ray.variants import STAGE2_PROFILES, STAGE2_VARIANTS  # noqa: E402


@dataclass
class Stage2RunConfig(RunConfig):
    """One Stage2 training run (a Ray Tune trial): the structured-latent flow with the
    articulation head (``pact_ray.models.stage2``). Fields shared with Stage1 mean the same."""

    kind: ClassVar[str] = "stage2"

    variant: str = "baseline"  # named Stage2 variant: baseline, spatial_diag, spatial_adapter
    profile: str = "quick"  # named profile: steps, optimizer, export, init
    model: str = "small"  # Stage2 preset: tiny, small, pact
    seed: int = 0  # model init, data order, voxel subsample, timesteps and noise
    steps: int = 5  # optimiser steps
    batch_size: int = 2  # objects per step (their whole-object row and part rows)
    optimizer: str = "adamw"  # adamw or sgd
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max grad norm; 0 disables clipping
    precision: str = "fp32"  # fp32, bf16 or fp16 autocast (fp16 with a grad scaler, CUDA only)
    grad_checkpointing: bool | None = None  # activation checkpointing of the blocks (None: the preset's choice)
    checkpoint_every: int = 0  # Ray checkpoint every N steps (0: only the final one)
    export_final: bool = False  # log the final checkpoint as an MLflow artifact
    init: str = "scratch"  # scratch or official (load init_checkpoint strictly)
    init_checkpoint: str = ""  # Stage2 weights of this model's layout (.safetensors or .pt)
    p_uncond: float = 0.0  # probability of dropping image and mask condition (CFG training)
    max_tokens: int = 0  # voxel tokens kept per row (a seeded subsample); 0: the preset's cap (STAGE2_MAX_TOKENS)
    art_weight: float = 1.0  # loss = flow MSE + art_weight * art_l2
    data: str = ""  # dataset folder with voxel sets; empty = synthetic data generated for the preset
    synthetic_samples: int = 32  # objects in the synthetic dataset
    data_seed: int = 0  # seed of the synthetic dataset
    fail_at_step: int = -1  # test-only fault injection: raise at this step (-1: never)
    fail_mode: str = "once"  # "once": only in an attempt that started without a checkpoint; "always"

    @classmethod
    def for_variant(cls, variant: str, profile: str = "quick", model: str = "small", seed: int = 0, **overrides: Any) -> "Stage2RunConfig":
        """The config of ``variant`` under ``profile`` with ``overrides``."""
        flat = Stage1RunConfig.profile_defaults(get_variant(variant, STAGE2_VARIANTS), get_profile(profile, STAGE2_PROFILES))
        flat.update(variant=variant, profile=profile, model=model, seed=seed)
        flat.update(overrides)
        return cls.from_flat(flat)

    def validate(self) -> "Stage2RunConfig":
        get_variant(self.variant, STAGE2_VARIANTS)
        get_profile(self.profile, STAGE2_PROFILES)
        if self.model not in STAGE2_PRESETS:
            raise ConfigError(f"unknown model preset {self.model!r}; choose from {', '.join(STAGE2_PRESETS)}")
        validate_training_fields(self, "the Stage2 weights")
        if self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be >= 0 (0: the preset's cap), got {self.max_tokens}")
        if not self.art_weight >= 0:
            raise ConfigError(f"art_weight must be >= 0, got {self.art_weight}")
        return self

    @property
    def variant_info(self) -> Variant:
        return STAGE2_VARIANTS[self.variant]

    @property
    def phase(self) -> str:
        return STAGE2_PROFILES[self.profile].phase or self.variant_info.phase


def validate_training_fields(cfg: Any, weights: str) -> None:
    """The checks of the training fields that every run config shares (steps, batch size,
    optimiser, precision, init, CFG dropout, checkpointing, synthetic data, fault mode);
    ``weights`` names what ``--checkpoint`` must point to."""
    if cfg.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {cfg.steps}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")
    if not cfg.lr > 0:
        raise ConfigError(f"lr must be > 0, got {cfg.lr}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.init not in INITS:
        raise ConfigError(f"init must be one of {INITS}, got {cfg.init!r}")
    if cfg.init == "official" and not cfg.init_checkpoint:
        raise ConfigError(f"init 'official' needs {weights}: pass --checkpoint PATH")
    if not 0 <= cfg.p_uncond < 1:
        raise ConfigError(f"p_uncond must be in [0, 1), got {cfg.p_uncond}")
    if cfg.checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be >= 0, got {cfg.checkpoint_every}")
    if cfg.synthetic_samples < cfg.batch_size:
        raise ConfigError(f"synthetic_samples ({cfg.synthetic_samples}) must be >= batch_size ({cfg.batch_size})")
    if cfg.fail_mode not in ("once", "always"):
        raise ConfigError(f"fail_mode must be 'once' or 'always', got {cfg.fail_mode!r}")
