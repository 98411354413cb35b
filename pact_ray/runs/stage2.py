"""The Stage2 run kind's config: PAct's structured-latent flow with the articulation head and
the spatial variants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pact_ray.errors import ConfigError
from pact_ray.models.presets import CONDITION_PRESETS, STAGE1_PRESETS, STAGE2_PRESETS
from pact_ray.runs.config import PActRunConfig
from pact_ray.runs.registry import STAGE2_PROFILES, STAGE2_VARIANTS


@dataclass
class Stage2RunConfig(PActRunConfig):
    """One Stage2 training run (``pact_ray.models.stage2``): the base fields plus the voxel
    token cap and the articulation loss weight."""

    kind: ClassVar[str] = "stage2"
    variants: ClassVar = STAGE2_VARIANTS
    profiles: ClassVar = STAGE2_PROFILES
    presets: ClassVar = tuple(STAGE2_PRESETS)
    weights: ClassVar[str] = "the Stage2 weights"

    max_tokens: int = 0  # voxel tokens kept per row (a seeded subsample); 0: the preset's cap (STAGE2_MAX_TOKENS)
    art_weight: float = 1.0  # loss = flow MSE + art_weight * art_l2

    def validate(self) -> "Stage2RunConfig":
        super().validate()
        if self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be >= 0 (0: the preset's cap), got {self.max_tokens}")
        if not self.art_weight >= 0:
            raise ConfigError(f"art_weight must be >= 0, got {self.art_weight}")
        return self

    def synthetic_settings(self) -> dict[str, Any]:
        """Stage1's object set at this preset, with voxel sets at the Stage2 flow's resolution."""
        flow, cond = STAGE2_PRESETS[self.model]["flow"], CONDITION_PRESETS[self.model]
        return dict(num_samples=self.synthetic_samples, seed=self.data_seed, resolution=STAGE1_PRESETS[self.model]["resolution"],
                    image_size=cond["image_size"], grid=cond["grid"], cond_channels=flow["cond_channels"],
                    prefix_tokens=cond["prefix_tokens"], voxel_resolution=flow["resolution"])
