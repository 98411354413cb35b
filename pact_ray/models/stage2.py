"""Stage2: PAct's structured-latent flow transformer with its articulation regression head.

PAct's Stage2 (``docs/specs/stage2.md``) denoises the structured latents of the occupied
voxels of every part, with one extra row per object for the whole object (the union of
its parts' voxels), and regresses each part's 24-number articulation vector from the
last block's features. This core keeps that shape at a configurable size:

- tokens are the occupied voxels of each row (whole object, then parts), as padded sets
  ``[N, M, ...]`` with a validity mask; no sparse-convolution library is needed. PAct's
  sparse-conv IO res-blocks (64^3 -> 32^3 and back) are left out: tokens stay at the voxel
  grid G, and the CPU presets cap the tokens per row instead (``STAGE2_MAX_TOKENS``);
- the input of a voxel is its noisy latent (8 channels) plus one clean channel, the
  shared-voxel flag (1 where the cell is occupied by more than one part of the object:
  hinges, slides and contacts, where joints live). The spec's "8 + 1 latent channels"
  names the count but not the meaning of the extra channel; this is our reading;
- positions: the TRELLIS 3-axis sin/cos embedding of the voxel coordinates, plus a
  learned part-position embedding of the row (row 0 the whole object, row k + 1 part k;
  its projection zero-initialised, as in PAct);
- every block attends over all valid voxel tokens of an object (all its rows at once,
  PAct's full attention; padding is masked out of the keys), cross-attends to the
  object's image tokens (with PAct's mask-group embedding added to the first h*w of
  them), and is adaLN-modulated by the timestep;
- the articulation head (:class:`ArticulationHead`) reads the last block's features of
  each part row; the whole-object row has no articulation;
- optionally a spatial adapter (:class:`SpatialAdapter`): an MLP from the part's 2D mask
  moments (:func:`mask_moments`) to a 24-d residual, zero-initialised.

Module names follow PAct's SLatFlowModel where the module exists (``t_embedder``,
``input_layer``, ``part_pe``/``part_pe_proj``, ``mask_group_emb``/``mask_group_emb_proj``,
``blocks.{i}``, ``out_layer``); without the IO res-blocks the state dict is not PAct's, so
"official" Stage2 initialisation reads a checkpoint of this model (e.g. a full run's
exported ``state.pt``).

Shapes: B objects; N = sum_b (K_b + 1) rows, object by object, each object's whole-object
row first; P = sum_b K_b part rows; M padded tokens per row; R the most rows of an object
and S = R * M the tokens of an object inside the transformer; C the width; L condition
tokens (prefix tokens then h*w image patches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pact_ray.data.articulation import ARTICULATION_DIM
from pact_ray.metrics import names as M
from pact_ray.models.layers import ModulatedBlockModules, TimestepEmbedder, at_least_float32, build_from_preset, modulate, sdpa
from pact_ray.models.presets import STAGE2_PRESETS

# The spatial moments of a part's 2D mask: the column order of mask_moments (and their metric names).
MOMENT_NAMES = M.MASK_MOMENTS


# ------------------------------------------------------------------ layout

@dataclass
class TokenLayout:
    """How the padded rows of a batch group into objects.

    valid: [N, M] real voxels; row_obj: [N] object of each row; row_idx: [N] row inside
    its object (0 the whole object, k + 1 part k); num_rows: [B]; rows_max: R.
    """

    valid: torch.Tensor
    row_obj: torch.Tensor
    row_idx: torch.Tensor
    num_rows: torch.Tensor
    rows_max: int

    @classmethod
    def build(cls, num_rows: torch.Tensor, valid: torch.Tensor) -> "TokenLayout":
        counts = [int(c) for c in num_rows.tolist()]
        n = valid.shape[0]
        if any(c < 1 for c in counts) or sum(counts) != n:
            raise ValueError(f"num_rows {counts} must be positive and sum to the {n} rows of x")
        device = valid.device
        num_rows = torch.as_tensor(counts, dtype=torch.long, device=device)
        row_obj = torch.repeat_interleave(torch.arange(len(counts), device=device), num_rows)
        row_idx = torch.arange(n, device=device) - (torch.cumsum(num_rows, 0) - num_rows)[row_obj]
        return cls(valid=valid, row_obj=row_obj, row_idx=row_idx, num_rows=num_rows, rows_max=max(counts))

    @property
    def is_part(self) -> torch.Tensor:
        """[N] bool: part rows (not the whole-object row)."""
        return self.row_idx > 0

    def to_objects(self, h: torch.Tensor) -> torch.Tensor:
        """h: [N, M, C] -> [B, S, C], each object's rows side by side (missing rows are zeros)."""
        n, m = h.shape[:2]
        out = h.new_zeros(len(self.num_rows), self.rows_max, m, *h.shape[2:])
        out = out.index_put((self.row_obj, self.row_idx), h)
        return out.reshape(len(self.num_rows), self.rows_max * m, *h.shape[2:])

    def to_rows(self, h: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_objects`: [B, S, C] -> [N, M, C]."""
        m = self.valid.shape[1]
        return h.reshape(h.shape[0], self.rows_max, m, *h.shape[2:])[self.row_obj, self.row_idx]

    def key_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, 1, S] additive attention bias: 0 for an object's real voxels, -inf for padding."""
        keep = self.to_objects(self.valid)
        bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))
        return bias[:, None, None, :]


def voxel_position_embedding(coords: torch.Tensor, channels: int) -> torch.Tensor:
    """TRELLIS's absolute position embedding of integer voxel coordinates.

    coords: [..., 3] -> [..., channels]. Per axis ``f = channels // 3 // 2`` frequencies
    ``w_i = 1 / 10000^(i / f)``; each axis contributes ``[sin(x w), cos(x w)]``; the three
    axes are concatenated and zero-padded to ``channels``. For the cells of a full grid it
    equals ``layers.absolute_position_embedding``.
    """
    freq_dim = channels // 3 // 2
    freqs = 1.0 / (10000 ** (torch.arange(freq_dim, dtype=torch.float32, device=coords.device) / freq_dim))
    angles = coords.float()[..., None] * freqs  # [..., 3, f]
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

class MaskedCrossBlock(ModulatedBlockModules):
    """``blocks.{i}``: adaLN-modulated self-attention over an object's voxel tokens (padding
    masked out of the keys), cross-attention to its image tokens, MLP. TRELLIS's
    ModulatedSparseTransformerCrossBlock on padded sets; the submodule names follow it."""

    def __init__(self, channels: int, ctx_channels: int, num_heads: int, mlp_ratio: float, qk_rms_norm: bool):
        super().__init__(channels, ctx_channels, num_heads, mlp_ratio, qk_rms_norm)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, cond: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x: [B, S, C]; t_emb: [B, C]; cond: [B, L, Cc]; key_bias: [B, 1, 1, S] -> [B, S, C]."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(t_emb).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        q, k, v = self.self_attn.qkv(h)
        h = self.self_attn.to_out(sdpa(q, k, v, key_bias).reshape(x.shape))
        x = x + h * gate_msa.unsqueeze(1)
        x = x + self.cross_attn(self.norm2(x), cond)
        h = modulate(self.norm3(x), shift_mlp, scale_mlp)
        return x + self.mlp(h) * gate_mlp.unsqueeze(1)


class ArticulationHead(nn.Module):
    """PAct's articulation regression head: row features -> 24 numbers.

    With g(h) = V2 silu(V1 h) applied per token (``in_layers``: C -> F -> F/2), and the
    global average and max pooling over the row's valid tokens T,

        a = W3 silu(W2 silu(W1 [mean_{i in T} g(h_i) ; max_{i in T} g(h_i)]))

    (``out_layers``: F -> F -> F -> 24). W3 and its bias start at zero, so a fresh head
    predicts 0 everywhere.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        if hidden % 2:
            raise ValueError(f"head_channels must be even (mean and max halves), got {hidden}")
        self.in_layers = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, hidden // 2))
        self.out_layers = nn.Sequential(
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, ARTICULATION_DIM)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform Linears with zero bias (PAct), the last one all zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.out_layers[-1].weight)

    def forward(self, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """features: [R, M, C]; valid: [R, M] with at least one True per row -> [R, 24]."""
        g = self.in_layers(features)
        keep = valid[..., None]
        mean = g.masked_fill(~keep, 0).sum(1) / valid.sum(1, keepdim=True).to(g.dtype)
        peak = g.masked_fill(~keep, float("-inf")).amax(1)
        return self.out_layers(torch.cat([mean, peak], dim=-1))


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
    """velocity: [N, M, out_channels] (zeros at padding); features: [N, M, C] of the last
    block, what the articulation head reads; layout: the batch's token layout."""

    velocity: torch.Tensor
    features: torch.Tensor
    layout: TokenLayout


class ArticulatedSLatFlow(nn.Module):
    """PAct Stage2 flow transformer over per-row voxel sets, with the articulation head.

    ``spatial_adapter`` adds a :class:`SpatialAdapter` (the spatial_adapter variant). It is
    built after every other module is initialised, so the rest of the model's initial
    weights are the same with or without it (for a given torch seed).
    """

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        cond_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int = 64,
        mlp_ratio: float = 4,
        qk_rms_norm: bool = True,
        use_checkpoint: bool = False,
        max_num_parts: int = 32,
        mask_channels: int = 128,
        head_channels: int = 128,
        spatial_adapter: bool = False,
        adapter_channels: int = 64,
    ):
        super().__init__()
        if num_heads is None:
            num_heads = model_channels // num_head_channels
        if model_channels % num_heads:
            raise ValueError(f"model_channels {model_channels} is not divisible by num_heads {num_heads}")
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.cond_channels = cond_channels
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.max_num_parts = max_num_parts

        self.t_embedder = TimestepEmbedder(model_channels)
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.part_pe = nn.Embedding(max_num_parts + 1, model_channels)  # row 0: the whole object
        self.part_pe_proj = nn.Linear(model_channels, model_channels)
        self.mask_group_emb = nn.Embedding(max_num_parts + 1, mask_channels)  # label 0: background
        self.mask_group_emb_proj = nn.Linear(mask_channels, cond_channels)
        self.blocks = nn.ModuleList(
            MaskedCrossBlock(model_channels, cond_channels, num_heads, mlp_ratio, qk_rms_norm) for _ in range(num_blocks)
        )
        self.out_layer = nn.Linear(model_channels, out_channels)
        self.art_head = ArticulationHead(model_channels, head_channels)
        self.spatial_adapter: SpatialAdapter | None = None
        self.initialize_weights()
        if spatial_adapter:
            self.spatial_adapter = SpatialAdapter(adapter_channels)

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """TRELLIS/PAct init: xavier-uniform Linears with zero bias, N(0, 0.02) embeddings and
        timestep MLP; zero-init adaLN modulation, output layer, part-embedding and
        mask-embedding projections, and the last Linear of the head and the adapter."""
        heads = {m for head in (self.art_head, self.spatial_adapter) if head is not None for m in head.modules()}
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in heads:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.part_pe.weight, std=0.02)
        nn.init.normal_(self.mask_group_emb.weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.out_layer, self.part_pe_proj, self.mask_group_emb_proj]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.art_head.reset_parameters()
        if self.spatial_adapter is not None:
            self.spatial_adapter.reset_parameters()

    def core_state_dict_keys(self) -> list[str]:
        """Keys a Stage2 checkpoint must provide: everything but the spatial adapter (ours),
        the articulation head's first, so that a checkpoint with another head is reported
        by its head keys."""
        keys = [k for k in self.state_dict() if not k.startswith("spatial_adapter.")]
        return sorted(keys, key=lambda k: not k.startswith("art_head."))

    # --------------------------------------------------------------- forward
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

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        coords: torch.Tensor,
        valid: torch.Tensor,
        num_rows: torch.Tensor,
        masks: torch.Tensor | None = None,
    ) -> Stage2Output:
        """Predict the flow velocity of every voxel token.

        x: [N, M, in_channels] (noisy latents, then the clean shared-voxel flag); t: [B]
        timesteps of the objects (scaled by 1000 in training); cond: [B, L, Cc] image
        tokens; coords: [N, M, 3] voxel coordinates in 0..G-1; valid: [N, M] (every row
        needs a voxel); num_rows: [B] rows per object (K + 1: the whole object, then its
        parts); masks: [B, h, w] grid masks (labels k + 1 = part k = row k + 1).
        Outputs at valid tokens do not depend on the padding.
        """
        if not bool(valid.any(1).all()):
            raise ValueError("every row needs at least one valid voxel token")
        layout = TokenLayout.build(num_rows, valid)
        if int(layout.row_idx.max()) > self.max_num_parts:
            raise ValueError(f"an object has {int(layout.row_idx.max())} parts; the model handles {self.max_num_parts}")
        cond = self.condition(cond, masks)
        h = self.input_layer(x) + voxel_position_embedding(coords, self.model_channels)
        h = h + self.part_pe_proj(self.part_pe(layout.row_idx))[:, None]
        t_emb = self.t_embedder(t)
        h = layout.to_objects(h)
        bias = layout.key_bias(h.dtype)
        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, t_emb, cond, bias, use_reentrant=False)
            else:
                h = block(h, t_emb, cond, bias)
        features = layout.to_rows(h)
        out = self.out_layer(F.layer_norm(at_least_float32(features), features.shape[-1:]).to(self.out_layer.weight.dtype))
        return Stage2Output(velocity=out * valid[..., None], features=features, layout=layout)

    def articulate(self, features: torch.Tensor, layout: TokenLayout, moments: torch.Tensor | None = None) -> torch.Tensor:
        """Articulation vectors of the part rows: features [N, M, C] -> [P, 24] (objects in
        order, parts 0..K-1). ``moments`` [P, 10] (mask_moments) feed the spatial adapter
        and are required when the model has one."""
        parts = layout.is_part
        pred = self.art_head(features[parts], layout.valid[parts])
        if self.spatial_adapter is not None:
            if moments is None:
                raise ValueError("the spatial adapter needs the parts' mask moments")
            pred = pred + self.spatial_adapter(moments.to(pred.dtype))
        return pred


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


def build_stage2(preset_or_config: str | dict[str, Any], **overrides: Any) -> ArticulatedSLatFlow:
    """Build a Stage2 model from a preset name (tiny, small, pact) or a config dict."""
    return build_from_preset(ArticulatedSLatFlow, STAGE2_PRESETS, "Stage2", preset_or_config, **overrides)

