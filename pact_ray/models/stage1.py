"""Stage1: PAct's part-based sparse-structure flow transformer.

A PAct-compatible re-implementation: the module tree, parameter names, shapes and
forward pass follow the published model (``docs/specs/stage1_pact.md``) so that
the official weights load strictly and a golden forward pass is reproduced to 1e-5.
The OT router of ``pact_ray.ot.router`` plugs into the cross-attention of chosen
blocks; with it off (or at strength 0) the forward pass is the plain core, bit for bit.

Shapes: N part rows (``N = sum(num_parts)``, grouped object by object), R the latent
resolution, C the width, L condition tokens (prefix tokens then h*w image patches).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pact_ray.models.layers import (
    ModulatedBlockModules,
    TimestepEmbedder,
    absolute_position_embedding,
    at_least_float32,
    build_from_preset,
    modulate,
    patchify,
    unpatchify,
)
from pact_ray.common.presets import CONDITION_PRESETS, STAGE1_PRESETS  # noqa: F401 (re-exported)
from pact_ray.ot.router import OTRouter, RouterConfig

# Keys of the official config that this implementation accepts without using: they
# describe the official model's fixed choices (both cross-attention kinds on, no shared
# modulation, 32 parts at most).
OFFICIAL_PASSTHROUGH_KEYS = frozenset(
    {"enable_local_cross_attn", "enable_global_cross_attn", "qk_rms_norm_cross", "share_mod", "max_num_parts"}
)

@dataclass
class PartLayout:
    """How the N part rows of a batch group into objects.

    row_obj: [N] object of each row; part_idx: [N] part index inside its object;
    groups: (row indices, parts per object) for the objects sharing one part count, so
    that global attention runs without padding.
    """

    num_parts: torch.Tensor
    row_obj: torch.Tensor
    part_idx: torch.Tensor
    groups: list[tuple[torch.Tensor | None, int]]

    @classmethod
    def build(cls, num_parts: torch.Tensor, n_rows: int, device: torch.device, part_idx: torch.Tensor | None = None) -> "PartLayout":
        counts = [int(c) for c in num_parts.tolist()]
        if any(c < 1 for c in counts) or sum(counts) != n_rows:
            raise ValueError(f"num_parts {counts} must be positive and sum to the {n_rows} rows of x")
        num_parts = torch.as_tensor(counts, dtype=torch.long, device=device)
        row_obj = torch.repeat_interleave(torch.arange(len(counts), device=device), num_parts)
        if part_idx is None:
            starts = torch.cumsum(num_parts, 0) - num_parts
            part_idx = torch.arange(n_rows, device=device) - starts[row_obj]
        if len(set(counts)) == 1:
            groups: list[tuple[torch.Tensor | None, int]] = [(None, counts[0])]
        else:
            groups = []
            for n in sorted(set(counts)):
                objs = torch.nonzero(num_parts == n).flatten()
                rows = (torch.cumsum(num_parts, 0) - num_parts)[objs][:, None] + torch.arange(n, device=device)
                groups.append((rows.flatten(), n))
        return cls(num_parts=num_parts, row_obj=row_obj, part_idx=part_idx.to(device), groups=groups)


class ModulatedCrossBlock(ModulatedBlockModules):
    """``blocks.{i}``: adaLN-modulated self-attention (local or object-global), cross-attention, MLP."""

    def __init__(self, channels: int, ctx_channels: int, num_heads: int, mlp_ratio: float, qk_rms_norm: bool, global_attn: bool):
        super().__init__(channels, ctx_channels, num_heads, mlp_ratio, qk_rms_norm)
        self.global_attn = global_attn

    def _self_attention(self, h: torch.Tensor, layout: PartLayout) -> torch.Tensor:
        if not self.global_attn:
            return self.self_attn(h)
        # Global blocks: each object's part rows are concatenated into one sequence.
        _, tokens, c = h.shape
        outs, order = [], []
        for rows, n in layout.groups:
            hg = h if rows is None else h[rows]
            hg = self.self_attn(hg.reshape(-1, n * tokens, c)).reshape(-1, tokens, c)
            if rows is None:
                return hg
            outs.append(hg)
            order.append(rows)
        # Undo the grouping (autocast may have changed the dtype, so no in-place scatter).
        return torch.cat(outs)[torch.argsort(torch.cat(order))]

    def forward(self, x, t_emb, cond, layout: PartLayout, router: OTRouter | None = None, route=None, block_id: int = 0):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(t_emb).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + self._self_attention(h, layout) * gate_msa.unsqueeze(1)
        h = self.norm2(x)
        if router is not None and route is not None and block_id in router.block_ids:
            q, k, v = self.cross_attn.project(h, cond)
            k, v, bias = router.route(block_id, q, k, v, route)
            h = self.cross_attn.attend(q, k, v, bias)
        else:
            h = self.cross_attn(h, cond)
        x = x + h
        h = modulate(self.norm3(x), shift_mlp, scale_mlp)
        return x + self.mlp(h) * gate_mlp.unsqueeze(1)


class PartStructureFlow(nn.Module):
    """PAct Stage1 flow transformer over per-part structure latents.

    Constructed with the official config keys; ``router`` (a :class:`RouterConfig`) patches
    the cross-attention of the blocks it names with OT gating, ``mask_condition`` "hard"
    (official) adds the mask embedding to the condition, "none" leaves it out (the
    mask-prior variants move the mask into the OT cost instead).
    """

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        model_channels: int,
        cond_channels: int,
        out_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int | None = 64,
        mlp_ratio: float = 4,
        patch_size: int = 1,
        pe_mode: str = "ape",
        qk_rms_norm: bool = False,
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        enable_part_embedding: bool = True,
        global_attn_block_ids: list[int] | tuple[int, ...] = (),
        max_num_parts: int = 32,
        mask_condition: str = "hard",
        router: RouterConfig | None = None,
        **official_extras: Any,
    ):
        super().__init__()
        unknown = set(official_extras) - OFFICIAL_PASSTHROUGH_KEYS
        if unknown:
            raise TypeError(f"PartStructureFlow got unknown config keys: {sorted(unknown)}")
        if pe_mode != "ape":
            raise ValueError(f"pe_mode {pe_mode!r} is not supported; PAct uses 'ape'")
        if num_heads is None:
            num_heads = model_channels // num_head_channels
        if model_channels % num_heads:
            raise ValueError(f"model_channels {model_channels} is not divisible by num_heads {num_heads}")
        if resolution % patch_size:
            raise ValueError(f"resolution {resolution} is not divisible by patch_size {patch_size}")
        if mask_condition not in ("hard", "none"):
            raise ValueError(f"mask_condition must be 'hard' or 'none', got {mask_condition!r}")
        if mask_condition == "hard" and cond_channels != model_channels:
            raise ValueError("cond_channels must equal model_channels: the mask embedding is added to the condition")
        bad_ids = [i for i in global_attn_block_ids if not 0 <= i < num_blocks]
        if bad_ids:
            raise ValueError(f"global_attn_block_ids {bad_ids} are outside 0..{num_blocks - 1}")
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.cond_channels = cond_channels
        self.num_blocks = num_blocks
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.use_fp16 = use_fp16
        self.use_checkpoint = use_checkpoint
        self.enable_part_embedding = enable_part_embedding
        self.max_num_parts = max_num_parts
        self.mask_condition = mask_condition
        self.global_attn_block_ids = sorted(set(global_attn_block_ids))

        grid = resolution // patch_size
        self.register_buffer("pos_emb", absolute_position_embedding(grid, model_channels), persistent=True)
        if enable_part_embedding:
            self.part_pe = nn.Embedding(max_num_parts + 1, model_channels)
            self.part_pe_proj = nn.Linear(model_channels, model_channels)
            # The official model shares the mask embedding with the part embedding: the same
            # modules are registered under both names (both appear in the state_dict).
            self.mask_group_emb = self.part_pe
            self.mask_group_emb_proj = self.part_pe_proj
        else:
            self.mask_group_emb = nn.Embedding(max_num_parts + 1, model_channels)
            self.mask_group_emb_proj = nn.Linear(model_channels, model_channels)
        self.t_embedder = TimestepEmbedder(model_channels)
        self.input_layer = nn.Linear(in_channels * patch_size**3, model_channels)
        self.blocks = nn.ModuleList(
            ModulatedCrossBlock(model_channels, cond_channels, num_heads, mlp_ratio, qk_rms_norm, i in self.global_attn_block_ids)
            for i in range(num_blocks)
        )
        self.out_layer = nn.Linear(model_channels, out_channels * patch_size**3)
        self.ot_router = OTRouter(router, num_blocks, model_channels, num_heads) if router is not None else None
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """TRELLIS init: xavier-uniform Linears with zero bias, N(0, 0.02) embeddings, zero-init adaLN and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for emb in {self.mask_group_emb, getattr(self, "part_pe", self.mask_group_emb)}:
            nn.init.normal_(emb.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)
        if self.ot_router is not None:
            self.ot_router.reset_parameters()

    # --------------------------------------------------------------- helpers
    def core_state_dict_keys(self) -> list[str]:
        """State-dict keys of the official core (everything but the OT router's own parameters)."""
        return [k for k in self.state_dict() if not k.startswith("ot_router.")]

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """masks: [N, h, w] integer labels -> [N, h*w, C] mask embeddings."""
        return self.mask_group_emb_proj(self.mask_group_emb(masks.flatten(1).long()))

    def condition(self, cond: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """Add the hard mask condition to the FIRST h*w condition tokens (as the official model does)."""
        if masks is None or self.mask_condition != "hard":
            return cond
        emb = self.embed_masks(masks).to(cond.dtype)
        n = emb.shape[1]
        if n > cond.shape[1]:
            raise ValueError(f"masks have {n} cells but cond has only {cond.shape[1]} tokens")
        return torch.cat([cond[:, :n] + emb, cond[:, n:]], dim=1)

    def _autocast(self, device: torch.device):
        if self.use_fp16 and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    # --------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        masks: torch.Tensor | None = None,
        num_parts: torch.Tensor | None = None,
        part_idx: torch.Tensor | None = None,
        *,
        images: torch.Tensor | None = None,
        pixel_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity of every part row.

        x: [N, in_channels, R, R, R]; t: [N] (timesteps, scaled by 1000 in training);
        cond: [N, L, cond_channels]; masks: [N, h, w] labels (0 background, k+1 part k);
        num_parts: [B] parts per object (rows grouped object by object; default one
        object per row); part_idx: [N] (default 0..n-1 per object).
        images: [B, 3, H, W] in [0, 1] and pixel_masks: [B, H, W], used only by the
        OT router's edge costs. Returns [N, out_channels, R, R, R].
        """
        n_rows = x.shape[0]
        if num_parts is None:
            num_parts = torch.ones(n_rows, dtype=torch.long)
        layout = PartLayout.build(num_parts, n_rows, x.device, part_idx)
        cond = self.condition(cond, masks)

        h = patchify(x, self.patch_size)
        h = h.reshape(*h.shape[:2], -1).permute(0, 2, 1).contiguous()
        h = self.input_layer(h) + self.pos_emb[None]
        t_emb = self.t_embedder(t)
        if self.enable_part_embedding:
            h = h + self.part_pe_proj(self.part_pe(layout.part_idx + 1))[:, None]

        route = None
        if self.ot_router is not None and self.ot_router.active:
            route = self.ot_router.context(
                layout=layout, masks=masks, t=t, cond_tokens=cond.shape[1], images=images, pixel_masks=pixel_masks
            )
        with self._autocast(x.device):
            for i, block in enumerate(self.blocks):
                args = (h, t_emb, cond, layout, self.ot_router, route, i)
                if self.use_checkpoint and self.training and torch.is_grad_enabled():
                    h = checkpoint(block, *args, use_reentrant=False)
                else:
                    h = block(*args)
        if self.ot_router is not None:
            self.ot_router.finish(route)
        h = F.layer_norm(at_least_float32(h), h.shape[-1:])
        h = self.out_layer(h.to(self.out_layer.weight.dtype))
        grid = self.resolution // self.patch_size
        h = h.permute(0, 2, 1).reshape(h.shape[0], h.shape[2], grid, grid, grid)
        return unpatchify(h, self.patch_size).contiguous()

    def router_diagnostics(self) -> dict[str, torch.Tensor]:
        """Router diagnostics of the last forward pass (empty without an active router)."""
        return {} if self.ot_router is None else self.ot_router.diagnostics()


def build_stage1(preset_or_config: str | dict[str, Any], **overrides: Any) -> PartStructureFlow:
    """Build a Stage1 model from a preset name (tiny, small, pact) or an official config dict."""
    return build_from_preset(PartStructureFlow, STAGE1_PRESETS, "Stage1", preset_or_config, **overrides)
