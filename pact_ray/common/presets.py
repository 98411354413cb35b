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

# Stage2: PAct's structured-latent flow (SLatFlowModel) and its articulation head, as the
# official config spells them: {"flow": SLatFlowModel args, "head": ArticulationRegressionHead
# args}. `resolution` is the voxel grid G of the Stage2 data; `in_channels` = out_channels =
# the 8 latent channels + PAct's ownership channel (pact_ray.data.objects.loader.pact_latents).
# `patch_size` 2 = one 2x downsample before the transformer (io_block_channels has one entry).
_STAGE2_HEAD = dict(input_layer_num=2, out_layer_num=3, out_channel=24, num_heads=4, mlp_ratio=2.0, num_arti_blocks=0,
                    use_skip_connection=False, use_checkpoint=False, share_mod=False, qk_rms_norm=True,
                    qk_rms_norm_cross=False, use_art_as_input=False, use_fp16=False)


def _stage2(width: int, blocks: int, heads: int, grid: int, io: int, cond: int, checkpointing: bool) -> dict[str, dict[str, Any]]:
    return {
        "flow": dict(resolution=grid, in_channels=9, out_channels=9, model_channels=width, cond_channels=cond,
                     num_blocks=blocks, num_heads=heads, mlp_ratio=4, patch_size=2, num_io_res_blocks=2,
                     io_block_channels=[io], pe_mode="ape", qk_rms_norm=True, use_fp16=False, use_checkpoint=checkpointing),
        "head": dict(_STAGE2_HEAD, feat_dim=width),
    }


STAGE2_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # CPU unit tests. The CPU presets use a 16^3 grid (2x the Stage1 latent grid; PAct: 64^3,
    # 4x) so that every voxel of an object stays a token.
    "tiny": _stage2(width=64, blocks=2, heads=4, grid=16, io=16, cond=64, checkpointing=False),
    # CPU sweeps.
    "small": _stage2(width=192, blocks=6, heads=4, grid=16, io=32, cond=256, checkpointing=False),
    # The official size (PAct's configs/example_config.json: slat_flow and Articulation_head), for GPUs.
    "pact": _stage2(width=1024, blocks=24, heads=16, grid=64, io=128, cond=1024, checkpointing=True),
}

# Voxels per Stage2 row (part or whole object) that a training batch keeps: a seeded
# subsample of the row's voxels when it has more (None: every voxel, as in PAct).
STAGE2_MAX_TOKENS: dict[str, int | None] = {"tiny": None, "small": None, "pact": None}
