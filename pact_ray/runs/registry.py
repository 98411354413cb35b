"""The one registry of what a sweep can run: every named variant, profile, Optuna knob range
and OT-matrix cell, for every run kind (``docs/specs/ot_router.md``, ``docs/specs/stage2.md``,
``docs/specs/world_model.md``; the dashboard design's rows, ``docs/design/ablation_dashboard.txt``).

A variant fixes what a comparison changes (the OT router's settings, the Stage2 spatial
adapter, the world model's type and mask); a profile fixes how long and how a run trains.
Both are plain data that name config fields: the run configs (``pact_ray.runs``) build from
them, the sweep harness turns them into Ray Tune search spaces, the report labels runs with
them. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from pact_ray.errors import ConfigError


@dataclass(frozen=True)
class Knob:
    """A continuous config field that ``--search optuna`` tunes, with its search range."""

    key: str  # the flat config key ("router.eps", "lr")
    low: float
    high: float
    log: bool = False  # sample on a log scale
    integer: bool = False

    @property
    def label(self) -> str:
        """The key without its block prefix ("eps" for "router.eps")."""
        return self.key.rpartition(".")[2]


@dataclass(frozen=True)
class Variant:
    """A named configuration of one run kind."""

    name: str
    phase: str  # baseline, phase1..phase4, iter2/iter3 (the dashboard design's Phase column)
    note: str  # the one line shown in the summary's Note column
    settings: Mapping[str, Any] = field(default_factory=dict)  # flat config fields the variant fixes
    knobs: tuple[str, ...] = ()  # flat config keys an Optuna search may tune (keys of the kind's KNOBS)
    title: str = ""  # display name in run labels ("OT first"); default: the name with spaces
    # Stage1 variants whose router patches the first third of the blocks train fewer steps in
    # the quick and full profiles (the dashboard design's 3 and 20).
    first_third: bool = False

    @property
    def label(self) -> str:
        return self.title or self.name.replace("_", " ")

    @property
    def router(self) -> dict[str, Any] | None:
        """The Stage1 OT router's fields the variant sets (None: no router)."""
        fields = {k.partition(".")[2]: v for k, v in self.settings.items() if k.startswith("router.")}
        return fields or None

    def setting(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)


@dataclass(frozen=True)
class Profile:
    """How long and how a run trains; ``settings`` are the flat config fields it fixes."""

    name: str
    steps: int
    steps_first_third: int | None = None  # steps of the first-third variants (None: ``steps``)
    phase: str | None = None  # the summary's phase; None = the variant's own phase
    title: str = ""  # display name in run labels ("Matrix"); default: the name capitalised
    settings: Mapping[str, Any] = field(default_factory=dict)
    # Whether comparisons of this profile's runs get verdicts. A smoke run checks that the
    # pipeline runs end to end (one step); its intervals are shown, but it is not meant for
    # conclusions.
    verdicts: bool = True
    # The seeds a sweep runs when --seeds is not given: enough for a paired interval where the
    # profile is meant for verdicts (3: the fewest whose t interval, corrected for a family of
    # seven variants, can rule out a 1 % difference on this project's seed-paired metrics).
    seeds: int = 1

    @property
    def label(self) -> str:
        return self.title or self.name.replace("-", " ").capitalize()

    def steps_for(self, variant: Variant) -> int:
        return self.steps_first_third if variant.first_third and self.steps_first_third is not None else self.steps

    def fields(self, variant: Variant) -> dict[str, Any]:
        """The config fields this profile sets for ``variant``. Where the profile trains some
        variants for fewer steps, every variant also validates at that step, so that they are
        compared with the others like for like."""
        out: dict[str, Any] = {"steps": self.steps_for(variant)}
        if self.steps_first_third is not None and self.steps_first_third != self.steps:
            out["eval_steps"] = str(self.steps_first_third)
        return {**out, **self.settings}

    @property
    def init(self) -> str:
        return self.settings.get("init", "scratch")


def _by_name(items):
    return {item.name: item for item in items}


# ---------------------------------------------------------------------- Stage1: the OT router

_OT = ("router.eps", "router.iterations", "router.strength", "router.t_min", "router.t_max")
_PRIOR = _OT + ("router.lambda_mask",)
_EDGE = _PRIOR + ("router.lambda_edge", "router.edge_beta")


def _router(**fields: Any) -> dict[str, Any]:
    return {f"router.{k}": v for k, v in fields.items()}


STAGE1_VARIANTS: dict[str, Variant] = _by_name([
    Variant("baseline", "baseline", "Official-equivalent trainer, no OT router."),
    Variant("ot_first", "phase1", "One Stage1 cross-attention block patched with OT gating.",
            _router(blocks="first"), knobs=_OT, title="OT first"),
    Variant("mask_prior", "phase2", "Mask demoted from hard condition to OT cost prior.",
            _router(blocks="first", mask_prior=True), knobs=_PRIOR),
    Variant("rgb_edge", "phase2", "RGB Sobel edge regularized cost.",
            _router(blocks="first", mask_prior=True, edge="rgb"), knobs=_EDGE, title="RGB edge"),
    Variant("mask_edge", "phase2", "Mask-edge regularized cost.",
            _router(blocks="first", mask_prior=True, edge="mask"), knobs=_EDGE),
    Variant("virtual_patch", "phase3", "Virtual image token with visible/virtual gate normalization.",
            _router(blocks="first", mask_prior=True, edge="rgb", virtual_patch=True, m_v=0.05),
            knobs=_EDGE + ("router.m_v",)),
    Variant("first_third", "phase1", "Patch first third of Stage1 cross-attention blocks.",
            _router(blocks="first_third"), knobs=_OT, first_third=True, title="first-third"),
    Variant("first_third_edge", "phase2", "First-third patch plus edge-regularized cost.",
            _router(blocks="first_third", mask_prior=True, edge="rgb"), knobs=_EDGE, first_third=True,
            title="first-third edge"),
])

STAGE1_KNOBS: dict[str, Knob] = {k.key: k for k in [
    Knob("router.eps", 1e-2, 0.5, log=True),
    Knob("router.iterations", 10, 100, integer=True),
    Knob("router.strength", 0.25, 2.0),
    Knob("router.lambda_mask", 0.1, 4.0, log=True),
    Knob("router.lambda_edge", 0.05, 2.0, log=True),
    Knob("router.edge_beta", 0.5, 16.0, log=True),
    Knob("router.m_v", 0.01, 0.3, log=True),
    Knob("router.t_min", 0.0, 0.5),
    Knob("router.t_max", 0.5, 1.0),
]}

# The PAct profiles (Stage1 and Stage2 share the names; Stage2 trains its own step counts).
# Validation scores 4 held-out objects in the short profiles (about half a training step
# each time on the small preset) and every held-out object in the full ones.
_SHORT = {"eval_samples": 4}
_SGD = {**_SHORT, "optimizer": "sgd", "lr": 1e-3}
_FULL = {"export_final": True, "checkpoint_every": 10, "eval_every": 10, "eval_samples": 0}
_OFFICIAL = {**_FULL, "init": "official"}

STAGE1_PROFILES: dict[str, Profile] = _by_name([
    Profile("smoke", 1, settings=_SHORT, verdicts=False),
    Profile("stability", 5, settings=_SGD),
    Profile("quick", 8, 3, "matrix", title="Matrix", settings=_SHORT, seeds=3),
    Profile("full", 60, 20, "full", settings=_FULL, seeds=3),
    Profile("official-full", 60, 20, "official-full", title="Official full", settings=_OFFICIAL, seeds=3),
])


# ---------------------------------------------------------------------- Stage2: spatial rows

# The dashboard design's spatial articulation rows: what each adds to the model, as fields of
# the Stage2 config (pact_ray.runs.stage2), so that a run's params and checkpoints say it.
STAGE2_VARIANTS: dict[str, Variant] = _by_name([
    Variant("baseline", "baseline", "Official-equivalent Stage2 smoke."),
    Variant("spatial_diag", "phase4", "Mask-derived spatial moment diagnostics for articulation rows.",
            {"spatial_moments": True}),
    Variant("spatial_adapter", "phase4", "Zero-initialized articulation residual adapter smoke.",
            {"spatial_moments": True, "spatial_adapter": True}),
])

STAGE2_PROFILES: dict[str, Profile] = _by_name([
    Profile("smoke", 1, settings=_SHORT, verdicts=False),
    Profile("stability", 5, settings=_SGD),
    Profile("quick", 5, None, "matrix", title="Matrix", settings=_SHORT, seeds=3),
    Profile("full", 40, None, "full", settings=_FULL, seeds=3),
    Profile("official-full", 40, None, "official-full", title="Official full", settings=_OFFICIAL, seeds=3),
])


# ---------------------------------------------------------------------- the OT matrix

# The dashboard design's OT matrix: its cells, named "<kind>_<variant>" (its run names). Each
# kind has its baseline cell, so that every variant cell has a like-for-like comparison.
MATRIX_CELLS: dict[str, tuple[str, str]] = {
    f"{kind}_{variant}": (kind, variant)
    for kind, variants in [
        ("stage1", ("baseline", "ot_first", "mask_prior", "rgb_edge", "virtual_patch", "first_third_edge")),
        ("stage2", ("baseline", "spatial_diag", "spatial_adapter")),
    ]
    for variant in variants
}


# ---------------------------------------------------------------------- the world model

_WM_OPT = ("lr", "weight_decay")


def _wm(name: str, phase: str, note: str, title: str, model_type: str = "mae", mask: str = "target",
        preset: str | None = None, knobs: tuple[str, ...] = _WM_OPT) -> Variant:
    settings: dict[str, Any] = {"model_type": model_type, "mask": mask}
    if preset:  # a sized variant fixes its own preset; the others take --model
        settings["model"] = preset
    return Variant(name, phase, note, settings, knobs=knobs, title=title)


WM_VARIANTS: dict[str, Variant] = _by_name([
    _wm("mae", "iter3", "MAE: the whole target frame masked and reconstructed in one pass.", "MAE"),
    _wm("mae_random", "iter3", "MAE that also masks a random fraction of the context patches while training.",
        "MAE random mask", mask="target_random", knobs=_WM_OPT + ("context_mask_ratio",)),
    _wm("gpt", "iter2", "GPT baseline: raster-order autoregressive over the target patches.", "GPT", model_type="gpt"),
    _wm("mae_tiny", "iter3", "MAE, tiny preset (embed 64, depth 2; decoder 32 x 1).", "MAE tiny", preset="tiny"),
    _wm("mae_small", "iter3", "MAE, small preset (embed 192, depth 4; decoder 96 x 2).", "MAE small", preset="small"),
    _wm("mae_reference", "iter3", "MAE at the evaluation report's size (embed 384, depth 8; decoder 192 x 4).",
        "MAE reference", preset="reference"),
    _wm("gpt_small", "iter2", "GPT baseline, small preset (embed 192, depth 6).", "GPT small", model_type="gpt",
        preset="small"),
    _wm("gpt_reference", "iter2", "GPT baseline at the evaluation report's iteration-2 size (embed 384, depth 12).",
        "GPT reference", model_type="gpt", preset="reference"),
])

WM_KNOBS: dict[str, Knob] = {k.key: k for k in [
    Knob("lr", 1e-4, 3e-3, log=True),
    Knob("weight_decay", 1e-3, 0.2, log=True),
    Knob("context_mask_ratio", 0.05, 0.75),
]}

WM_PROFILES: dict[str, Profile] = _by_name([
    Profile("smoke", 1, verdicts=False, settings=dict(lr=1e-3, eval_every=1, batch_size=4, eval_samples=8, synthetic_episodes=8,
                                      episode_length=12)),
    Profile("quick", 60, None, "matrix", title="Matrix",
            settings=dict(lr=1e-3, checkpoint_every=30, eval_every=30, batch_size=8, eval_samples=48)),
    Profile("full", 3000, None, "full", settings=dict(lr=5e-4, export_final=True, checkpoint_every=500, eval_every=250,
                                                     batch_size=32, eval_samples=0, synthetic_episodes=96,
                                                     episode_length=32)),
])


# ---------------------------------------------------------------------- look-ups

def get_variant(name: str, registry: Mapping[str, Variant]) -> Variant:
    if name not in registry:
        raise ConfigError(f"unknown variant {name!r}; choose from {', '.join(registry)}")
    return registry[name]


def get_profile(name: str, registry: Mapping[str, Profile]) -> Profile:
    if name not in registry:
        raise ConfigError(f"unknown profile {name!r}; choose from {', '.join(registry)}")
    return registry[name]


def parse_variants(text: str, registry: Mapping[str, Variant]) -> list[str]:
    """"all" or a comma-separated list -> validated variant names, in the given order."""
    if text.strip() == "all":
        return list(registry)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--variants names no variant")
    for n in names:
        get_variant(n, registry)
    return list(dict.fromkeys(names))
