"""Sparse voxel tensors in pure torch: submanifold 3x3x3 convolution, 2x down/upsampling.

A *level* is a set of T occupied voxels ``coords: [T, 4]`` = (row, x, y, z); ``row`` is
the batch element a voxel belongs to (in Stage2 one part row of one object), so
convolutions never mix rows. Features live beside it as ``feats: [T, C]``.

Submanifold convolution (Graham & van der Maaten, *Submanifold Sparse Convolutional
Networks*, 2017) with a 3x3x3 kernel keeps the voxel set: for every voxel p,

    out[p] = b + sum_{k in {0,1,2}^3, p + k - 1 occupied} W[:, k, :] feats[p + k - 1]

with ``W: [C_out, 3, 3, 3, C_in]`` in spconv's layout (kernel index (kx, ky, kz) along
coords columns 1, 2, 3). It equals a dense ``conv3d`` (padding 1, zeros off the set) read
at the occupied voxels, which is what the property tests check.

Why by hand: spconv (what PAct uses) gives wrong, run-to-run different results with
more than one CPU thread, and torchsparse has no wheels for this torch. This module is
the "rulebook" algorithm spconv calls native: per kernel offset k the pairs
(input voxel, output voxel) are found once per level (:class:`SparseLevel`, by hashing
coordinates and a sorted search) and every convolution of that level gathers, multiplies
and scatter-adds along them. Missing neighbours cost nothing (surface voxels have about
11 of their 26 neighbours), and the work is deterministic on CPU and GPU: within one
offset every output voxel receives at most one contribution, so the scatter-add never
accumulates into the same row twice. The backward pass is a submanifold convolution
too (the pairs of offset k, swapped, are those of the opposite offset), so only the
input is kept for it, not the 27 gathered copies autograd would store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

KERNEL = 3
OFFSETS = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)  # [27, 3], k = 9 kx + 3 ky + kz
CENTER = len(OFFSETS) // 2


def _encode(coords: torch.Tensor, span: int) -> torch.Tensor:
    """(row, x, y, z) with x, y, z in [-1, span - 2] -> one int64 key, monotone in the
    lexicographic order of (row, x, y, z). Adding ``(ox span + oy) span + oz`` to a key
    moves its voxel by (ox, oy, oz) as long as it stays in that range."""
    c = coords.long()
    return ((c[:, 0] * span + c[:, 1] + 1) * span + c[:, 2] + 1) * span + c[:, 3] + 1


@dataclass
class SparseLevel:
    """One voxel set and its convolution rulebook.

    coords: [T, 4] int64 (row, x, y, z), x, y, z >= 0; pairs[k] = (src, dst): the voxel
    ``src = dst + OFFSETS[k]`` feeds voxel ``dst`` through kernel tap k (both [n_k], dst
    increasing); the centre tap is the identity and has no entry (None).
    """

    coords: torch.Tensor
    pairs: list[tuple[torch.Tensor, torch.Tensor] | None]

    @classmethod
    def build(cls, coords: torch.Tensor) -> "SparseLevel":
        coords = coords.long()
        n = coords.shape[0]
        if n == 0 or int(coords[:, 1:].min()) < 0:
            raise ValueError("a level needs at least one voxel, with coordinates >= 0")
        span = int(coords[:, 1:].max()) + 3
        keys = _encode(coords, span)
        sorted_keys, order = torch.sort(keys)
        if n > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
            raise ValueError("a row holds the same voxel twice")
        shift = (OFFSETS.to(coords.device) * torch.tensor([span * span, span, 1], device=coords.device)).sum(1)
        pairs: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for k in range(len(OFFSETS)):
            if k == CENTER:
                pairs.append(None)
                continue
            wanted = keys + shift[k]
            pos = torch.searchsorted(sorted_keys, wanted).clamp(max=n - 1)
            hit = sorted_keys[pos] == wanted
            dst = torch.nonzero(hit).flatten()
            pairs.append((order[pos[dst]], dst))
        return cls(coords=coords, pairs=pairs)

    @property
    def size(self) -> int:
        return self.coords.shape[0]

    @property
    def rows(self) -> torch.Tensor:
        """[T] the row of every voxel."""
        return self.coords[:, 0]

    def active_pairs(self) -> int:
        """Number of (input, output) products of one convolution, the centre tap included."""
        return self.size + sum(int(p[0].numel()) for p in self.pairs if p is not None)


def downsample(coords: torch.Tensor, factor: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The cells of the ``factor``-coarser grid that hold voxels, row by row.

    coords: [T, 4] -> coarse coords [T', 4] (row, x // f, y // f, z // f), sorted by
    (row, x, y, z) and unique, and parent [T]: the coarse cell of every voxel.
    """
    coarse = torch.cat([coords[:, :1], torch.div(coords[:, 1:], factor, rounding_mode="floor")], dim=1)
    cells, parent = torch.unique(coarse, dim=0, return_inverse=True)
    return cells, parent


def pool_into_zeros(feats: torch.Tensor, parent: torch.Tensor, cells: int) -> torch.Tensor:
    """Average the voxels of each coarse cell the way PAct's SparseDownsample does it:
    ``scatter_reduce(mean)`` into a zero tensor includes the zero, so a cell of n voxels gets

        out[c] = (sum_{parent(i) = c} feats[i]) / (n_c + 1).

    feats: [T, C], parent: [T] in 0..cells-1 -> [cells, C].
    """
    out = torch.zeros(cells, feats.shape[1], dtype=feats.dtype, device=feats.device)
    return out.scatter_reduce(0, parent[:, None].expand_as(feats), feats, reduce="mean", include_self=True)


def _conv_along(x: torch.Tensor, taps: torch.Tensor, level: SparseLevel, swap: bool) -> torch.Tensor:
    """sum over kernel taps k of ``x[src] @ taps[k]`` scattered to ``dst`` (``swap``: from dst
    to src, the transposed operator). x: [T, Ci], taps: [27, Ci, Co] -> [T, Co]."""
    out = x @ taps[CENTER]
    for k, pair in enumerate(level.pairs):
        if pair is None or pair[0].numel() == 0:
            continue
        src, dst = (pair[1], pair[0]) if swap else pair
        out.index_add_(0, dst, x[src] @ taps[k])
    return out


class _SubmanifoldConv(torch.autograd.Function):
    """y = conv(x; W) along a level's rulebook; saves x and W only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, taps: torch.Tensor, level: SparseLevel) -> torch.Tensor:
        ctx.level = level
        ctx.save_for_backward(x, taps)
        return _conv_along(x, taps, level, swap=False)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, taps = ctx.saved_tensors
        level: SparseLevel = ctx.level
        grad_x = grad_taps = None
        if ctx.needs_input_grad[0]:
            # dL/dx[src] = sum_k W_k^T dL/dy[dst]: the same pairs read the other way round.
            grad_x = _conv_along(grad_out, taps.transpose(1, 2), level, swap=True)
        if ctx.needs_input_grad[1]:
            # dL/dW_k = sum_{(src, dst) in pairs_k} x[src]^T dL/dy[dst]
            grad_taps = torch.zeros_like(taps)
            grad_taps[CENTER] = x.T @ grad_out
            for k, pair in enumerate(level.pairs):
                if pair is not None and pair[0].numel():
                    grad_taps[k] = x[pair[0]].T @ grad_out[pair[1]]
        return grad_x, grad_taps, None


def submanifold_conv3d(feats: torch.Tensor, level: SparseLevel, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """3x3x3 submanifold convolution of ``feats: [T, C_in]`` on ``level``.

    weight: [C_out, 3, 3, 3, C_in] (spconv layout); bias: [C_out] -> [T, C_out].
    Under autocast the products run in the autocast dtype (as a Linear would); otherwise
    in the dtype of ``feats`` and ``weight`` (float64 stays float64).
    """
    if feats.shape[0] != level.size:
        raise ValueError(f"feats has {feats.shape[0]} rows but the level has {level.size} voxels")
    device = feats.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(feats.dtype, weight.dtype)
    taps = weight.flatten(1, 3).permute(1, 2, 0).to(dtype)  # [27, C_in, C_out]
    with torch.autocast(device, enabled=False):
        out = _SubmanifoldConv.apply(feats.to(dtype), taps, level)
        if bias is not None:
            out = out + bias.to(dtype)
    return out


class SubMConv3d(nn.Module):
    """A 3x3x3 submanifold convolution with spconv's parameter layout (``weight`` [out, 3,
    3, 3, in], ``bias`` [out]), initialised as ``nn.Conv3d`` is (kaiming-uniform with
    a = sqrt(5), fan-in 27 * in: both bounds are 1 / sqrt(fan_in))."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, KERNEL, KERNEL, KERNEL, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.in_channels * KERNEL**3)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, feats: torch.Tensor, level: SparseLevel) -> torch.Tensor:
        """feats: [T, in] -> [T, out] on the voxels of ``level``."""
        return submanifold_conv3d(feats, level, self.weight, self.bias)


class SparseConv3d(nn.Module):
    """PAct's ``SparseConv3d`` wrapper (``conv`` holds the weights: ``conv1.conv.weight``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = SubMConv3d(in_channels, out_channels)

    def forward(self, feats: torch.Tensor, level: SparseLevel) -> torch.Tensor:
        return self.conv(feats, level)
