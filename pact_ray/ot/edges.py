r"""Edge-regularised transport cost for the OT router.

A per-patch constant added to the cost does not change a balanced plan, so an edge
map cannot enter the cost directly; it enters through a *contextual* term instead
(ot_router.md, "Edge-regularised cost"):

1. An edge map :math:`e_p \in [0, 1]` on the h x w patch grid, from the RGB image
   (:func:`sobel_edge_map`) or from the part label map (:func:`mask_edge_map`).
2. Weights on the 4-neighbour graph of the grid,
   :math:`w_{pq} = \exp(-\beta \max(e_p, e_q))` (:func:`neighbour_weights`): close to 1
   inside a smooth region, close to 0 across a strong edge.
3. Solve once with :math:`\mathbf{C}` to get :math:`\pi^0`; smooth it over the graph,
   :math:`S_{kp} = \sum_{q \in N(p)} w_{pq} \pi^0_{kq} / \sum_{q \in N(p)} w_{pq}`
   (:func:`smooth_plan`); solve again with
   :math:`\mathbf{C}^1 = \mathbf{C} - \lambda_{edge} P \mathbf{S}` to get :math:`\pi`
   (:func:`edge_regularised_plan`). A patch whose neighbours send mass to part k
   becomes cheaper for part k, unless an edge separates them.

:func:`edge_delta` measures the fragmentation this removes. Patches are indexed in
row-major order, p = i * w + j for grid row i and column j, the order of the image
tokens of a patch embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from pact_ray.ot.sinkhorn import DEFAULT_EPS, DEFAULT_MAX_ITER, DEFAULT_TOL, SinkhornResult, sinkhorn_log

__all__ = [
    "GridWeights",
    "edge_delta",
    "edge_regularised_plan",
    "mask_edge_map",
    "neighbour_weights",
    "smooth_plan",
    "sobel_edge_map",
]

Grid = int | tuple[int, int]

# ITU-R BT.601 luma weights for R, G, B.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class GridWeights:
    """Weights of the 4-neighbour graph of an h x w patch grid, for B images."""

    horizontal: torch.Tensor  # [B, h, w-1] w between (i, j) and (i, j+1)
    vertical: torch.Tensor  # [B, h-1, w] w between (i, j) and (i+1, j)
    grid: tuple[int, int]  # (h, w)

    @cached_property
    def total(self) -> torch.Tensor:
        """[B, h, w] sum of each cell's neighbour weights; computed once, as the router
        smooths several plans (blocks, solves) with the same weights."""
        return (
            F.pad(self.horizontal, (0, 1))
            + F.pad(self.horizontal, (1, 0))
            + F.pad(self.vertical, (0, 0, 0, 1))
            + F.pad(self.vertical, (0, 0, 1, 0))
        )


def _grid_hw(grid: Grid) -> tuple[int, int]:
    """``grid`` as (h, w); an int means a square grid."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    if h < 1 or w < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    return h, w


def _pool_to_grid(per_pixel: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Average [B, H, W] over the patches of ``grid`` and max-normalise: -> [B, h*w]."""
    h, w = _grid_hw(grid)
    height, width = per_pixel.shape[-2:]
    if height % h or width % w:
        raise ValueError(f"image size {height}x{width} is not a multiple of grid {h}x{w}")
    pooled = F.avg_pool2d(per_pixel.unsqueeze(1), (height // h, width // w)).flatten(1)
    peak = pooled.amax(dim=1, keepdim=True)
    # An image without edges has peak 0 and every entry 0: 0 / tiny = 0, no NaN.
    return pooled / peak.clamp_min(torch.finfo(pooled.dtype).tiny)


@torch.no_grad()
def sobel_edge_map(images: torch.Tensor, grid: Grid) -> torch.Tensor:
    r"""Edge strength of RGB images on the patch grid, from the Sobel gradient.

    Converts to luminance :math:`Y = 0.299 R + 0.587 G + 0.114 B`, takes the Sobel
    gradient magnitude :math:`\sqrt{G_x^2 + G_y^2}` (border pixels replicated, so the
    image frame is not an edge), averages it over each patch and divides by the
    image's maximum. The map is a fixed property of the condition: it is computed
    without gradient.

    Parameters
    ----------
    images : torch.Tensor, shape [B, 3, H, W]
        RGB images in [0, 1]; H and W multiples of the grid's h and w.
    grid : int or (int, int)
        Patch grid (h, w); an int is a square grid.

    Returns
    -------
    torch.Tensor, shape [B, h*w]
        Edge map in [0, 1] (float32 or wider), row-major over the grid, with
        maximum 1 per image, or all zeros for a constant image.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    images = images.to(torch.promote_types(images.dtype, torch.float32))
    # Plain tensor ops rather than a library (kornia, skimage, OpenCV): this runs
    # inside the model's forward pass, batched, on the model's device, and must not
    # copy to the host or add a dependency for two 3x3 kernels.
    red, green, blue = images.unbind(dim=1)
    # Elementwise products and sums round the same at every pixel, so a constant
    # image has an exactly constant luminance.
    luminance = _LUMA[0] * red + _LUMA[1] * green + _LUMA[2] * blue  # [B, H, W]
    padded = F.pad(luminance.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    # The Sobel kernels factor as [1, 2, 1]^T [-1, 0, 1] (d/dx) and its transpose
    # (d/dy). Applied as shifted differences and sums, a flat region gives exactly
    # 0; a 3x3 conv2d leaves rounding residues there (~1e-8) that the max
    # normalisation below would blow up to 1 on a constant image.
    diff_x = padded[:, :, 2:] - padded[:, :, :-2]  # [B, H+2, W]
    diff_y = padded[:, 2:, :] - padded[:, :-2, :]  # [B, H, W+2]
    grad_x = diff_x[:, :-2] + 2 * diff_x[:, 1:-1] + diff_x[:, 2:]
    grad_y = diff_y[:, :, :-2] + 2 * diff_y[:, :, 1:-1] + diff_y[:, :, 2:]
    magnitude = torch.hypot(grad_x, grad_y)  # [B, H, W]
    return _pool_to_grid(magnitude, grid)


@torch.no_grad()
def mask_edge_map(masks: torch.Tensor, grid: Grid) -> torch.Tensor:
    r"""Boundary density of part label maps on the patch grid.

    A pixel is a boundary pixel if one of its 4-neighbours (inside the image) has
    another label. The map is the fraction of boundary pixels in each patch, divided
    by the image's maximum.

    Parameters
    ----------
    masks : torch.Tensor, shape [B, Hm, Wm]
        Integer label maps: 0 background, k + 1 for part k; Hm and Wm multiples of
        the grid's h and w.
    grid : int or (int, int)
        Patch grid (h, w); an int is a square grid.

    Returns
    -------
    torch.Tensor, shape [B, h*w]
        float32 edge map in [0, 1], row-major over the grid, with maximum 1 per
        image, or all zeros for a map with a single label.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be [B, Hm, Wm], got {tuple(masks.shape)}")
    differs_right = masks[:, :, 1:] != masks[:, :, :-1]  # [B, Hm, Wm-1]
    differs_down = masks[:, 1:, :] != masks[:, :-1, :]  # [B, Hm-1, Wm]
    boundary = (
        F.pad(differs_right, (0, 1))  # neighbour on the right differs
        | F.pad(differs_right, (1, 0))  # neighbour on the left differs
        | F.pad(differs_down, (0, 0, 0, 1))  # neighbour below differs
        | F.pad(differs_down, (0, 0, 1, 0))  # neighbour above differs
    )
    return _pool_to_grid(boundary.float(), grid)


def neighbour_weights(edge: torch.Tensor, grid: Grid, beta: float) -> GridWeights:
    r"""Weights :math:`w_{pq} = \exp(-\beta \max(e_p, e_q))` of the 4-neighbour graph.

    Parameters
    ----------
    edge : torch.Tensor, shape [B, h*w]
        Edge map in [0, 1], row-major over the grid.
    grid : int or (int, int)
        Patch grid (h, w); an int is a square grid.
    beta : float
        Edge sharpness :math:`\beta \geq 0`; 0 gives every pair weight 1, large
        values cut the graph at edges.

    Returns
    -------
    GridWeights
        ``horizontal`` [B, h, w-1] and ``vertical`` [B, h-1, w] weights in (0, 1].
    """
    h, w = _grid_hw(grid)
    if edge.dim() != 2 or edge.shape[1] != h * w:
        raise ValueError(f"edge must be [B, {h * w}] for grid {h}x{w}, got {tuple(edge.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    e = edge.reshape(-1, h, w)
    return GridWeights(
        horizontal=torch.exp(-beta * torch.maximum(e[:, :, :-1], e[:, :, 1:])),
        vertical=torch.exp(-beta * torch.maximum(e[:, :-1, :], e[:, 1:, :])),
        grid=(h, w),
    )


def _to_grid(
    plan: torch.Tensor, weights: GridWeights
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reshape plan [B, ..., K, P] to [B, ..., K, h, w] and weights to broadcast with it."""
    h, w = weights.grid
    if plan.dim() < 3 or plan.shape[-1] != h * w:
        raise ValueError(
            f"plan must be [B, ..., K, {h * w}] for grid {h}x{w}, got {tuple(plan.shape)}"
        )
    # Weights are per image: [B, h, w'] -> [B, 1 (middle dims and K), h, w'].
    expand = (1,) * (plan.dim() - 2)
    batch = weights.horizontal.shape[0]
    return (
        plan.unflatten(-1, (h, w)),
        weights.horizontal.reshape(batch, *expand, h, w - 1),
        weights.vertical.reshape(batch, *expand, h - 1, w),
    )


def smooth_plan(plan: torch.Tensor, weights: GridWeights) -> torch.Tensor:
    r"""Weighted average of each patch's 4 neighbours, per part.

    .. math::
        S_{kp} = \frac{\sum_{q \in N(p)} w_{pq} \pi_{kq}}{\sum_{q \in N(p)} w_{pq}}

    with :math:`N(p)` the 4-neighbours of p inside the grid (no self term). A patch
    whose weights sum to 0 (a 1x1 grid, or all its weights underflowed) keeps
    :math:`S_{kp} = \pi_{kp}`.

    Parameters
    ----------
    plan : torch.Tensor, shape [B, ..., K, P]
        Plans with P = h * w row-major; the middle dims (e.g. heads) share the
        weights of their image.
    weights : GridWeights
        Neighbour weights for B images (or 1, broadcast).

    Returns
    -------
    torch.Tensor, shape [B, ..., K, P]
        The smoothed plan S; differentiable in ``plan`` and ``weights``.
    """
    pi, horizontal, vertical = _to_grid(plan, weights)
    # Each pair (p, q) sends w_pq * pi_q to p and w_pq * pi_p to q; pads put the
    # contributions back on the full h x w grid.
    weighted_sum = (
        F.pad(horizontal * pi[..., :, 1:], (0, 1))  # from the right neighbour
        + F.pad(horizontal * pi[..., :, :-1], (1, 0))  # from the left neighbour
        + F.pad(vertical * pi[..., 1:, :], (0, 0, 0, 1))  # from the neighbour below
        + F.pad(vertical * pi[..., :-1, :], (0, 0, 1, 0))  # from the neighbour above
    )
    weight_sum = weights.total.reshape(horizontal.shape[:-1] + (horizontal.shape[-1] + 1,))
    has_neighbours = weight_sum > 0
    safe_sum = torch.where(has_neighbours, weight_sum, torch.ones_like(weight_sum))
    return torch.where(has_neighbours, weighted_sum / safe_sum, pi).flatten(-2)


def edge_delta(
    plan0: torch.Tensor,
    plan: torch.Tensor,
    weights: GridWeights,
    threshold: float = 0.5,
    part_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Fragmentation removed by the edge term, on non-edge neighbour pairs.

    .. math::
        \Delta = P \cdot \operatorname{mean}_{k, (p, q):\, w_{pq} > \text{threshold}}
            \big(|\pi^0_{kp} - \pi^0_{kq}| - |\pi_{kp} - \pi_{kq}|\big)

    where the mean also runs over any middle dims (heads). Positive when
    :math:`\pi` is smoother than :math:`\pi^0` inside regions; 0 when they are equal.
    The factor P makes it comparable across grid sizes.

    Parameters
    ----------
    plan0 : torch.Tensor, shape [B, ..., K, P]
        Plan without the edge term.
    plan : torch.Tensor, shape [B, ..., K, P]
        Plan with the edge term.
    weights : GridWeights
        Neighbour weights for B images (or 1, broadcast).
    threshold : float, optional
        Pairs with :math:`w_{pq} >` ``threshold`` count as non-edge pairs.
    part_valid : torch.Tensor, optional
        Bool, [B, K] (broadcast over the middle dims) or any shape broadcastable to
        ``plan.shape[:-1]`` such as [B, 1, K]; False marks padded part rows, left out
        of the mean. Default: all valid.

    Returns
    -------
    torch.Tensor, shape []
        The mean; 0.0 when no pair (or part) qualifies.
    """
    h, w = weights.grid
    if plan0.shape != plan.shape or plan.dim() < 3 or plan.shape[-1] != h * w:
        raise ValueError(
            f"plans must both be [B, ..., K, {h * w}] for grid {h}x{w}, got {tuple(plan0.shape)} and {tuple(plan.shape)}"
        )
    if h * w == 1:  # a 1 x 1 grid has no pair
        return plan.new_zeros(())
    if part_valid is None:
        rows = torch.ones(plan.shape[:-1], dtype=torch.bool, device=plan.device)
    elif part_valid.dim() == 2:
        rows = part_valid.reshape(part_valid.shape[0], *(1,) * (plan.dim() - 3), -1)
    else:
        rows = part_valid
    rows = rows[..., None, None]  # [B, ..., K, 1, 1]
    # The pairs as slices of the grid (horizontal: (i, j)-(i, j+1), vertical: (i, j)-(i+1, j)),
    # both plans at once: a read after the backward pass finds them out of cache, and these
    # few slices cost less than gathering every pair's two cells.
    both = torch.stack([plan0, plan]).unflatten(-1, (h, w))  # [2, B, ..., K, h, w]
    _, horizontal, vertical = _to_grid(plan, weights)
    total = plan.new_zeros(())
    count = plan.new_zeros((), dtype=torch.long)
    for change, pair_weight in (
        (both[..., :, 1:] - both[..., :, :-1], horizontal),
        (both[..., 1:, :] - both[..., :-1, :], vertical),
    ):
        if change.numel() == 0:
            continue
        change = change.abs_()
        selected = (pair_weight > threshold) & rows  # [B, ..., K, h', w'] (broadcast over heads)
        total = total + ((change[0] - change[1]) * selected).sum()
        count = count + selected.sum() * (change[0].numel() // selected.numel())
    return torch.where(count > 0, total / count.clamp_min(1), 0.0) * (h * w)


def edge_regularised_plan(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    weights: GridWeights,
    lambda_edge: float,
    eps: float = DEFAULT_EPS,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    **kw: Any,
) -> tuple[SinkhornResult, SinkhornResult]:
    r"""Two-pass solve with the contextual edge term of ot_router.md.

    Solves with :math:`\mathbf{C}` for :math:`\pi^0`, smooths it with
    :func:`smooth_plan` into :math:`\mathbf{S}`, and solves again with
    :math:`\mathbf{C}^1 = \mathbf{C} - \lambda_{edge} P \mathbf{S}`. The factor P (the h * w
    grid cells) makes :math:`P \mathbf{S}` of order 1/K whatever the grid size, so
    ``lambda_edge`` has one meaning for every P. Columns after the first h * w (the
    router's virtual patch) are not on the grid: they get no edge term.

    The second solve starts from the first one's row potential :math:`f^0` (a warm
    start: the edge term moves the potentials much less than a cold start is away from
    them), so it skips the Sinkhorn warm-up and takes only Newton steps. With
    ``differentiable=True`` in ``kw``, gradients also flow through :math:`\mathbf{S}`
    into the first solve (the warm start carries none: the solution does not depend on it).

    Parameters
    ----------
    cost : torch.Tensor, shape [B, ..., K, P]
        Base cost; its first h * w columns are the cells of ``weights.grid``.
    a : torch.Tensor, shape [B, ..., K]
        Part marginals (see :func:`~pact_ray.ot.sinkhorn.sinkhorn_log`).
    b : torch.Tensor, shape [B, ..., P]
        Patch marginals.
    weights : GridWeights
        Neighbour weights for B images (or 1, broadcast).
    lambda_edge : float
        Strength of the edge term; 0 gives :math:`\pi = \pi^0` (one solve, returned twice).
    eps, max_iter, tol : float, int, float
        Passed to :func:`~pact_ray.ot.sinkhorn.sinkhorn_log` for both solves.
    **kw
        Further keyword arguments of :func:`~pact_ray.ot.sinkhorn.sinkhorn_log`
        (``differentiable``, ``early_stop``, ``warn``).

    Returns
    -------
    (SinkhornResult, SinkhornResult)
        The first solve (:math:`\pi^0`) and the edge-regularised solve (:math:`\pi`).
    """
    first = sinkhorn_log(cost, a, b, eps=eps, max_iter=max_iter, tol=tol, **kw)
    if lambda_edge == 0:
        return first, first
    cells = weights.grid[0] * weights.grid[1]
    smoothed = smooth_plan(first.plan[..., :cells], weights)
    if cost.shape[-1] > cells:
        smoothed = F.pad(smoothed, (0, cost.shape[-1] - cells))
    edge_cost = cost - (lambda_edge * cells) * smoothed
    second = sinkhorn_log(edge_cost, a, b, eps=eps, max_iter=max_iter, tol=tol, f_init=first.f, **kw)
    return first, second
