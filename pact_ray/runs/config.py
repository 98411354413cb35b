"""The base of every run configuration: the fields, profile defaults and checks that all run
kinds share, and the flat-dict form a config travels in.

A config travels as a *flat* dict of scalars (``router.eps`` for nested fields): that is what
Ray Tune's ``param_space`` holds, what MLflow logs as params and what a checkpoint stores.
:meth:`RunConfig.from_flat` rebuilds and validates it; :meth:`RunConfig.for_variant` builds
the config of a named variant under a named profile (``pact_ray.runs.registry``). Each run
kind (``stage1.py``, ``stage2.py``, ``world_model.py``) adds only its own fields and checks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping

from pact_ray.data.cache import OBJECTS_MARKER, object_set_name, ready
from pact_ray.errors import ConfigError
from pact_ray.runs.coerce import CoercionError, coerce_fields
from pact_ray.runs.registry import Profile, Variant, get_profile, get_variant

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
INITS = ("scratch", "official")
FAIL_MODES = ("once", "always")
MAX_SEED = 2**32 - 1
TEST_ONLY = {"test_only": True}  # metadata of a field that describes no run (fault injection)


def test_only_fields(cls: type) -> frozenset[str]:
    """The names of a config class's test-only fields (kept out of what is logged)."""
    return frozenset(f.name for f in fields(cls) if f.metadata.get("test_only"))


@dataclass
class RunConfig:
    """One training run (a Ray Tune trial). Subclasses set the class attributes and add their fields."""

    kind: ClassVar[str] = ""  # the run kind's name ("stage1")
    # Whether the kind's model predicts articulation vectors: its checkpoints record their
    # encoding, and one in another encoding is refused (pact_ray.training.checkpoints).
    predicts_articulation: ClassVar[bool] = False
    variants: ClassVar[Mapping[str, Variant]] = {}
    profiles: ClassVar[Mapping[str, Profile]] = {}
    presets: ClassVar[tuple[str, ...]] = ()  # the model presets --model accepts
    preset_noun: ClassVar[str] = "model preset"  # how errors name them
    nested: ClassVar[dict[str, type]] = {}  # nested config blocks by field name ({"router": RouterConfig})

    variant: str = "baseline"  # named variant (pact_ray.runs.registry); its settings are the defaults
    profile: str = "quick"  # named profile: steps, optimiser, export, evaluation
    model: str = "small"  # model preset
    seed: int = 0  # model init, batch order, timesteps and noise
    steps: int = 8  # optimiser steps
    batch_size: int = 2  # samples (objects) per step
    optimizer: str = "adamw"  # adamw or sgd
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max grad norm; 0 disables clipping
    precision: str = "fp32"  # fp32, bf16 or fp16 autocast (fp16 with a grad scaler, CUDA only)
    checkpoint_every: int = 0  # Ray checkpoint every N steps (0: only the final one)
    export_final: bool = False  # log the final checkpoint as an MLflow artifact
    data: str = ""  # dataset folder; empty = the kind's synthetic data (generated and cached)
    data_seed: int = 0  # seed of the synthetic data and of the train/validation split
    val_fraction: float = 0.25  # samples (world model: episodes) held out for validation, never trained on
    eval_every: int = 0  # validation every N steps (0: only at eval_steps and the last step)
    eval_steps: str = ""  # comma-separated extra validation steps (where shorter variants of the profile end)
    eval_samples: int = 8  # validation samples scored (an even spread over the split); 0: all
    # Test-only fault injection (tests/test_faults.py sets them with --set): not a setting of
    # the run, so never logged (:meth:`params`) nor listed by --list-keys.
    fail_at_step: int = dataclasses.field(default=-1, metadata=TEST_ONLY)  # raise at this step (-1: never)
    # "once": only in an attempt that started without a checkpoint; "always"
    fail_mode: str = dataclasses.field(default="once", metadata=TEST_ONLY)
    fail_variants: str = dataclasses.field(default="", metadata=TEST_ONLY)  # comma-separated variants it applies to ("": all)

    # ------------------------------------------------------------ building
    @classmethod
    def for_variant(cls, variant: str, profile: str = "quick", model: str = "small", seed: int = 0, **overrides: Any):
        """The config of ``variant`` under ``profile``: the profile's settings, then the
        variant's (a sized variant fixes its own ``model``), then ``overrides`` (flat keys,
        ``router.eps`` for nested fields)."""
        v = get_variant(variant, cls.variants)
        p = get_profile(profile, cls.profiles)
        flat: dict[str, Any] = p.fields(v)
        flat.update(variant=variant, profile=profile, model=model, seed=seed)
        flat.update(v.settings)
        flat.update(overrides)
        return cls.from_flat(flat)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]):
        """Rebuild and validate a config from its flat dict (unknown keys are an error)."""
        own = {f.name for f in fields(cls)}
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
        for name, sub in nested.items():
            top[name] = cls._block(name, sub)
        try:
            top = coerce_fields(cls, top)
        except CoercionError as e:
            raise ConfigError(str(e)) from None
        return cls(**top).validate()

    @classmethod
    def _block(cls, name: str, values: dict[str, Any]):
        """The nested block ``name`` (``router``) from its fields' values, coerced to their
        declared types. Built here, not by the block's own package (``pact_ray.ot``), which
        stays below ``pact_ray.runs``."""
        block = cls.nested[name]
        unknown = set(values) - {f.name for f in fields(block)}
        if unknown:
            raise ConfigError(f"unknown {name} keys {sorted(unknown)}")
        try:
            return block(**coerce_fields(block, values, prefix=f"{name}."))
        except CoercionError as e:
            raise ConfigError(str(e)) from None

    # ------------------------------------------------------------ reading
    def flat(self) -> dict[str, Any]:
        """Flattened scalars, nested dataclasses as ``name.field``; a missing nested block is omitted."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in self.nested:
                continue
            if dataclasses.is_dataclass(value):
                out.update({f"{f.name}.{k}": v for k, v in asdict(value).items()})
            else:
                out[f.name] = value
        return out

    def params(self) -> dict[str, Any]:
        """What describes the run: :meth:`flat` less the test-only fields (fault injection).
        What MLflow logs as the run's params and ``config.json``."""
        hidden = test_only_fields(type(self))
        return {k: v for k, v in self.flat().items() if k not in hidden}

    def to_json(self) -> str:
        return json.dumps(self.flat(), sort_keys=True)

    @property
    def variant_info(self) -> Variant:
        return self.variants[self.variant]

    @property
    def phase(self) -> str:
        """The summary's phase: the profile's, else the variant's."""
        return self.profiles[self.profile].phase or self.variant_info.phase

    def extra_eval_steps(self) -> frozenset[int]:
        """The steps of ``eval_steps``."""
        try:
            steps = frozenset(int(s) for s in self.eval_steps.split(",") if s.strip())
        except ValueError:
            raise ConfigError(f"eval_steps must be comma-separated step numbers, got {self.eval_steps!r}") from None
        if any(s < 1 for s in steps):
            raise ConfigError(f"eval_steps must be >= 1, got {self.eval_steps!r}")
        return steps

    def eval_due(self, step: int) -> bool:
        """Whether validation runs after optimiser step ``step`` (1-based): every ``eval_every``
        steps, at ``eval_steps`` and at the last step."""
        return step == self.steps or bool(self.eval_every and step % self.eval_every == 0) or step in self.extra_eval_steps()

    # ------------------------------------------------------------ checking
    def validate(self):
        """Check every field (one-sentence :class:`ConfigError`); returns self."""
        get_variant(self.variant, self.variants)
        get_profile(self.profile, self.profiles)
        if self.model not in self.presets:
            raise ConfigError(f"unknown {self.preset_noun} {self.model!r}; choose from {', '.join(self.presets)}")
        for name in ("seed", "data_seed"):  # NumPy's seeds are 32-bit
            if not 0 <= getattr(self, name) <= MAX_SEED:
                raise ConfigError(f"{name} must be in 0..{MAX_SEED}, got {getattr(self, name)}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.eval_samples < 0:
            raise ConfigError(f"eval_samples must be >= 0, got {self.eval_samples}")
        self.extra_eval_steps()  # checks the list
        if self.fail_mode not in FAIL_MODES:
            raise ConfigError(f"fail_mode must be 'once' or 'always', got {self.fail_mode!r}")
        return self


    def data_folder(self) -> Path | None:
        """The folder of this run's data when it exists already: ``data``, or the cached
        synthetic set; None when the synthetic set is still to be generated (by the trainer's
        ``dataset_for``, which needs torch). Torch-free: the sweep driver uses it to describe
        the data without importing torch (a second of its start-up)."""
        if self.data:
            return Path(self.data)
        return self._cached_synthetic()

    def _cached_synthetic(self) -> Path | None:
        raise NotImplementedError


@dataclass
class PActRunConfig(RunConfig):
    """What the two PAct stages share besides the base: official initialisation, CFG
    dropout, activation checkpointing and the synthetic object data set."""

    weights: ClassVar[str] = "the official weights"  # what --checkpoint must point to (error messages)

    grad_checkpointing: bool | None = None  # activation checkpointing of the blocks (None: the preset's choice)
    init: str = "scratch"  # scratch or official (load init_checkpoint strictly)
    init_checkpoint: str = ""  # official weights (.safetensors or .pt)
    p_uncond: float = 0.0  # probability of dropping image and mask condition (CFG training)
    synthetic_samples: int = 32  # objects in the synthetic dataset
    eval_timesteps: int = 2  # validation timesteps: quantile midpoints of the training schedule

    def validate(self):
        super().validate()
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.init == "official" and not self.init_checkpoint:
            raise ConfigError(f"init 'official' needs {self.weights}: pass --checkpoint PATH")
        if not 0 <= self.p_uncond < 1:
            raise ConfigError(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        if self.eval_timesteps < 1:
            raise ConfigError(f"eval_timesteps must be >= 1, got {self.eval_timesteps}")
        if self.synthetic_samples < self.batch_size:
            raise ConfigError(f"synthetic_samples ({self.synthetic_samples}) must be >= batch_size ({self.batch_size})")
        return self

    def synthetic_settings(self) -> dict[str, Any]:
        """The arguments of :func:`pact_ray.data.objects.synthetic.ensure_synthetic` that make
        this run's synthetic object set (the preset's sizes)."""
        raise NotImplementedError

    def _cached_synthetic(self) -> Path | None:
        return ready(object_set_name(**self.synthetic_settings()), OBJECTS_MARKER)
