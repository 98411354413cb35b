"""Tests of the edge-regularised cost: edge maps, neighbour weights, plan smoothing,
the edge_delta diagnostic and the two-pass solve.

Tolerances (issue #11): exact where the two sides compute the same correctly rounded
operations (elementwise arithmetic gives the same bits whatever the batch or vector
width); otherwise derived with ``tests/numerics.py`` (a comment says from what).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import assert_within_rounding

from pact_ray.ot.edges import (
    GridWeights,
    edge_delta,
    edge_regularised_plan,
    mask_edge_map,
    neighbour_weights,
    smooth_plan,
    sobel_edge_map,
)
from pact_ray.ot.sinkhorn import sinkhorn_log

grids = st.tuples(st.integers(1, 6), st.integers(1, 6))
seeds = st.integers(0, 2**31 - 1)


def patch_columns_lit(edge_map: torch.Tensor, grid: tuple[int, int]) -> set[int]:
    """Grid columns with a non-zero edge value in image 0 (all rows must agree)."""
    lit = edge_map[0].reshape(grid) > 0
    assert torch.all(lit == lit[0]), "a vertical edge lights whole columns"
    return set(torch.nonzero(lit[0]).flatten().tolist())


def step_columns(step: int, patch_width: int) -> set[int]:
    """Patch columns holding the pixels on either side of a step between step-1 and step."""
    return {(step - 1) // patch_width, step // patch_width}


def reference_smooth(plan: torch.Tensor, weights: GridWeights) -> torch.Tensor:
    """S[k, p] by an explicit loop over patches and their neighbours; plan [B, K, P]."""
    h, w = weights.grid
    smoothed = torch.empty_like(plan)
    for i, j in itertools.product(range(h), range(w)):
        neighbours = []
        if j + 1 < w:
            neighbours.append((i, j + 1, weights.horizontal[:, i, j]))
        if j > 0:
            neighbours.append((i, j - 1, weights.horizontal[:, i, j - 1]))
        if i + 1 < h:
            neighbours.append((i + 1, j, weights.vertical[:, i, j]))
        if i > 0:
            neighbours.append((i - 1, j, weights.vertical[:, i - 1, j]))
        total = sum((wq for _, _, wq in neighbours), torch.zeros(plan.shape[0], dtype=plan.dtype))
        weighted = sum(
            (wq[:, None] * plan[:, :, qi * w + qj] for qi, qj, wq in neighbours),
            torch.zeros(plan.shape[:2], dtype=plan.dtype),
        )
        p = i * w + j
        has = total > 0
        smoothed[:, :, p] = torch.where(
            has[:, None], weighted / torch.where(has, total, 1.0)[:, None], plan[:, :, p]
        )
    return smoothed


def reference_edge_delta(plan0, plan, weights, threshold, part_valid):
    """edge_delta by a loop over neighbour pairs; plans [B, K, P], part_valid [B, K]."""
    h, w = weights.grid
    pairs = [
        ((i, j), (i, j + 1), weights.horizontal[:, i, j]) for i in range(h) for j in range(w - 1)
    ]
    pairs += [
        ((i, j), (i + 1, j), weights.vertical[:, i, j]) for i in range(h - 1) for j in range(w)
    ]
    terms = []
    for (pi, pj), (qi, qj), weight in pairs:
        p, q = pi * w + pj, qi * w + qj
        for batch, part in itertools.product(range(plan.shape[0]), range(plan.shape[1])):
            if weight[batch] > threshold and part_valid[batch, part]:
                before = (plan0[batch, part, p] - plan0[batch, part, q]).abs()
                after = (plan[batch, part, p] - plan[batch, part, q]).abs()
                terms.append(before - after)
    return torch.stack(terms).mean() * h * w if terms else torch.tensor(0.0)


# --- edge maps -----------------------------------------------------------------------


@pytest.mark.parametrize("step", [12, 16])  # inside patch column 1; on the 1|2 border
def test_sobel_lights_the_patch_columns_at_a_vertical_step(step):
    grid, size = (4, 4), 32
    image = torch.zeros(1, 3, size, size)
    image[..., step:] = 1.0

    edge = sobel_edge_map(image, grid)

    assert patch_columns_lit(edge, grid) == step_columns(step, size // grid[1])
    assert edge.max() == 1.0 and edge.shape == (1, 16)


def test_sobel_sees_a_horizontal_step_in_rows():
    image = torch.zeros(1, 3, 32, 32)
    image[..., 12:, :] = 0.5

    edge = sobel_edge_map(image, (4, 4)).reshape(4, 4)

    assert torch.all(edge[1] == 1.0) and torch.all(edge[[0, 2, 3]] == 0)


@settings(max_examples=20, deadline=None)
@given(colour=st.tuples(*[st.floats(0, 1)] * 3), grid=grids, patch=st.integers(1, 4))
def test_sobel_of_a_constant_image_is_zero(colour, grid, patch):
    image = torch.tensor(colour).reshape(1, 3, 1, 1).expand(2, 3, grid[0] * patch, grid[1] * patch)

    edge = sobel_edge_map(image, grid)

    assert edge.shape == (2, grid[0] * grid[1]) and torch.all(edge == 0)


@settings(max_examples=20, deadline=None)
@given(grid=grids, patch=st.integers(1, 4), seed=seeds)
def test_sobel_of_random_images_is_max_normalised(grid, patch, seed):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, grid[0] * patch, grid[1] * patch, generator=gen)

    edge = sobel_edge_map(image, grid)

    assert torch.all((edge >= 0) & (edge <= 1))
    assert torch.all((edge.amax(dim=1) == 1) | (edge.amax(dim=1) == 0))


def test_sobel_rejects_sizes_off_the_grid():
    with pytest.raises(ValueError, match="multiple"):
        sobel_edge_map(torch.zeros(1, 3, 30, 32), (4, 4))


@pytest.mark.parametrize("step", [12, 16])
def test_mask_edge_lights_the_patch_columns_between_two_half_planes(step):
    grid, size = (4, 4), 32
    labels = torch.ones(1, size, size, dtype=torch.long)
    labels[..., step:] = 2

    edge = mask_edge_map(labels, grid)

    assert patch_columns_lit(edge, grid) == step_columns(step, size // grid[1])
    assert edge.max() == 1.0


@settings(max_examples=20, deadline=None)
@given(label=st.integers(0, 5), grid=grids, patch=st.integers(1, 4))
def test_mask_edge_of_a_single_label_is_zero(label, grid, patch):
    labels = torch.full((2, grid[0] * patch, grid[1] * patch), label)

    edge = mask_edge_map(labels, grid)

    assert edge.shape == (2, grid[0] * grid[1]) and torch.all(edge == 0)


@settings(max_examples=40, deadline=None)
@given(grid=grids, patch=st.integers(1, 3), n_labels=st.integers(1, 4), seed=seeds)
def test_mask_edge_matches_a_pixel_loop(grid, patch, n_labels, seed):
    gen = torch.Generator().manual_seed(seed)
    height, width = grid[0] * patch, grid[1] * patch
    labels = torch.randint(0, n_labels, (1, height, width), generator=gen)

    boundary = torch.zeros(height, width)
    for y, x in itertools.product(range(height), range(width)):
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            ny, nx = y + dy, x + dx
            if 0 <= ny < height and 0 <= nx < width and labels[0, ny, nx] != labels[0, y, x]:
                boundary[y, x] = 1.0
    fraction = boundary.reshape(grid[0], patch, grid[1], patch).mean(dim=(1, 3)).flatten()
    expected = fraction / fraction.max() if fraction.max() > 0 else fraction

    # Counts of boundary pixels are exact; the division by the patch area and the one by
    # the maximum round once each (possibly as a multiplication by a rounded reciprocal).
    assert_within_rounding(mask_edge_map(labels, grid)[0], expected, ops=4, scale=1.0, what="mask edge map")


# --- neighbour weights and smoothing --------------------------------------------------


def test_neighbour_weights_use_the_larger_edge_of_each_pair():
    edge = torch.tensor([[0.0, 0.5, 1.0, 0.0, 0.25, 0.0]])  # grid 2 x 3
    beta = 2.0

    weights = neighbour_weights(edge, (2, 3), beta)

    expected_h = torch.exp(-beta * torch.tensor([[[0.5, 1.0], [0.25, 0.25]]]))
    expected_v = torch.exp(-beta * torch.tensor([[[0.0, 0.5, 1.0]]]))
    # The same elementwise operations on the same values: the same bits.
    assert torch.equal(weights.horizontal, expected_h)
    assert torch.equal(weights.vertical, expected_v)
    assert weights.grid == (2, 3)


@settings(max_examples=30, deadline=None)
@given(grid=grids, n_parts=st.integers(1, 4), beta=st.floats(0, 20), seed=seeds)
def test_smooth_plan_matches_a_patch_loop(grid, n_parts, beta, seed):
    gen = torch.Generator().manual_seed(seed)
    n_patches = grid[0] * grid[1]
    edge = torch.rand(2, n_patches, generator=gen, dtype=torch.float64)
    weights = neighbour_weights(edge, grid, beta)
    plan = torch.rand(2, n_parts, n_patches, generator=gen, dtype=torch.float64)

    # At most 4 weighted neighbours summed in another order, then one division (numerator
    # and denominator each carry 4 products and 3 additions).
    assert_within_rounding(smooth_plan(plan, weights), reference_smooth(plan, weights), ops=16, scale=1.0,
                           what="smoothed plan")


@settings(max_examples=30, deadline=None)
@given(grid=grids, beta=st.floats(0, 50), seed=seeds)
def test_smooth_plan_keeps_a_plan_constant_over_the_grid(grid, beta, seed):
    gen = torch.Generator().manual_seed(seed)
    n_patches = grid[0] * grid[1]
    weights = neighbour_weights(torch.rand(2, n_patches, generator=gen), grid, beta)
    per_part = torch.rand(2, 3, 5, 1, generator=gen)
    plan = per_part.expand(2, 3, 5, n_patches)

    # sum_q w_q pi / sum_q w_q for a constant pi: the rounding of 4 products, two sums of
    # 4 terms and a division, relative to pi <= 1.
    assert_within_rounding(smooth_plan(plan, weights), plan.contiguous(), ops=16, scale=1.0, what="constant plan")


def test_smooth_plan_broadcasts_weights_over_heads():
    gen = torch.Generator().manual_seed(0)
    grid = (3, 4)
    weights = neighbour_weights(torch.rand(2, 12, generator=gen), grid, 3.0)
    plan = torch.rand(2, 5, 3, 12, generator=gen)  # [B, heads, K, P]

    smoothed = smooth_plan(plan, weights)

    assert smoothed.shape == plan.shape
    for head in range(5):
        # Elementwise: each entry is computed by the same operations either way.
        assert torch.equal(smoothed[:, head], smooth_plan(plan[:, head], weights))


def test_smoothing_does_not_cross_a_strong_edge():
    grid, edge_column = (4, 7), 3
    edge = torch.zeros(1, *grid, dtype=torch.float64)
    edge[..., edge_column] = 1.0
    weights = neighbour_weights(edge.flatten(1), grid, beta=1e4)
    left = torch.zeros(*grid, dtype=torch.float64)
    left[:, :edge_column] = 1.0
    plan = torch.stack([left, 1.0 - left]).reshape(1, 2, -1)  # part 0 left, part 1 right

    smoothed = smooth_plan(plan, weights).reshape(2, *grid)

    # Left of the edge part 1 has no mass, right of it part 0 has none: nothing leaks.
    assert torch.all(smoothed[1, :, :edge_column] == 0)
    assert torch.all(smoothed[0, :, edge_column + 1 :] == 0)
    # The edge column is cut from both sides: only its own column neighbours count.
    on_edge = plan.reshape(2, *grid)[:, :, edge_column]
    # Every weight of the edge column is exp(-1e4) = 0: its patches keep their plan exactly.
    assert torch.equal(smoothed[:, :, edge_column], on_edge)


@pytest.mark.parametrize("grid", [(1, 1), (3, 3)])
def test_patches_without_neighbour_weight_keep_their_plan(grid):
    n_patches = grid[0] * grid[1]
    weights = neighbour_weights(torch.ones(1, n_patches), grid, beta=1e4)  # all w = 0
    plan = torch.rand(1, 2, n_patches)

    assert torch.equal(smooth_plan(plan, weights), plan)


# --- edge_delta ----------------------------------------------------------------------


def test_edge_delta_is_zero_for_equal_plans():
    gen = torch.Generator().manual_seed(1)
    weights = neighbour_weights(torch.zeros(2, 16), (4, 4), beta=1.0)
    plan = torch.rand(2, 3, 4, 16, generator=gen)

    assert edge_delta(plan, plan, weights).item() == 0.0


def test_edge_delta_is_positive_when_the_plan_is_less_fragmented():
    grid = (4, 4)
    weights = neighbour_weights(torch.zeros(1, 16), grid, beta=1.0)  # one smooth region
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2
    fragmented = torch.stack([checker, 1 - checker]).reshape(1, 2, 16).float() / 16
    halves = (torch.arange(4)[None, :] < 2).expand(4, 4).long()
    blocky = torch.stack([halves, 1 - halves]).reshape(1, 2, 16).float() / 16

    assert edge_delta(fragmented, blocky, weights) > 0
    assert edge_delta(blocky, fragmented, weights) < 0


@settings(max_examples=30, deadline=None)
@given(grid=grids, n_parts=st.integers(1, 4), threshold=st.floats(0, 1), seed=seeds)
def test_edge_delta_matches_a_pair_loop(grid, n_parts, threshold, seed):
    gen = torch.Generator().manual_seed(seed)
    n_patches = grid[0] * grid[1]
    edge = torch.rand(2, n_patches, generator=gen, dtype=torch.float64)
    weights = neighbour_weights(edge, grid, beta=1.0)
    plan0, plan = torch.rand(2, 2, n_parts, n_patches, generator=gen, dtype=torch.float64)
    part_valid = torch.rand(2, n_parts, generator=gen) > 0.3

    got = edge_delta(plan0, plan, weights, threshold=threshold, part_valid=part_valid)

    expected = reference_edge_delta(plan0, plan, weights, threshold, part_valid).to(got.dtype)
    assert got.dim() == 0 and got.dtype == torch.float64
    # A mean of at most (pairs x parts x 2) terms of size <= 1, in another order, times P.
    n_pairs = (grid[0] - 1) * grid[1] + grid[0] * (grid[1] - 1)
    assert_within_rounding(got, expected, ops=2 * n_pairs * n_parts + 4, scale=float(n_patches), what="edge_delta")


def test_edge_delta_leaves_out_padded_parts_and_broadcasts_over_heads():
    gen = torch.Generator().manual_seed(2)
    weights = neighbour_weights(torch.rand(2, 16, generator=gen), (4, 4), 1.0)
    plan0, plan = torch.rand(2, 2, 3, 3, 16, generator=gen)  # [B, heads, K, P] each
    part_valid = torch.tensor([[True, True, False], [True, True, True]])
    garbage = plan.clone()
    garbage[0, :, 2] = torch.rand(3, 16, generator=gen)

    masked = edge_delta(plan0, plan, weights, part_valid=part_valid)

    # Padded rows are selected out before the sum: the same terms, the same bits.
    assert torch.equal(masked, edge_delta(plan0, garbage, weights, part_valid=part_valid))
    per_head = part_valid[:, None, :].expand(2, 3, 3)
    assert torch.equal(masked, edge_delta(plan0, plan, weights, part_valid=per_head))


def test_edge_delta_without_qualifying_pairs_is_zero():
    weights = neighbour_weights(torch.ones(1, 16), (4, 4), beta=5.0)  # every w < 0.5
    plan0, plan = torch.rand(2, 1, 3, 16)

    assert edge_delta(plan0, plan, weights).item() == 0.0


# --- two-pass solve ------------------------------------------------------------------


def random_router_problem(seed: int, grid=(6, 6), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    n_patches = grid[0] * grid[1]
    cost = torch.randn(2, 3, 4, n_patches, generator=gen, dtype=dtype)  # [B, heads, K, P]
    cost = (cost - cost.mean(dim=(-2, -1), keepdim=True)) / cost.std(dim=(-2, -1), keepdim=True)
    a = torch.full((2, 3, 4), 0.25, dtype=dtype)
    b = torch.full((2, 3, n_patches), 1.0 / n_patches, dtype=dtype)
    return cost, a, b, grid


def test_edge_regularised_plan_without_edge_term_is_the_base_plan():
    cost, a, b, grid = random_router_problem(3)
    weights = neighbour_weights(torch.rand(2, 36), grid, beta=2.0)

    first, second = edge_regularised_plan(cost, a, b, weights, lambda_edge=0.0)

    assert torch.equal(first.plan, second.plan)


def test_edge_term_defragments_a_smooth_region():
    cost, a, b, grid = random_router_problem(4)
    weights = neighbour_weights(torch.zeros(2, 36), grid, beta=2.0)  # no edges at all

    first, second = edge_regularised_plan(cost, a, b, weights, lambda_edge=1.0)

    assert first.converged and second.converged
    assert edge_delta(first.plan, second.plan, weights) > 0


def test_second_solve_is_warm_started_and_converges_to_the_cold_solution():
    """The edge solve starts from the first solve's potential: fewer iterations than a cold
    start on the same edge cost, to the same optimum (float64, converged to 1e-12: the two
    plans differ by the solves' errors, each at most tol over J's smallest eigenvalue)."""
    cost, a, b, grid = random_router_problem(6, dtype=torch.float64)
    weights = neighbour_weights(torch.rand(2, 36, dtype=torch.float64), grid, beta=2.0)
    tol = 1e-12

    first, second = edge_regularised_plan(cost, a, b, weights, lambda_edge=0.5, tol=tol, max_iter=100)
    edge_cost = cost - 0.5 * 36 * smooth_plan(first.plan, weights)
    cold = sinkhorn_log(edge_cost, a, b, tol=tol, max_iter=100)

    assert first.converged and second.converged and cold.converged
    assert int(second.iterations) < int(cold.iterations)
    rows, cols = cold.plan.sum(-1), cold.plan.sum(-2, keepdim=True)
    smallest = torch.linalg.eigvalsh(torch.diag_embed(rows) - (cold.plan / cols) @ cold.plan.mT)[..., 1].min()
    assert (second.plan - cold.plan).abs().max() <= 2 * tol / float(smallest)


def test_columns_after_the_grid_get_no_edge_term():
    """The router's virtual patch: a last column that is not a grid cell keeps its cost."""
    cost, a, b, grid = random_router_problem(7)
    extra = torch.randn(2, 3, 4, 1, generator=torch.Generator().manual_seed(7))
    cost = torch.cat([cost, extra], dim=-1)
    b = torch.cat([b * 0.9, torch.full((2, 3, 1), 0.1)], dim=-1)
    weights = neighbour_weights(torch.rand(2, 36), grid, beta=2.0)

    first, second = edge_regularised_plan(cost, a, b, weights, lambda_edge=0.5)
    edge_cost = cost - 0.5 * 36 * F.pad(smooth_plan(first.plan[..., :36], weights), (0, 1))
    expected = sinkhorn_log(edge_cost, a, b, f_init=first.f)

    assert torch.equal(second.plan, expected.plan)  # the same solve of the same cost
    assert torch.equal(edge_cost[..., 36], cost[..., 36])


def test_edge_regularised_plan_passes_options_and_keeps_gradients():
    cost, a, b, grid = random_router_problem(5)
    cost.requires_grad_()
    weights = neighbour_weights(torch.rand(2, 36), grid, beta=2.0)

    first, second = edge_regularised_plan(
        cost, a, b, weights, lambda_edge=0.5, eps=0.05, max_iter=10, tol=0.0, differentiable=True
    )
    second.plan.square().sum().backward()

    assert int(first.iterations) == int(second.iterations) == 10
    assert torch.isfinite(cost.grad).all() and cost.grad.abs().sum() > 0
