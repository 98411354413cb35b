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
