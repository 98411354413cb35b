"""The Stage1 run kind's config: PAct's structure flow with the OT router ablation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pact_ray.errors import ConfigError
from pact_ray.common.presets import CONDITION_PRESETS, STAGE1_PRESETS
from pact_ray.ot.config import RouterConfig, resolve_blocks
from pact_ray.runs.config import PActRunConfig
from pact_ray.runs.registry import STAGE1_PROFILES, STAGE1_VARIANTS, get_variant


@dataclass
class Stage1RunConfig(PActRunConfig):
    """One Stage1 training run: the base fields plus the OT router block (``router.*``)."""

    kind: ClassVar[str] = "stage1"
    variants: ClassVar = STAGE1_VARIANTS
    profiles: ClassVar = STAGE1_PROFILES
    presets: ClassVar = tuple(STAGE1_PRESETS)
    nested: ClassVar[dict[str, type]] = {"router": RouterConfig}
    weights: ClassVar[str] = "the official Stage1 weights"

    router: RouterConfig | None = None  # None = no OT router (filled from the variant)

    @classmethod
    def _assemble(cls, top: dict[str, Any], nested: dict[str, dict[str, Any]]):
        # A flat dict that names a variant but carries no router block gets the variant's router.
        variant = top.get("variant", "baseline")
        v = get_variant(variant, cls.variants)
        if v.router is not None:
            nested["router"] = {**v.router, **nested.get("router", {})}
        elif nested.get("router"):
            raise ConfigError(f"variant {variant!r} has no OT router, so router.* keys do not apply")
        return super()._assemble(top, nested)

    def validate(self) -> "Stage1RunConfig":
        super().validate()
        if self.router is not None:
            self.router.validate()
            resolve_blocks(self.router.blocks, STAGE1_PRESETS[self.model]["num_blocks"])
        return self

    def synthetic_settings(self) -> dict[str, Any]:
        preset, cond = STAGE1_PRESETS[self.model], CONDITION_PRESETS[self.model]
        return dict(num_samples=self.synthetic_samples, seed=self.data_seed, resolution=preset["resolution"],
                    image_size=cond["image_size"], grid=cond["grid"], cond_channels=preset["cond_channels"],
                    prefix_tokens=cond["prefix_tokens"])
