"""Model presets and the condition layout that goes with each (no torch import: the data
generator reads them too). ``pact`` is the official PAct Stage1 size."""

from __future__ import annotations

from typing import Any

STAGE1_PRESETS: dict[str, dict[str, Any]] = {
    # CPU unit tests: well under a second per step. patch_size 2 (an official knob) keeps
    # 64 tokens per part, so global attention over 8 parts stays cheap on a CPU.
    "tiny": dict(
        resolution=8, in_channels=8, out_channels=8, model_channels=64, cond_channels=64, num_blocks=4,
        num_heads=4, mlp_ratio=4, patch_size=2, pe_mode="ape", qk_rms_norm=True, use_fp16=False,
        use_checkpoint=False, enable_part_embedding=True, global_attn_block_ids=[0, 2],
    ),
    # CPU sweeps: under a second per step at batch 2.
    "small": dict(
        resolution=8, in_channels=8, out_channels=8, model_channels=256, cond_channels=256, num_blocks=8,
        num_heads=4, mlp_ratio=4, patch_size=2, pe_mode="ape", qk_rms_norm=True, use_fp16=False,
        use_checkpoint=False, enable_part_embedding=True, global_attn_block_ids=[0, 2, 4, 6],
    ),
    # The official size (562M parameters), for GPUs.
    "pact": dict(
        resolution=16, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024, num_blocks=24,
        num_heads=16, mlp_ratio=4, patch_size=1, pe_mode="ape", qk_rms_norm=True, use_fp16=False,
        use_checkpoint=True, enable_part_embedding=True, global_attn_block_ids=list(range(0, 24, 2)),
    ),
}

# Condition layout that goes with each preset (image grid, prefix tokens, image size).
CONDITION_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(grid=(6, 6), prefix_tokens=5, image_size=(48, 48)),
    "small": dict(grid=(8, 8), prefix_tokens=5, image_size=(64, 64)),
    "pact": dict(grid=(37, 37), prefix_tokens=5, image_size=(518, 518)),
}

# Stage2: the structured-latent flow transformer over occupied voxels (pact_ray.models.stage2).
# `resolution` is the voxel grid G of the Stage2 data: 4x the Stage1 latent resolution, i.e.
# the occupancy grid that the Stage1 latents encode (PAct: 16 -> 64). `in_channels` is the
# latent channels + 1 (the clean shared-voxel flag, see stage2.py).
STAGE2_PRESETS: dict[str, dict[str, Any]] = {
    # CPU unit tests: well under a second per step.
    "tiny": dict(
        resolution=32, in_channels=9, out_channels=8, model_channels=64, cond_channels=64, num_blocks=2,
        num_heads=4, mlp_ratio=4, qk_rms_norm=True, use_checkpoint=False, max_num_parts=32,
        mask_channels=32, head_channels=64,
    ),
    # CPU sweeps.
    "small": dict(
        resolution=32, in_channels=9, out_channels=8, model_channels=256, cond_channels=256, num_blocks=6,
        num_heads=4, mlp_ratio=4, qk_rms_norm=True, use_checkpoint=False, max_num_parts=32,
        mask_channels=64, head_channels=128,
    ),
    # PAct's size (width 1024, 24 blocks, 16 heads, 64^3 grid, 8 + 1 channels, 50 part slots), for GPUs.
    "pact": dict(
        resolution=64, in_channels=9, out_channels=8, model_channels=1024, cond_channels=1024, num_blocks=24,
        num_heads=16, mlp_ratio=4, qk_rms_norm=True, use_checkpoint=True, max_num_parts=50,
        mask_channels=128, head_channels=128,
    ),
}

# Voxel tokens per Stage2 row (part or whole object) that a training batch keeps: a seeded
# subsample of the row's occupied voxels when it has more (None: every voxel, as in PAct).
STAGE2_MAX_TOKENS: dict[str, int | None] = {"tiny": 24, "small": 48, "pact": None}
