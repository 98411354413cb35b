"""Stage2: PAct's structured-latent flow transformer with its articulation regression head.

A PAct-compatible re-implementation of ``SLatFlowModel`` and ``ArticulationRegressionHead``
(``docs/specs/stage2.md``; PAct's ``modules/pact/models/structured_latent_flow.py``): the
module tree, parameter names, shapes and forward pass follow the published model, so the
official weights load strictly and a golden forward pass is reproduced to 1e-5.

The model denoises the 9-channel structured latents of the occupied voxels of every part,
with one extra row per object for the whole object, and regresses each part's 24-number
articulation vector:

1. ``input_layer`` lifts each voxel to ``io_block_channels[0]``; the input res-blocks
   (:class:`SparseResBlock3d`: LayerNorm, SiLU, 3x3x3 submanifold convolution, timestep
   adaLN, convolution, skip) run on each row's voxels separately (a row is its own
   sparse batch element, so a part never sees another part's voxels), the last one after
   a 2x downsample (PAct's mean into zeros: a cell of n voxels gets sum / (n + 1));
2. at the downsampled level every cell is a token: absolute sin/cos position embedding of
   its coordinates plus the part embedding of its row (0 = whole object); 24 modulated
   blocks attend over all tokens of an object (all its rows together) and cross-attend to
   the object's image tokens, to whose FIRST h*w tokens the mask-group embedding is added;
3. the output res-blocks upsample back (nearest: each voxel takes its cell), with the
   input blocks' features as skip connections, then LayerNorm and ``out_layer``;
4. the head reads the last block's tokens: per token Linear-SiLU-Linear, per row the mean
   and the max over its tokens concatenated, three Linears to 24; the whole-object rows
   are dropped.

Optionally a spatial adapter (:class:`SpatialAdapter`) adds an MLP of the part's 2D mask
moments (:func:`mask_moments`) to the head's output, zero-initialised.

State dict: as PAct's ``from_pretrained_ArtiSLat`` loads one file, the head's keys
(``feats_input_layers.*``, ``art_out_layers.*``) at the top and the flow under
``_base_model.*`` (542 keys at the official size); ``spatial_adapter.*`` is ours.

Shapes: B objects; N = sum_b (K_b + 1) rows, object by object, each object's whole-object
row first; P = sum_b K_b part rows; T voxels (all rows, rows contiguous); T' the cells of
the downsampled level (the transformer's tokens); C the width; L condition tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pact_ray.common.moments import MASK_MOMENTS
from pact_ray.data.objects.articulation import ARTICULATION_DIM
from pact_ray.errors import ConfigError
from pact_ray.models.layers import LayerNorm32, ModulatedBlockModules, TimestepEmbedder, at_least_float32, modulate, sdpa
from pact_ray.common.presets import STAGE2_PRESETS
from pact_ray.models.sparse import SparseConv3d, SparseLevel, downsample, pool_into_zeros

# The spatial moments of a part's 2D mask: the column order of mask_moments (and their metric names).
MOMENT_NAMES = MASK_MOMENTS
# PAct's fixed sizes: 50 parts (+1 row: the whole object in part_pe, the background in
# mask_group_emb) and a 128-channel mask embedding.
PART_SLOTS = 50
MASK_EMBED_CHANNELS = 128
# ArticulationRegressionHead arguments that the official config passes and the head
# swallows without using (its **kwargs, or attributes no module reads).
HEAD_PASSTHROUGH_KEYS = frozenset(
    {"num_heads", "mlp_ratio", "num_arti_blocks", "use_checkpoint", "share_mod", "qk_rms_norm", "qk_rms_norm_cross", "use_fp16"}
)


# ------------------------------------------------------------------ layout

@dataclass
class VoxelLayout:
    """The sparse structure of a batch, built once and shared by every layer (and every
    sampler step).

    num_rows: [B]; row_obj, row_idx: [N] object of each row and row inside its object
    (0 the whole object, k + 1 part k). levels[0]: the voxels, levels[i + 1]: the 2x
    coarser cells of levels[i], each with its convolution rulebook; parents[i]: [T_i] the
    cell of levels[i + 1] holding each voxel of levels[i]. The coarsest level's tokens go
    to the transformer packed per object as [B, S, C]: ``slots`` [T'] their flat index
    obj * S + position; ``keep`` [B, S] real tokens (None when no object is padded).
    """

    num_rows: torch.Tensor
    row_obj: torch.Tensor
    row_idx: torch.Tensor
    levels: list[SparseLevel]
    parents: list[torch.Tensor]
    slots: torch.Tensor
    seq_len: int
    keep: torch.Tensor | None

    @classmethod
    def build(cls, coords: torch.Tensor, num_rows: torch.Tensor, levels: int, resolution: int) -> "VoxelLayout":
        """coords: [T, 4] (row, x, y, z), rows 0..N-1 object by object, each row's voxels
        contiguous, x, y, z in 0..resolution-1; num_rows: [B] rows per object (K + 1);
        ``levels`` downsamplings."""
        coords = coords.long()
        device = coords.device
        counts = [int(c) for c in num_rows.tolist()]
        n = sum(counts)
        if not counts or any(c < 1 for c in counts):
            raise ValueError(f"num_rows {counts} must be positive")
        if max(counts) - 1 > PART_SLOTS:
            raise ValueError(f"an object has {max(counts) - 1} parts; the model handles {PART_SLOTS}")
        if coords.dim() != 2 or coords.shape[1] != 4 or coords.shape[0] == 0:
            raise ValueError(f"coords must be [T, 4] with T >= 1, got {tuple(coords.shape)}")
        rows = coords[:, 0]
        if int(rows.min()) < 0 or int(rows.max()) >= n or bool((rows.diff() < 0).any()):
            raise ValueError(f"coords rows must be grouped in increasing order within 0..{n - 1}")
        if bool((torch.bincount(rows, minlength=n) == 0).any()):
            raise ValueError("every row needs at least one voxel")
        if int(coords[:, 1:].min()) < 0 or int(coords[:, 1:].max()) >= resolution:
            raise ValueError(f"voxel coordinates must lie in 0..{resolution - 1}")
        num_rows = torch.as_tensor(counts, dtype=torch.long, device=device)
        row_obj = torch.repeat_interleave(torch.arange(len(counts), device=device), num_rows)
        row_idx = torch.arange(n, device=device) - (torch.cumsum(num_rows, 0) - num_rows)[row_obj]
        grids, parents = [SparseLevel.build(coords)], []
        for _ in range(levels):
            cells, parent = downsample(grids[-1].coords)
            parents.append(parent)
            grids.append(SparseLevel.build(cells))
        obj = row_obj[grids[-1].rows]  # non-decreasing: rows are sorted
        per_obj = torch.bincount(obj, minlength=len(counts))
        seq_len = int(per_obj.max())
        slots = obj * seq_len + torch.arange(len(obj), device=device) - (torch.cumsum(per_obj, 0) - per_obj)[obj]
        keep = None
        if bool((per_obj != seq_len).any()):
            keep = torch.zeros(len(counts) * seq_len, dtype=torch.bool, device=device).index_fill(0, slots, True)
            keep = keep.view(len(counts), seq_len)
        return cls(num_rows=num_rows, row_obj=row_obj, row_idx=row_idx, levels=grids, parents=parents,
                   slots=slots, seq_len=seq_len, keep=keep)

    @property
    def is_part(self) -> torch.Tensor:
        """[N] bool: part rows (not the whole-object rows)."""
        return self.row_idx > 0

    @property
    def top(self) -> SparseLevel:
        """The transformer's level (the coarsest)."""
        return self.levels[-1]

    @property
    def voxel_obj(self) -> torch.Tensor:
        """[T] the object of every voxel."""
        return self.row_obj[self.levels[0].rows]

    def pack(self, h: torch.Tensor) -> torch.Tensor:
        """h: [T', C] -> [B, S, C], each object's tokens side by side (padding zeros)."""
        out = h.new_zeros(len(self.num_rows) * self.seq_len, h.shape[1]).index_copy(0, self.slots, h)
        return out.view(len(self.num_rows), self.seq_len, h.shape[1])

    def unpack(self, h: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack`: [B, S, C] -> [T', C]."""
        return h.reshape(-1, h.shape[-1])[self.slots]

    def key_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """[B, 1, 1, S] additive attention bias: 0 for an object's tokens, -inf for padding."""
        if self.keep is None:
            return None
        return torch.zeros(self.keep.shape, dtype=dtype, device=self.keep.device).masked_fill(~self.keep, float("-inf"))[:, None, None]


def pact_rows(coords: torch.Tensor, part_layouts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PAct's input convention -> ours.

    coords: [T, 4] (object, x, y, z); part_layouts: [P, 3] rows (object b, start, stop)
    with object-local offsets, each object's rows tiling 0..stop of its last row, the
    first row the whole object. Returns coords [T, 4] (global row, x, y, z) and
    num_rows [B].
    """
    layouts = part_layouts.long().cpu()
    if layouts.dim() != 2 or layouts.shape[1] != 3 or layouts.shape[0] == 0:
        raise ValueError(f"part_layouts must be [P, 3] (object, start, stop), got {tuple(layouts.shape)}")
    obj, start, stop = layouts.unbind(1)
    num_rows = torch.bincount(obj)
    if int(obj.min()) < 0 or bool((obj.diff() < 0).any()) or bool((num_rows == 0).any()):
        raise ValueError("part_layouts must list objects 0..B-1 in order")
    first = torch.cat([torch.ones(1, dtype=torch.bool), obj[1:] != obj[:-1]])
    follows = torch.cat([torch.zeros(1, dtype=torch.long), stop[:-1]])
    if bool((stop <= start).any()) or bool((start[first] != 0).any()) or bool((start[~first] != follows[~first]).any()):
        raise ValueError("each object's part_layouts rows must tile 0..stop contiguously, starting at 0")
    lengths = stop - start
    if int(lengths.sum()) != coords.shape[0]:
        raise ValueError(f"part_layouts cover {int(lengths.sum())} voxels but coords has {coords.shape[0]}")
    row = torch.repeat_interleave(torch.arange(len(layouts)), lengths).to(coords.device)
    if not torch.equal(coords[:, 0].long(), obj.to(coords.device)[row]):
        raise ValueError("coords' object column disagrees with part_layouts")
    return torch.cat([row[:, None], coords[:, 1:].long()], dim=1), num_rows


def voxel_position_embedding(coords: torch.Tensor, channels: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """TRELLIS's absolute position embedding of integer voxel coordinates.

    coords: [..., 3] -> [..., channels]. Per axis ``f = channels // 3 // 2`` frequencies
    ``w_i = 1 / 10000^(i / f)``; each axis contributes ``[sin(x w), cos(x w)]``; the three
    axes are concatenated and zero-padded to ``channels``. Computed in ``dtype`` (TRELLIS:
    float32). For the cells of a full grid it equals ``layers.absolute_position_embedding``.
    """
    freq_dim = channels // 3 // 2
    freqs = 1.0 / (10000 ** (torch.arange(freq_dim, dtype=dtype, device=coords.device) / freq_dim))
    angles = coords.to(dtype)[..., None] * freqs  # [..., 3, f]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(-2)  # [..., 6f]
    return F.pad(emb, (0, channels - emb.shape[-1]))


def mask_moments(pixel_masks: torch.Tensor, num_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial moments of every part's 2D mask.

    pixel_masks: [B, H, W] labels (0 background, k + 1 part k); num_parts: [B].
    Returns moments [P, 10] (columns MOMENT_NAMES: area, cx, cy, xx, yy, xy, x0, y0, x1, y1)
    and visible [P] bool (a non-empty mask).
    With m the part's pixels and pixel centres u = (j + 1/2) / W, v = (i + 1/2) / H:

        area = |m| / (H W)
        cx = mean_m u,  cy = mean_m v
        xx = mean_m (u - cx)^2,  yy = mean_m (v - cy)^2,  xy = mean_m (u - cx)(v - cy)
        x0, y0 = min_m j / W, min_m i / H;  x1, y1 = (max_m j + 1) / W, (max_m i + 1) / H

    All lie in [0, 1] (xy in [-1/4, 1/4]); an empty mask (an occluded part) gives zeros.
    """
    b, h, w = pixel_masks.shape
    device = pixel_masks.device
    obj = torch.repeat_interleave(torch.arange(b, device=device), num_parts.to(device))
    starts = torch.cumsum(num_parts, 0) - num_parts
    label = torch.arange(len(obj), device=device) - starts.to(device)[obj] + 1
    m = (pixel_masks[obj] == label[:, None, None]).float()  # [P, H, W]
    count = m.sum((1, 2))
    visible = count > 0
    denom = count.clamp(min=1)
    u = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    v = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    cx = (m * u).sum((1, 2)) / denom
    cy = (m * v[:, None]).sum((1, 2)) / denom
    du = u[None, None, :] - cx[:, None, None]
    dv = v[None, :, None] - cy[:, None, None]
    xx = (m * du**2).sum((1, 2)) / denom
    yy = (m * dv**2).sum((1, 2)) / denom
    xy = (m * du * dv).sum((1, 2)) / denom
    cols, rows = m.amax(1) > 0, m.amax(2) > 0  # [P, W], [P, H]
    idx_w = torch.arange(w, device=device)
    idx_h = torch.arange(h, device=device)
    x0 = torch.where(cols, idx_w, w).amin(1) / w
    x1 = (torch.where(cols, idx_w, -1).amax(1) + 1) / w
    y0 = torch.where(rows, idx_h, h).amin(1) / h
    y1 = (torch.where(rows, idx_h, -1).amax(1) + 1) / h
    moments = torch.stack([count / (h * w), cx, cy, xx, yy, xy, x0, y0, x1, y1], dim=1)
    return moments * visible[:, None], visible


# ------------------------------------------------------------------ modules

class SparseResBlock3d(nn.Module):
    """PAct's sparse IO res-block, per voxel of one level:

        h = conv1(silu(norm1(x)))
        h = conv2(silu(norm2(h) * (1 + scale_r) + shift_r)) + skip(x)

    with (scale_r, shift_r) = emb_layers(t_emb) of the voxel's row, norm2 without affine,
    conv2 zero-initialised; ``resample`` "down" pools x onto the 2x coarser cells first,
    "up" copies each cell to its voxels first.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, resample: str | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.resample = resample
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = SparseConv3d(channels, out_channels)
        self.conv2 = SparseConv3d(out_channels, out_channels)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.skip_connection = nn.Linear(channels, out_channels) if channels != out_channels else nn.Identity()
        nn.init.zeros_(self.conv2.conv.weight)
        nn.init.zeros_(self.conv2.conv.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, level: SparseLevel, parent: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T_in, channels] (the level before resampling); emb: [N, emb_channels] per row;
        level: the voxels after resampling; parent: the fine-to-coarse map of the resampling
        -> [level.size, out_channels]."""
        scale, shift = self.emb_layers(emb).to(x.dtype).chunk(2, dim=1)
        if self.resample == "down":
            x = pool_into_zeros(x, parent, level.size)
        elif self.resample == "up":
            x = x[parent]
        rows = level.rows
        h = self.conv1(F.silu(self.norm1(x)), level)
        h = self.norm2(h) * (1 + scale[rows]) + shift[rows]
        h = self.conv2(F.silu(h), level)
        return h + self.skip_connection(x)


class MaskedCrossBlock(ModulatedBlockModules):
    """``blocks.{i}``: TRELLIS's ModulatedSparseTransformerCrossBlock on tokens packed per
    object: adaLN-modulated self-attention over an object's tokens (padding masked out of
    the keys), cross-attention to its image tokens, MLP."""

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, cond: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
        """x: [B, S, C]; t_emb: [B, C]; cond: [B, L, Cc]; key_bias: [B, 1, 1, S] or None -> [B, S, C]."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(t_emb).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        q, k, v = self.self_attn.qkv(h)
        h = self.self_attn.to_out(sdpa(q, k, v, key_bias).reshape(x.shape))
        x = x + h * gate_msa.unsqueeze(1)
        x = x + self.cross_attn(self.norm2(x), cond)
        h = modulate(self.norm3(x), shift_mlp, scale_mlp)
        return x + self.mlp(h) * gate_mlp.unsqueeze(1)


class SLatFlowModel(nn.Module):
    """PAct's structured-latent flow model (the ``_base_model`` of the Stage2 checkpoint),
    constructed with its config keys. Unsupported official options (another pe_mode, shared
    modulation, qk norm in cross-attention) are refused with a ConfigError."""

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        model_channels: int,
        cond_channels: int,
        out_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int = 64,
        mlp_ratio: float = 4,
        patch_size: int = 2,
        num_io_res_blocks: int = 2,
        io_block_channels: list[int] | tuple[int, ...] | None = None,
        pe_mode: str = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        use_skip_connection: bool = True,
        share_mod: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        **unknown: Any,
    ):
        super().__init__()
        if unknown:
            raise ConfigError(f"unknown Stage2 flow config keys: {sorted(unknown)}")
        num_heads = num_heads or model_channels // num_head_channels
        io = list(io_block_channels or [])
        if pe_mode != "ape":
            raise ConfigError(f"pe_mode {pe_mode!r} is not supported; PAct's Stage2 uses 'ape'")
        if share_mod or qk_rms_norm_cross:
            raise ConfigError("share_mod and qk_rms_norm_cross are not supported (PAct's Stage2 uses neither)")
        if model_channels % num_heads:
            raise ConfigError(f"model_channels {model_channels} is not divisible by num_heads {num_heads}")
        if io and patch_size != 2 ** len(io):
            raise ConfigError(f"patch_size {patch_size} must be 2^{len(io)}: one 2x downsample per io_block_channels entry")
        if num_io_res_blocks < 1:
            raise ConfigError(f"num_io_res_blocks must be >= 1, got {num_io_res_blocks}")
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.cond_channels = cond_channels
        self.num_heads = num_heads
        self.levels = len(io)
        self.use_fp16 = use_fp16
        self.use_checkpoint = use_checkpoint
        self.use_skip_connection = use_skip_connection

        self.t_embedder = TimestepEmbedder(model_channels)
        self.part_pe = nn.Embedding(PART_SLOTS + 1, model_channels)  # row 0: the whole object
        self.part_pe_proj = nn.Linear(model_channels, model_channels)
        self.mask_group_emb = nn.Embedding(PART_SLOTS + 1, MASK_EMBED_CHANNELS)  # label 0: background
        self.mask_group_emb_proj = nn.Linear(MASK_EMBED_CHANNELS, cond_channels)  # PAct: to DINOv2's 1024
        self.input_layer = nn.Linear(in_channels, io[0] if io else model_channels)

        # (level the block's convolutions run on, resampling before them) per IO block.
        self.input_blocks, self.input_plan = nn.ModuleList(), []
        for i, (chs, next_chs) in enumerate(zip(io, io[1:] + [model_channels])):
            for _ in range(num_io_res_blocks - 1):
                self.input_blocks.append(SparseResBlock3d(chs, model_channels, chs))
                self.input_plan.append((i, None))
            self.input_blocks.append(SparseResBlock3d(chs, model_channels, next_chs, resample="down"))
            self.input_plan.append((i + 1, "down"))
        self.blocks = nn.ModuleList(
            MaskedCrossBlock(model_channels, cond_channels, num_heads, mlp_ratio, qk_rms_norm) for _ in range(num_blocks)
        )
        skip = 2 if use_skip_connection else 1
        self.out_blocks, self.output_plan = nn.ModuleList(), []
        for i in reversed(range(len(io))):
            prev_chs = io[i + 1] if i + 1 < len(io) else model_channels
            self.out_blocks.append(SparseResBlock3d(prev_chs * skip, model_channels, io[i], resample="up"))
            self.output_plan.append((i, "up"))
            for _ in range(num_io_res_blocks - 1):
                self.out_blocks.append(SparseResBlock3d(io[i] * skip, model_channels, io[i]))
                self.output_plan.append((i, None))
        self.out_layer = nn.Linear(io[0] if io else model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PAct's init: xavier-uniform Linears with zero bias, N(0, 0.02) embeddings and timestep
        MLP, zero adaLN modulation, output layer and the part- and mask-embedding projections
        (the res-blocks' conv2 were zeroed when built; conv1 keep their conv init)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.part_pe.weight, std=0.02)
        nn.init.normal_(self.mask_group_emb.weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.out_layer, self.part_pe_proj, self.mask_group_emb_proj]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(self, cond: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """cond: [B, L, Cc], masks: [B, h, w] labels -> cond with the projected mask-group
        embedding added to its FIRST h*w tokens (PAct's placement, as in Stage1)."""
        if masks is None:
            return cond
        emb = self.mask_group_emb_proj(self.mask_group_emb(masks.flatten(1).long())).to(cond.dtype)
        n = emb.shape[1]
        if n > cond.shape[1]:
            raise ValueError(f"masks have {n} cells but cond has only {cond.shape[1]} tokens")
        return torch.cat([cond[:, :n] + emb, cond[:, n:]], dim=1)

    def _io(self, blocks: nn.ModuleList, plan: list, h: torch.Tensor, emb: torch.Tensor, layout: VoxelLayout,
            skips: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run IO res-blocks along their plan; input blocks collect their outputs as skips,
        output blocks consume them (last first)."""
        outs = []
        for block, (level, resample) in zip(blocks, plan):
            parent = None if resample is None else layout.parents[level - 1 if resample == "down" else level]
            if skips is not None and self.use_skip_connection:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, layout.levels[level], parent)
            outs.append(h)
        return h, outs

    def _autocast(self, device: torch.device):
        if self.use_fp16 and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, layout: VoxelLayout,
                masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, in_channels] at layout.levels[0]; t: [B] (x1000); cond: [B, L, Cc]; masks:
        [B, h, w] labels (k = part k, 1-based). Returns the velocity [T, out_channels] and
        the last block's tokens [T', C] (layout.top's order)."""
        cond = self.condition(cond, masks)
        t_emb = self.t_embedder(t)
        row_emb = t_emb[layout.row_obj]  # [N, C]: every row is modulated by its object's timestep
        with self._autocast(x.device):
            h, skips = self._io(self.input_blocks, self.input_plan, self.input_layer(x), row_emb, layout)
            top = layout.top
            h = h + voxel_position_embedding(top.coords[:, 1:], self.model_channels, at_least_float32(h).dtype)
            h = h + self.part_pe_proj(self.part_pe(layout.row_idx[top.rows]))
            h = layout.pack(h)
            bias = layout.key_bias(h.dtype)
            for block in self.blocks:
                if self.use_checkpoint and self.training and torch.is_grad_enabled():
                    h = checkpoint(block, h, t_emb, cond, bias, use_reentrant=False)
                else:
                    h = block(h, t_emb, cond, bias)
            features = layout.unpack(h)
            h, _ = self._io(self.out_blocks, self.output_plan, features, row_emb, layout, skips)
        h = F.layer_norm(at_least_float32(h), h.shape[-1:])
        return self.out_layer(h.to(self.out_layer.weight.dtype)), features


class SpatialAdapter(nn.Module):
    """Mask moments -> a 24-d residual of the articulation prediction.

    ``mlp``: Linear(10 -> H), SiLU, Linear(H -> H), SiLU, Linear(H -> 24); the last Linear
    starts at zero, so a fresh adapter adds exactly 0 (step 0 equals the baseline).
    """

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(len(MOMENT_NAMES), hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, ARTICULATION_DIM),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.mlp[-1].weight)

    def forward(self, moments: torch.Tensor) -> torch.Tensor:
        """moments: [P, 10] -> [P, 24]."""
        return self.mlp(moments)


@dataclass
class Stage2Output:
    """velocity: [T, out_channels] at the voxels; features: [T', C] the last block's tokens,
    what the articulation head reads; layout: the batch's layout."""

    velocity: torch.Tensor
    features: torch.Tensor
    layout: VoxelLayout


def _mlp(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Linear layers with SiLU between them (none after the last)."""
    for i, layer in enumerate(layers):
        x = layer(x)
        if i < len(layers) - 1:
            x = F.silu(x)
    return x


class ArticulatedSLatFlow(nn.Module):
    """PAct's Stage2 as its checkpoint holds it: ``ArticulationRegressionHead`` with the flow
    as ``_base_model``. Built from the official config ``{"flow": SLatFlowModel args,
    "head": ArticulationRegressionHead args}``; ``spatial_adapter`` adds ours, built after
    every other module is initialised (so the others' initial weights do not depend on it).

    The head: with g = ``feats_input_layers`` (C -> C -> C/2, SiLU between) per token and
    T_r the tokens of row r at the transformer's level,

        a_r = art_out_layers([mean_{i in T_r} g(h_i) ; max_{i in T_r} g(h_i)])   (C -> C -> C -> 24)

    the last Linear zero-initialised; the whole-object rows are dropped.
    """

    def __init__(self, flow: Mapping[str, Any], head: Mapping[str, Any] | None = None, spatial_adapter: bool = False,
                 adapter_channels: int = 64):
        super().__init__()
        self._base_model = SLatFlowModel(**flow)
        width = self._base_model.model_channels
        head = dict(head or {})
        unknown = set(head) - HEAD_PASSTHROUGH_KEYS - {"input_layer_num", "out_layer_num", "feat_dim", "out_channel",
                                                         "use_skip_connection", "use_art_as_input"}
        if unknown:
            raise ConfigError(f"unknown Stage2 head config keys: {sorted(unknown)}")
        feat_dim = head.get("feat_dim", width)
        if feat_dim != width:
            raise ConfigError(f"head feat_dim {feat_dim} must equal the flow's model_channels {width}: the head reads its features")
        if head.get("out_channel", ARTICULATION_DIM) != ARTICULATION_DIM:
            raise ConfigError(f"head out_channel must be {ARTICULATION_DIM} (the articulation vector), got {head['out_channel']}")
        if head.get("use_skip_connection") or head.get("use_art_as_input"):
            raise ConfigError("head use_skip_connection and use_art_as_input are not supported (the official head uses neither)")
        n_in, n_out = max(1, head.get("input_layer_num", 2)), max(1, head.get("out_layer_num", 3))
        dims_in = [feat_dim] * n_in + [feat_dim // 2]
        self.feats_input_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_in[:-1], dims_in[1:]))
        dims_out = [feat_dim] * n_out + [ARTICULATION_DIM]
        self.art_out_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_out[:-1], dims_out[1:]))
        self.reset_head()
        self.spatial_adapter = SpatialAdapter(adapter_channels) if spatial_adapter else None

    @property
    def flow(self) -> SLatFlowModel:
        return self._base_model

    def reset_head(self) -> None:
        """PAct's head init: xavier-uniform Linears with zero bias, the last one all zero."""
        for layer in [*self.feats_input_layers, *self.art_out_layers]:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.art_out_layers[-1].weight)

    def core_state_dict_keys(self) -> list[str]:
        """Keys a Stage2 checkpoint must provide: everything but the spatial adapter (ours),
        the head's first, so that a checkpoint with another head is reported by them."""
        keys = [k for k in self.state_dict() if not k.startswith("spatial_adapter.")]
        return sorted(keys, key=lambda k: k.startswith("_base_model."))

    # --------------------------------------------------------------- forward
    def layout(self, coords: torch.Tensor, num_rows: torch.Tensor) -> VoxelLayout:
        """The sparse structure of a batch (coords [T, 4] (row, x, y, z), num_rows [B]): build
        it once and pass it to every forward pass over those voxels."""
        return VoxelLayout.build(coords, num_rows, self.flow.levels, self.flow.resolution)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, layout: VoxelLayout,
                masks: torch.Tensor | None = None) -> Stage2Output:
        """Predict the flow velocity of every voxel.

        x: [T, in_channels] noisy latents at layout.levels[0]; t: [B] timesteps of the
        objects (x1000); cond: [B, L, Cc] image tokens; masks: [B, h, w] grid masks
        (labels k + 1 = part k = row k + 1).
        """
        velocity, features = self.flow(x, t, cond, layout, masks)
        return Stage2Output(velocity=velocity, features=features, layout=layout)

    def pool_rows(self, features: torch.Tensor, layout: VoxelLayout) -> torch.Tensor:
        """features: [T', C] -> [N, C]: per row the mean then the max of g over its tokens."""
        g = _mlp(self.feats_input_layers, features)
        rows = layout.top.rows
        n = len(layout.row_obj)
        count = torch.bincount(rows, minlength=n).to(g.dtype)
        mean = torch.zeros(n, g.shape[1], dtype=g.dtype, device=g.device).index_add(0, rows, g) / count[:, None]
        peak = g.new_empty(n, g.shape[1]).scatter_reduce(0, rows[:, None].expand_as(g), g, reduce="amax", include_self=False)
        return torch.cat([mean, peak], dim=1)

    def articulation_head(self, features: torch.Tensor, layout: VoxelLayout) -> torch.Tensor:
        """PAct's head: features [T', C] -> [P, 24] (part rows, objects in order)."""
        return _mlp(self.art_out_layers, self.pool_rows(features, layout))[layout.is_part]

    def articulate(self, features: torch.Tensor, layout: VoxelLayout, moments: torch.Tensor | None = None) -> torch.Tensor:
        """The head plus the spatial adapter's residual: -> [P, 24]. ``moments`` [P, 10]
        (mask_moments) are required when the model has an adapter."""
        pred = self.articulation_head(features, layout)
        if self.spatial_adapter is not None:
            if moments is None:
                raise ValueError("the spatial adapter needs the parts' mask moments")
            pred = pred + self.spatial_adapter(moments.to(pred.dtype))
        return pred

    def forward_pact(self, coords: torch.Tensor, feats: torch.Tensor, part_layouts: torch.Tensor, t: torch.Tensor,
                     cond: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """PAct's call ``head(SparseTensor(feats, coords), t, cond, return_articulation=True,
        part_layouts=..., masks=masks)`` in PAct's input convention (see :func:`pact_rows`).

        coords: [T, 4] (object, x, y, z); feats: [T, in_channels]; part_layouts: [P, 3];
        t: [B] (x1000); cond: [B, L, Cc]; masks: [B, h, w]. Returns the flow output [T,
        out_channels] in input order and the head's articulation [P - B, 24] (PAct's head:
        without the spatial adapter).
        """
        rows, num_rows = pact_rows(coords, part_layouts)
        layout = self.layout(rows, num_rows.to(coords.device))
        out = self(feats, t, cond, layout, masks)
        return out.velocity, self.articulation_head(out.features, layout)


class FeatureAverage:
    """Multi-step feature aggregation (PAct): the mean of the last ``last`` of ``steps``
    sampler steps' features, fed to the articulation head once.

    ``add(features)`` is called once per sampler step (the conditional pass); it keeps a
    running float32 sum of the steps ``steps - last .. steps - 1``.
    """

    def __init__(self, steps: int, last: int):
        if not 1 <= last <= steps:
            raise ValueError(f"aggregate over 1..{steps} steps, got {last}")
        self.first = steps - last
        self.step = 0
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, features: torch.Tensor) -> None:
        if self.step >= self.first:
            f = features.float()
            self.total = f if self.total is None else self.total + f
            self.count += 1
        self.step += 1

    @property
    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("no step was aggregated")
        return self.total / self.count


def build_stage2(preset_or_config: str | Mapping[str, Any], *, spatial_adapter: bool = False, adapter_channels: int = 64,
                 **flow_overrides: Any) -> ArticulatedSLatFlow:
    """Build a Stage2 model from a preset name (tiny, small, pact) or the official config
    ``{"flow": ..., "head": ...}``; ``flow_overrides`` replace flow keys (e.g.
    ``use_checkpoint``)."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in STAGE2_PRESETS:
            raise ConfigError(f"unknown Stage2 preset {preset_or_config!r}; choose one of {sorted(STAGE2_PRESETS)}")
        config = STAGE2_PRESETS[preset_or_config]
    else:
        config = preset_or_config
    if not isinstance(config, Mapping) or set(config) != {"flow", "head"}:
        raise ConfigError('a Stage2 config is {"flow": SLatFlowModel args, "head": ArticulationRegressionHead args}')
    flow = {**config["flow"], **flow_overrides}
    return ArticulatedSLatFlow(flow, config["head"], spatial_adapter=spatial_adapter, adapter_channels=adapter_channels)
