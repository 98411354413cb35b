"""The one registry of named variants and run profiles (``shared/specs/ot_router.md``, the seed dashboard).

A variant fixes what the ablation changes (router on/off, blocks, mask prior, edge cost,
virtual patch); a profile fixes how long and how a run trains. Both are plain data: the
sweep scripts turn them into Ray Tune search spaces, the trainables into configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pact_ray.ot.router import ConfigError


@dataclass(frozen=True)
class Variant:
    name: str
    phase: str  # baseline, phase1..phase4 (the seed's Phase column for smoke/stability runs)
    note: str  # the one line shown in the summary's Note column
    router: dict[str, Any] | None = None  # RouterConfig fields; None = no OT router
    stage: str = "stage1"
    # Continuous knobs an Optuna search may tune for this variant (subset of RouterConfig).
    knobs: tuple[str, ...] = ()
    # Stage1 variants whose router patches the first third of the blocks train fewer steps
    # in the quick and full profiles (the seed's 3 and 20).
    first_third: bool = False
    title: str = ""  # display name in run labels ("OT first"); default: the name

    @property
    def label(self) -> str:
        return self.title or self.name.replace("_", " ")


_OT = ("eps", "iterations", "strength", "t_min", "t_max")
_PRIOR = _OT + ("lambda_mask",)
_EDGE = _PRIOR + ("lambda_edge", "edge_beta")

STAGE1_VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("baseline", "baseline", "Official-equivalent trainer, no OT router."),
        Variant("ot_first", "phase1", "One Stage1 cross-attention block patched with OT gating.",
                router=dict(blocks="first"), knobs=_OT, title="OT first"),
        Variant("mask_prior", "phase2", "Mask demoted from hard condition to OT cost prior.",
                router=dict(blocks="first", mask_prior=True), knobs=_PRIOR),
        Variant("rgb_edge", "phase2", "RGB Sobel edge regularized cost.",
                router=dict(blocks="first", mask_prior=True, edge="rgb"), knobs=_EDGE, title="RGB edge"),
        Variant("mask_edge", "phase2", "Mask-edge regularized cost.",
                router=dict(blocks="first", mask_prior=True, edge="mask"), knobs=_EDGE),
        Variant("virtual_patch", "phase3", "Virtual image token with visible/virtual gate normalization.",
                router=dict(blocks="first", mask_prior=True, edge="rgb", virtual_patch=True, m_v=0.05),
                knobs=_EDGE + ("m_v",)),
        Variant("first_third", "phase1", "Patch first third of Stage1 cross-attention blocks.",
                router=dict(blocks="first_third"), knobs=_OT, first_third=True, title="first-third"),
        Variant("first_third_edge", "phase2", "First-third patch plus edge-regularized cost.",
                router=dict(blocks="first_third", mask_prior=True, edge="rgb"), knobs=_EDGE, first_third=True, title="first-third edge"),
    ]
}

# Search ranges of the continuous knobs for Optuna: (low, high, log scale).
KNOB_RANGES: dict[str, tuple[float, float, bool]] = {
    "eps": (1e-2, 0.5, True),
    "iterations": (10, 100, False),
    "strength": (0.25, 2.0, False),
    "lambda_mask": (0.1, 4.0, True),
    "lambda_edge": (0.05, 2.0, True),
    "edge_beta": (0.5, 16.0, True),
    "m_v": (0.01, 0.3, True),
    "t_min": (0.0, 0.5, False),
    "t_max": (0.5, 1.0, False),
}
INT_KNOBS = frozenset({"iterations"})


@dataclass(frozen=True)
class Profile:
    name: str
    steps: int
    steps_first_third: int
    phase: str | None  # summary phase; None = the variant's own phase
    optimizer: str = "adamw"
    lr: float = 1e-4
    export_final: bool = False  # log the final checkpoint as an MLflow artifact
    init: str = "scratch"  # "official" = start from --checkpoint
    checkpoint_every: int = 0  # 0 = only at the end (and on interruption points)
    extra: dict[str, Any] = field(default_factory=dict)
    title: str = ""  # display name in run labels ("Matrix"); default: the name capitalised

    @property
    def label(self) -> str:
        return self.title or self.name.replace("-", " ").capitalize()

    def steps_for(self, variant: Variant) -> int:
        return self.steps_first_third if variant.first_third else self.steps


STAGE1_PROFILES: dict[str, Profile] = {
    p.name: p
    for p in [
        Profile("smoke", 1, 1, None),
        Profile("stability", 5, 5, None, optimizer="sgd", lr=1e-3),
        Profile("quick", 8, 3, "matrix", title="Matrix"),
        Profile("full", 60, 20, "full", export_final=True, checkpoint_every=10),
        Profile("official-full", 60, 20, "official-full", title="Official full", export_final=True, init="official", checkpoint_every=10),
    ]
}


def get_variant(name: str, registry: dict[str, Variant] = STAGE1_VARIANTS) -> Variant:
    if name not in registry:
        raise ConfigError(f"unknown variant {name!r}; choose from {', '.join(registry)}")
    return registry[name]


def get_profile(name: str, registry: dict[str, Profile] = STAGE1_PROFILES) -> Profile:
    if name not in registry:
        raise ConfigError(f"unknown profile {name!r}; choose from {', '.join(registry)}")
    return registry[name]


def parse_variants(text: str, registry: dict[str, Variant] = STAGE1_VARIANTS) -> list[str]:
    """"all" or a comma-separated list -> validated variant names, in the given order."""
    if text.strip() == "all":
        return list(registry)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--variants names no variant")
    for n in names:
        get_variant(n, registry)
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------- Stage2

@dataclass(frozen=True)
class Stage2Variant(Variant):
    """A Stage2 variant (the seed's spatial articulation rows)."""

    moments: bool = False  # compute the parts' 2D mask moments and log them (spatial diagnostics)
    adapter: bool = False  # add the spatial adapter's 24-d residual from the moments
    stage: str = "stage2"


STAGE2_VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Stage2Variant("baseline", "baseline", "Official-equivalent Stage2 smoke."),
        Stage2Variant("spatial_diag", "phase4", "Mask-derived spatial moment diagnostics for articulation rows.",
                      moments=True),
        Stage2Variant("spatial_adapter", "phase4", "Zero-initialized articulation residual adapter smoke.",
                      moments=True, adapter=True),
    ]
}

STAGE2_PROFILES: dict[str, Profile] = {
    p.name: p
    for p in [
        Profile("smoke", 1, 1, None),
        Profile("stability", 5, 5, None, optimizer="sgd", lr=1e-3),
        Profile("quick", 5, 5, "matrix", title="Matrix"),
        Profile("full", 40, 40, "full", export_final=True, checkpoint_every=10),
        Profile("official-full", 40, 40, "official-full", title="Official full", export_final=True, init="official", checkpoint_every=10),
    ]
}
