"""The world model's architecture config and its named presets, apart from the model
(:mod:`pact_ray.models.world_model`) so that a sweep's driver checks its configs without
importing torch (Ray starts meanwhile: pact_ray.tune.sweep)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

MODEL_TYPES = ("mae", "gpt")
MASKS = ("target", "target_random")
PRESET_NAMES = ("tiny", "small", "reference")


@dataclass
class WorldModelConfig:
    """Everything that fixes a world model's architecture (saved in checkpoints)."""

    model_type: str = "mae"  # mae (masked, one pass) or gpt (autoregressive baseline)
    image_size: int = 64  # H = W of the frames, motor strip included
    patch_size: int = 8  # p: frames are (H/p)^2 patches of p x p pixels
    in_chans: int = 3
    context_frames: int = 2  # C frames before the target
    num_actions: int = 3  # STAY, MOVE+, MOVE-
    embed_dim: int = 192  # encoder width (the GPT's only width)
    depth: int = 4  # encoder blocks (the GPT's only blocks)
    num_heads: int = 4
    decoder_embed_dim: int = 96  # MAE decoder width
    decoder_depth: int = 2  # MAE decoder blocks
    decoder_num_heads: int = 4
    mlp_ratio: float = 4.0
    mask: str = "target"  # MAE training mask: target or target_random
    context_mask_ratio: float = 0.25  # target_random: fraction of context patches also masked

    def validate(self) -> WorldModelConfig:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        widths = [(self.embed_dim, self.num_heads, "embed_dim")]
        if self.model_type == "mae":
            widths.append((self.decoder_embed_dim, self.decoder_num_heads, "decoder_embed_dim"))
        for width, heads, name in widths:
            if width % 4 or width % heads:
                raise ValueError(f"{name} {width} must be a multiple of 4 and of its {heads} heads")
        if min(self.context_frames, self.depth, self.num_actions) < 1 or (self.model_type == "mae" and self.decoder_depth < 1):
            raise ValueError("context_frames, depth, decoder_depth and num_actions must be >= 1")
        if not 0 <= self.context_mask_ratio < 1:
            raise ValueError(f"context_mask_ratio must be in [0, 1), got {self.context_mask_ratio}")
        return self

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def train_mask_ratio(self) -> float:
        """The fraction of context patches masked while training."""
        return self.context_mask_ratio if self.mask == "target_random" else 0.0


# --------------------------------------------------------------------- presets

def mae_tiny(**kw: Any) -> WorldModelConfig:
    return WorldModelConfig(model_type="mae", embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, **kw)


def mae_small(**kw: Any) -> WorldModelConfig:
    return WorldModelConfig(model_type="mae", embed_dim=192, depth=4, num_heads=4, decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=4, **kw)


def mae_reference(**kw: Any) -> WorldModelConfig:
    """The evaluation report's iteration 3: embed 384, depth 8, decoder embed 192, decoder depth 4."""
    return WorldModelConfig(model_type="mae", embed_dim=384, depth=8, num_heads=6, decoder_embed_dim=192, decoder_depth=4, decoder_num_heads=6, **kw)


def gpt_tiny(**kw: Any) -> WorldModelConfig:
    return WorldModelConfig(model_type="gpt", embed_dim=64, depth=3, num_heads=4, **kw)


def gpt_small(**kw: Any) -> WorldModelConfig:
    return WorldModelConfig(model_type="gpt", embed_dim=192, depth=6, num_heads=4, **kw)


def gpt_reference(**kw: Any) -> WorldModelConfig:
    """The evaluation report's iteration 2 baseline (GPT 384d12)."""
    return WorldModelConfig(model_type="gpt", embed_dim=384, depth=12, num_heads=6, **kw)


PRESETS: dict[tuple[str, str], Callable[..., WorldModelConfig]] = {
    ("mae", "tiny"): mae_tiny, ("mae", "small"): mae_small, ("mae", "reference"): mae_reference,
    ("gpt", "tiny"): gpt_tiny, ("gpt", "small"): gpt_small, ("gpt", "reference"): gpt_reference,
}


def preset_config(model_type: str, preset: str, **overrides: Any) -> WorldModelConfig:
    """The named size of ``model_type``; ``overrides`` replace fields (e.g. embed_dim=128)."""
    if (model_type, preset) not in PRESETS:
        raise ValueError(f"unknown world model preset {model_type!r}/{preset!r}; presets: {', '.join(PRESET_NAMES)}")
    base = asdict(PRESETS[model_type, preset]())
    base.update(overrides)
    return WorldModelConfig(**base).validate()
