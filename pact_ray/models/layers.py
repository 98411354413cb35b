"""Building blocks of the PAct / TRELLIS structure-flow transformer.

Module and parameter names follow the published model exactly (see
``docs/specs/stage1_pact.md``) so that official checkpoints load strictly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is a lower precision (TRELLIS computes its norms in float32),
    otherwise unchanged (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 or wider whatever the input dtype (TRELLIS convention)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(at_least_float32(x)).type(x.dtype)


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm: ``normalize(x) * gamma * sqrt(head_dim)``.

    x: [..., heads, head_dim]; ``gamma``: [heads, head_dim] (initialised to ones).
    """

    def __init__(self, head_dim: int, heads: int):
        super().__init__()
        self.scale = head_dim**0.5
        self.gamma = nn.Parameter(torch.ones(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(at_least_float32(x), dim=-1) * self.gamma * self.scale).to(x.dtype)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention on ``[B, L, H, D]`` tensors (TRELLIS layout).

    bias: optional additive attention bias broadcastable to ``[B, H, Lq, Lk]``.
    Returns ``[B, Lq, H, D]``.
    """
    q, k, v = (u.permute(0, 2, 1, 3) for u in (q, k, v))
    if bias is not None:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return out.permute(0, 2, 1, 3)


class SelfAttention(nn.Module):
    """``self_attn``: fused qkv projection, per-head RMS norm on q and k, SDPA, output projection."""

    def __init__(self, channels: int, num_heads: int, qk_rms_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.qk_rms_norm = qk_rms_norm
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, L, C] -> q, k, v each [B, L, H, D]."""
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        if self.qk_rms_norm:
            q = self.q_rms_norm(q)
            k = self.k_rms_norm(k)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        h = sdpa(q, k, v)
        return self.to_out(h.reshape(x.shape[0], x.shape[1], -1))


class CrossAttention(nn.Module):
    """``cross_attn``: ``to_q`` on the tokens, ``to_kv`` (k then v) on the condition, no qk norm."""

    def __init__(self, channels: int, ctx_channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(ctx_channels, 2 * channels)
        self.to_out = nn.Linear(channels, channels)

    def project(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, L, C], context: [B, M, Cc] -> q [B, L, H, D], k, v [B, M, H, D]."""
        b, n, _ = x.shape
        q = self.to_q(x).reshape(b, n, self.num_heads, self.head_dim)
        k, v = self.to_kv(context).reshape(b, context.shape[1], 2, self.num_heads, self.head_dim).unbind(2)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        h = sdpa(q, k, v, bias)
        return self.to_out(h.reshape(q.shape[0], q.shape[1], -1))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.project(x, context))


class FeedForwardNet(nn.Module):
    """``mlp.mlp.{0,2}``: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class TimestepEmbedder(nn.Module):
    """``t_embedder.mlp``: GLIDE sinusoidal embedding (cos half first) -> Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """t: [N] float -> [N, dim]."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # The embedding is computed in float32 (as TRELLIS does) and handed to the MLP in its
        # own dtype: a no-op for float32 weights, exact float64 for the invariance tests.
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


def absolute_position_embedding(resolution: int, channels: int) -> torch.Tensor:
    """3-axis sin/cos absolute embedding of a ``resolution^3`` grid -> [resolution^3, channels].

    Per axis ``channels // 3 // 2`` frequencies ``1 / 10000^(i / freq_dim)``; sin then cos; the
    three axes (i, j, k in 'ij' order) concatenated and zero-padded to ``channels``.
    """
    freq_dim = channels // 3 // 2
    freqs = 1.0 / (10000 ** (torch.arange(freq_dim, dtype=torch.float32) / freq_dim))
    grid = torch.meshgrid(*[torch.arange(resolution, dtype=torch.float32)] * 3, indexing="ij")
    coords = torch.stack(grid, dim=-1).reshape(-1, 3)
    out = torch.outer(coords.reshape(-1), freqs)
    emb = torch.cat([torch.sin(out), torch.cos(out)], dim=-1).reshape(coords.shape[0], -1)
    if emb.shape[1] < channels:
        emb = torch.cat([emb, torch.zeros(emb.shape[0], channels - emb.shape[1])], dim=-1)
    return emb


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, R, R, R] -> [N, C * p^3, R/p, R/p, R/p] (TRELLIS ordering)."""
    if patch_size == 1:
        return x
    dims = x.dim() - 2
    shape = sum([[x.shape[d] // patch_size, patch_size] for d in range(2, dims + 2)], [])
    x = x.reshape(*x.shape[:2], *shape)
    x = x.permute(0, 1, *([2 * i + 3 for i in range(dims)] + [2 * i + 2 for i in range(dims)]))
    return x.reshape(x.shape[0], x.shape[1] * patch_size**dims, *x.shape[-dims:])


def unpatchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    if patch_size == 1:
        return x
    dims = x.dim() - 2
    c = x.shape[1] // patch_size**dims
    x = x.reshape(x.shape[0], c, *([patch_size] * dims), *x.shape[-dims:])
    x = x.permute(0, 1, *(sum([[2 + dims + i, 2 + i] for i in range(dims)], [])))
    return x.reshape(x.shape[0], c, *[x.shape[2 + 2 * i] * patch_size for i in range(dims)])


class ModulatedBlockModules(nn.Module):
    """The modules of a TRELLIS ``ModulatedTransformerCrossBlock`` (names as in the official
    checkpoints): norm1/norm3 without affine, norm2 with affine, self-attention, cross-attention,
    MLP and the adaLN modulation producing six chunks. Subclasses define ``forward``."""

    def __init__(self, channels: int, ctx_channels: int, num_heads: int, mlp_ratio: float, qk_rms_norm: bool):
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfAttention(channels, num_heads, qk_rms_norm=qk_rms_norm)
        self.cross_attn = CrossAttention(channels, ctx_channels, num_heads)
        self.mlp = FeedForwardNet(channels, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)



def build_from_preset(cls: type, presets: dict[str, dict[str, Any]], what: str, preset_or_config: str | dict[str, Any], **overrides: Any):
    """``cls(**config)`` from a preset name in ``presets`` or a config dict, with ``overrides``."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in presets:
            raise ValueError(f"unknown {what} preset {preset_or_config!r}; choose one of {sorted(presets)}")
        cfg = dict(presets[preset_or_config])
    else:
        cfg = dict(preset_or_config)
    cfg.update(overrides)
    return cls(**cfg)
