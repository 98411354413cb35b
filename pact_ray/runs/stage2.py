"""The Stage2 run kind's config: PAct's structured-latent flow with the articulation head and
the spatial variants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pact_ray.errors import ConfigError
from pact_ray.common.presets import CONDITION_PRESETS, STAGE1_PRESETS, STAGE2_PRESETS
from pact_ray.runs.config import PActRunConfig
from pact_ray.runs.registry import STAGE2_PROFILES, STAGE2_VARIANTS, get_variant

# The model choices a Stage2 variant makes (its settings), and only it: a config must agree with its variant's.
SPATIAL_FIELDS = ("spatial_moments", "spatial_adapter")


@dataclass
class Stage2RunConfig(PActRunConfig):
    """One Stage2 training run (``pact_ray.models.stage2``): the base fields plus the voxel
    token cap, the articulation loss weight and the spatial variants' model choices."""

    kind: ClassVar[str] = "stage2"
    predicts_articulation: ClassVar[bool] = True
    variants: ClassVar = STAGE2_VARIANTS
    profiles: ClassVar = STAGE2_PROFILES
    presets: ClassVar = tuple(STAGE2_PRESETS)
    weights: ClassVar[str] = "the Stage2 weights"

    max_tokens: int = 0  # voxel tokens kept per row (a seeded subsample); 0: the preset's cap (STAGE2_MAX_TOKENS)
    art_weight: float = 1.0  # loss = flow MSE + art_weight * art_l2
    spatial_moments: bool = False  # log the parts' mean 2D mask moments (the spatial diagnostics)
    spatial_adapter: bool = False  # the spatial adapter's 24-d articulation residual from the moments

    @classmethod
    def _assemble(cls, top: dict[str, Any], nested: dict[str, dict[str, Any]]):
        # A flat dict that names a variant but not its model choices (one stored before they
        # were fields) gets the variant's.
        variant = get_variant(top.get("variant", "baseline"), cls.variants)
        for key in SPATIAL_FIELDS:
            top.setdefault(key, variant.setting(key, False))
        return super()._assemble(top, nested)

    def validate(self) -> "Stage2RunConfig":
        super().validate()
        for key in SPATIAL_FIELDS:
            chosen = self.variant_info.setting(key, False)
            if getattr(self, key) != chosen:
                raise ConfigError(f"variant {self.variant!r} has {key}={chosen}; choose the variant that sets it instead")
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
