"""The world-model run kind's config: the action-conditioned MAE and its GPT baseline
(``docs/specs/world_model.md``).

``--model`` (the config's ``model``) is the size preset of the variants that do not fix one
(``mae``, ``mae_random``, ``gpt``); the sized variants (``mae_small``, ``gpt_reference``, ...)
set their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pact_ray.data.cache import ARM_MARKER, arm_set_name, ready
from pact_ray.errors import ConfigError
from pact_ray.models.world_model_config import MASKS, PRESET_NAMES, WorldModelConfig, preset_config
from pact_ray.runs.config import RunConfig
from pact_ray.runs.registry import WM_PROFILES, WM_VARIANTS


@dataclass
class WorldModelRunConfig(RunConfig):
    """One world-model training run: the base fields plus the architecture, the evaluation
    schedule and the arm data."""

    kind: ClassVar[str] = "world_model"
    variants: ClassVar = WM_VARIANTS
    profiles: ClassVar = WM_PROFILES
    presets: ClassVar = PRESET_NAMES
    preset_noun: ClassVar[str] = "world model preset"

    weight_decay: float = 0.05  # the MAE recipe's AdamW weight decay (the base's default is 0)
    model_type: str = "mae"  # mae or gpt (the variant's; an override must agree)
    mask: str = "target"  # MAE training mask: target or target_random
    context_mask_ratio: float = 0.25  # target_random: fraction of context patches also masked
    embed_dim: int = 0  # encoder (GPT) width; 0: the preset's
    depth: int = 0  # encoder (GPT) blocks; 0: the preset's
    decoder_embed_dim: int = 0  # MAE decoder width; 0: the preset's
    decoder_depth: int = 0  # MAE decoder blocks; 0: the preset's
    patch_size: int = 8
    context_frames: int = 2  # frames before the target
    image_size: int = 64  # H = W of the model's frames, motor strip included
    synthetic_episodes: int = 24  # synthetic data: episodes
    episode_length: int = 24  # synthetic data: frames per episode

    def validate(self) -> "WorldModelRunConfig":
        super().validate()
        v = self.variant_info
        preset = v.setting("model")
        if preset and self.model != preset:
            raise ConfigError(f"variant {self.variant!r} is the {preset!r} preset, not {self.model!r}")
        if self.model_type != v.setting("model_type"):
            raise ConfigError(f"variant {self.variant!r} is a {v.setting('model_type')} model; model_type {self.model_type!r} does not apply")
        if self.mask not in MASKS:
            raise ConfigError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if self.model_type == "gpt" and self.mask != "target":
            raise ConfigError(f"mask {self.mask!r} applies to MAE models only; the GPT always predicts the whole target")
        for name in ("eval_every", "context_frames", "patch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("embed_dim", "depth", "decoder_embed_dim", "decoder_depth"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.synthetic_episodes < 2:
            raise ConfigError(f"synthetic_episodes must be >= 2 (training and validation episodes), got {self.synthetic_episodes}")
        if self.episode_length < self.context_frames + 1:
            raise ConfigError(f"episode_length ({self.episode_length}) must exceed context_frames ({self.context_frames})")
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

    def _cached_synthetic(self) -> Path | None:
        return ready(arm_set_name(self.synthetic_episodes, self.episode_length, self.data_seed), ARM_MARKER)
