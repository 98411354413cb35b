"""The world-model run kind: its run config, named variants and profiles, and the ranges
of the knobs an Optuna search tunes (``shared/specs/world_model.md``).

A variant fixes what the comparison changes (model type, mask strategy, and for the
sized variants the size preset); a profile fixes how long and how a run trains and how
often it is evaluated. ``--model`` (the config's ``model``) is the size preset of the
variants that do not fix one (``mae``, ``mae_random``, ``gpt``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pact_ray.config import OPTIMIZERS, PRECISIONS, RunConfig
from pact_ray.models.world_model import MASKS, PRESET_NAMES, WorldModelConfig, preset_config
from pact_ray.ot.router import ConfigError
from pact_ray.variants import Profile, Variant, get_profile, get_variant

# Continuous knobs an Optuna search may tune (top-level config fields), with their
# search ranges: (low, high, log scale).
WM_KNOB_RANGES: dict[str, tuple[float, float, bool]] = {
    "lr": (1e-4, 3e-3, True),
    "weight_decay": (1e-3, 0.2, True),
    "context_mask_ratio": (0.05, 0.75, False),
}


@dataclass(frozen=True)
class WorldModelVariant(Variant):
    """A world-model variant: the model type, its training mask and (optionally) its size."""

    model_type: str = "mae"
    mask: str = "target"
    preset: str | None = None  # None: the size given by --model
    stage: str = "world_model"


_MAE_KNOBS = ("lr", "weight_decay")
_RANDOM_KNOBS = _MAE_KNOBS + ("context_mask_ratio",)

WM_VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        WorldModelVariant("mae", "iter3", "MAE: the whole target frame masked and reconstructed in one pass.",
                          knobs=_MAE_KNOBS, title="MAE"),
        WorldModelVariant("mae_random", "iter3", "MAE that also masks a random fraction of the context patches while training.",
                          mask="target_random", knobs=_RANDOM_KNOBS, title="MAE random mask"),
        WorldModelVariant("gpt", "iter2", "GPT baseline: raster-order autoregressive over the target patches.",
                          model_type="gpt", knobs=_MAE_KNOBS, title="GPT"),
        WorldModelVariant("mae_tiny", "iter3", "MAE, tiny preset (embed 64, depth 2; decoder 32 x 1).",
                          preset="tiny", knobs=_MAE_KNOBS, title="MAE tiny"),
        WorldModelVariant("mae_small", "iter3", "MAE, small preset (embed 192, depth 4; decoder 96 x 2).",
                          preset="small", knobs=_MAE_KNOBS, title="MAE small"),
        WorldModelVariant("mae_seed", "iter3", "MAE at the seed's size (embed 384, depth 8; decoder 192 x 4).",
                          preset="seed", knobs=_MAE_KNOBS, title="MAE seed"),
        WorldModelVariant("gpt_small", "iter2", "GPT baseline, small preset (embed 192, depth 6).",
                          model_type="gpt", preset="small", knobs=_MAE_KNOBS, title="GPT small"),
        WorldModelVariant("gpt_seed", "iter2", "GPT baseline at the seed's iteration-2 size (embed 384, depth 12).",
                          model_type="gpt", preset="seed", knobs=_MAE_KNOBS, title="GPT seed"),
    ]
}

WM_PROFILES: dict[str, Profile] = {
    p.name: p
    for p in [
        Profile("smoke", 1, 1, None, lr=1e-3,
                extra=dict(eval_every=1, batch_size=4, eval_samples=8, synthetic_episodes=8, episode_length=12)),
        Profile("quick", 60, 60, "matrix", title="Matrix", lr=1e-3, checkpoint_every=30,
                extra=dict(eval_every=30, batch_size=8, eval_samples=48)),
        Profile("full", 3000, 3000, "full", lr=5e-4, export_final=True, checkpoint_every=500,
                extra=dict(eval_every=250, batch_size=32, eval_samples=0, synthetic_episodes=96, episode_length=32)),
    ]
}


@dataclass
class WorldModelRunConfig(RunConfig):
    """One world-model training run (a Ray Tune trial)."""

    kind: ClassVar[str] = "world_model"

    variant: str = "mae"  # named variant (WM_VARIANTS): model type, mask, maybe size
    profile: str = "quick"  # named profile (WM_PROFILES): steps, evaluation, export
    model: str = "small"  # size preset: tiny, small, seed (a sized variant fixes its own)
    seed: int = 0  # model init, batch order and masking noise
    model_type: str = "mae"  # mae or gpt (the variant's; an override must agree)
    mask: str = "target"  # MAE training mask: target or target_random
    context_mask_ratio: float = 0.25  # target_random: fraction of context patches also masked
    embed_dim: int = 0  # encoder (GPT) width; 0: the preset's
    depth: int = 0  # encoder (GPT) blocks; 0: the preset's
    decoder_embed_dim: int = 0  # MAE decoder width; 0: the preset's
    decoder_depth: int = 0  # MAE decoder blocks; 0: the preset's
    patch_size: int = 8
    context_frames: int = 2  # frames before the target
    steps: int = 60  # optimiser steps
    batch_size: int = 8  # samples per step
    optimizer: str = "adamw"  # adamw or sgd
    lr: float = 1e-3
    weight_decay: float = 0.05
    grad_clip: float = 1.0  # max grad norm; 0 disables clipping
    precision: str = "fp32"  # fp32, bf16 or fp16 autocast (fp16 with a grad scaler, CUDA only)
    eval_every: int = 30  # validation metrics every N steps (and at the last step)
    eval_samples: int = 48  # validation samples scored (an even spread over the split); 0: all
    checkpoint_every: int = 30  # Ray checkpoint every N steps (0: only the final one)
    export_final: bool = False  # log the final checkpoint (with the best weights) as an MLflow artifact
    data: str = ""  # LeRobot-style folder; empty = the synthetic arm data set (cached)
    image_size: int = 64  # H = W of the model's frames, motor strip included
    val_fraction: float = 0.25  # episodes held out for validation
    synthetic_episodes: int = 24  # synthetic data: episodes
    episode_length: int = 24  # synthetic data: frames per episode
    data_seed: int = 0  # synthetic data: generator seed; also the train/validation split seed
    fail_at_step: int = -1  # test-only fault injection: raise at this step (-1: never)
    fail_mode: str = "once"  # "once": only in an attempt that started without a checkpoint; "always"
    fail_variants: str = ""  # comma-separated variants the fault applies to ("" = every variant)

    @classmethod
    def for_variant(cls, variant: str, profile: str = "quick", model: str = "small", seed: int = 0,
                    **overrides: Any) -> WorldModelRunConfig:
        """The config of ``variant`` under ``profile``; a sized variant replaces ``model``."""
        v = get_variant(variant, WM_VARIANTS)
        p = get_profile(profile, WM_PROFILES)
        flat: dict[str, Any] = dict(steps=p.steps_for(v), optimizer=p.optimizer, lr=p.lr, export_final=p.export_final,
                                    checkpoint_every=p.checkpoint_every, **p.extra)
        flat.update(model_type=v.model_type, mask=v.mask)
        flat.update(variant=variant, profile=profile, model=v.preset or model, seed=seed)
        flat.update(overrides)
        return cls.from_flat(flat)

    def validate(self) -> WorldModelRunConfig:
        v = get_variant(self.variant, WM_VARIANTS)
        get_profile(self.profile, WM_PROFILES)
        if self.model not in PRESET_NAMES:
            raise ConfigError(f"unknown world model preset {self.model!r}; choose from {', '.join(PRESET_NAMES)}")
        if v.preset and self.model != v.preset:
            raise ConfigError(f"variant {self.variant!r} is the {v.preset!r} preset, not {self.model!r}")
        if self.model_type != v.model_type:
            raise ConfigError(f"variant {self.variant!r} is a {v.model_type} model; model_type {self.model_type!r} does not apply")
        if self.mask not in MASKS:
            raise ConfigError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if self.model_type == "gpt" and self.mask != "target":
            raise ConfigError(f"mask {self.mask!r} applies to MAE models only; the GPT always predicts the whole target")
        for name in ("steps", "batch_size", "eval_every", "context_frames", "patch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("embed_dim", "depth", "decoder_embed_dim", "decoder_depth", "eval_samples", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.synthetic_episodes < 2:
            raise ConfigError(f"synthetic_episodes must be >= 2 (training and validation episodes), got {self.synthetic_episodes}")
        if self.episode_length < self.context_frames + 1:
            raise ConfigError(f"episode_length ({self.episode_length}) must exceed context_frames ({self.context_frames})")
        if self.fail_mode not in ("once", "always"):
            raise ConfigError(f"fail_mode must be 'once' or 'always', got {self.fail_mode!r}")
        try:
            self.model_config()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    def model_config(self) -> WorldModelConfig:
        """The architecture: the preset of (model_type, model) with this run's overrides."""
        sizes = {k: getattr(self, k) for k in ("embed_dim", "depth", "decoder_embed_dim", "decoder_depth") if getattr(self, k)}
        return preset_config(self.model_type, self.model, image_size=self.image_size, patch_size=self.patch_size,
                             context_frames=self.context_frames, mask=self.mask,
                             context_mask_ratio=self.context_mask_ratio, **sizes)

    @property
    def variant_info(self) -> Variant:
        return WM_VARIANTS[self.variant]

    @property
    def phase(self) -> str:
        return WM_PROFILES[self.profile].phase or self.variant_info.phase
