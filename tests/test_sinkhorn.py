"""Tests of the log-domain Sinkhorn solver: POT as the reference, marginals, dtype and
device contract, padding, gradients, and properties that hold for any problem."""

from __future__ import annotations

import math
import warnings

import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pact_ray.ot.sinkhorn import SinkhornNotConverged, plan_entropy, sinkhorn_log

ROUTER_PATCHES = (36, 64, 37 * 37)
# Converged settings for the golden tests: both solvers run until the marginal error
# is far below the 1e-6 agreement we ask for.
GOLDEN_ITER, GOLDEN_TOL = 20_000, 1e-8
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def standardised_cost(generator: torch.Generator, shape, dtype=torch.float64) -> torch.Tensor:
    """A random cost standardised per problem, as the router does."""
    cost = torch.randn(shape, generator=generator, dtype=dtype)
    mean = cost.mean(dim=(-2, -1), keepdim=True)
    return (cost - mean) / (cost.std(dim=(-2, -1), keepdim=True) + 1e-6)


def random_marginal(generator: torch.Generator, shape, dtype=torch.float64) -> torch.Tensor:
    """Positive weights summing to 1 over the last dim, bounded away from 0."""
    weights = torch.rand(shape, generator=generator, dtype=dtype) + 0.1
    return weights / weights.sum(dim=-1, keepdim=True)


def uniform(shape, dtype=torch.float64) -> torch.Tensor:
    return torch.full(shape, 1.0 / shape[-1], dtype=dtype)


def row_col_errors(plan, a, b):
    return (plan.sum(-1) - a).abs().sum(-1), (plan.sum(-2) - b).abs().sum(-1)


# --- golden tests against POT -------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    n_parts=st.integers(1, 8),
    n_patches=st.sampled_from(ROUTER_PATCHES),
    eps=st.sampled_from([0.05, 0.01]),
    seed=st.integers(0, 2**31 - 1),
)
def test_plan_matches_pot_sinkhorn_log(n_parts, n_patches, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    cost = standardised_cost(gen, (n_parts, n_patches))
    a = random_marginal(gen, (n_parts,))
    b = random_marginal(gen, (n_patches,))

    ours = sinkhorn_log(cost, a, b, eps=eps, max_iter=GOLDEN_ITER, tol=GOLDEN_TOL)
    reference = ot.sinkhorn(  # POT on its torch backend, given torch tensors
        a, b, cost, eps,
        method="sinkhorn_log", numItermax=GOLDEN_ITER, stopThr=GOLDEN_TOL, warn=False,
    )

    assert ours.converged
    torch.testing.assert_close(ours.plan, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_patches", ROUTER_PATCHES)
def test_batched_plans_match_pot_solve_batch(n_patches):
    """A [B, H, K, P] batch against POT's batched solver on the flattened [B*H, K, P]."""
    gen = torch.Generator().manual_seed(n_patches)
    objects, heads, n_parts, eps = 3, 2, 5, 0.05
    cost = standardised_cost(gen, (objects, heads, n_parts, n_patches))
    a = random_marginal(gen, (objects, 1, n_parts)).expand(-1, heads, -1)
    b = uniform((objects, heads, n_patches))

    ours = sinkhorn_log(cost, a, b, eps=eps, max_iter=GOLDEN_ITER, tol=GOLDEN_TOL)
    reference = ot.batch.solve_batch(
        cost.flatten(0, 1), eps, a.flatten(0, 1), b.flatten(0, 1),
        max_iter=GOLDEN_ITER, tol=GOLDEN_TOL, method="log_sinkhorn", grad="detach",
    )

    assert ours.converged
    torch.testing.assert_close(
        ours.plan, reference.plan.reshape(ours.plan.shape), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-8)])
def test_router_settings_match_pot_solve_batch_iterate_for_iterate(dtype, atol):
    """At the router's 50 iterations, far from convergence, both run the same updates
    (f then g, from g = 0), so the plans agree to rounding, not only at the limit."""
    gen = torch.Generator().manual_seed(11)
    n_parts, n_patches, iterations = 8, 37 * 37, 50
    cost = standardised_cost(gen, (4, n_parts, n_patches)).to(dtype)
    a, b = uniform((4, n_parts), dtype), uniform((4, n_patches), dtype)

    ours = sinkhorn_log(cost, a, b, eps=0.05, max_iter=iterations, tol=0.0)
    reference = ot.batch.solve_batch(
        cost, 0.05, a, b, max_iter=iterations, tol=0.0, method="log_sinkhorn", grad="detach"
    )

    assert ours.iterations == reference.log["n_iter"] + 1 == iterations
    torch.testing.assert_close(ours.plan, reference.plan, rtol=0, atol=atol)


# --- convergence, stopping, warnings -------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 2e-5)])
def test_marginals_hold_to_tol_on_convergence(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    cost = standardised_cost(gen, (4, 6, 64), dtype)
    a, b = random_marginal(gen, (4, 6), dtype), uniform((4, 64), dtype)

    result = sinkhorn_log(cost, a, b, eps=0.05, max_iter=5000, tol=tol)

    assert result.converged
    row_error, col_error = row_col_errors(result.plan, a, b)
    assert row_error.max() < tol
    # The column marginal is the one the last update enforces: exact up to rounding.
    assert col_error.max() < 100 * torch.finfo(dtype).eps
    torch.testing.assert_close(result.marginal_error, row_error + col_error)


def test_stops_at_first_check_below_tol():
    gen = torch.Generator().manual_seed(1)
    cost = standardised_cost(gen, (3, 4, 36))
    a, b = random_marginal(gen, (3, 4)), uniform((3, 36))

    result = sinkhorn_log(cost, a, b, eps=0.05, max_iter=5000, tol=1e-8, check_every=7)
    earlier = sinkhorn_log(
        cost, a, b, eps=0.05, max_iter=result.iterations - 7, tol=0.0, check_every=7
    )

    assert result.converged and result.iterations % 7 == 0
    row_error, _ = row_col_errors(earlier.plan, a, b)
    assert row_error.max() >= 1e-8


def test_not_converged_reports_max_iter_and_warns_only_on_request():
    gen = torch.Generator().manual_seed(2)
    cost = standardised_cost(gen, (2, 8, 64))
    a, b = random_marginal(gen, (2, 8)), uniform((2, 64))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = sinkhorn_log(cost, a, b, eps=0.01, max_iter=3, tol=1e-9)
    with pytest.warns(SinkhornNotConverged):
        sinkhorn_log(cost, a, b, eps=0.01, max_iter=3, tol=1e-9, warn=True)

    assert not quiet.converged and quiet.iterations == 3
    assert quiet.marginal_error.shape == (2,)


@pytest.mark.parametrize(
    "kwargs",
    [{"eps": 0.0}, {"max_iter": 0}, {"check_every": 0}],
)
def test_rejects_bad_arguments(kwargs):
    cost, a, b = torch.zeros(2, 3), uniform((2,)), uniform((3,))
    with pytest.raises(ValueError):
        sinkhorn_log(cost, a, b, **kwargs)


def test_rejects_mismatched_marginals():
    with pytest.raises(ValueError, match="marginals"):
        sinkhorn_log(torch.zeros(2, 3), uniform((3,)), uniform((3,)))


# --- dtype, device, broadcasting and autograd contract ------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype, expected",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_dtype_and_device_contract(device, dtype, expected):
    gen = torch.Generator().manual_seed(3)
    cost = standardised_cost(gen, (2, 3, 4, 36)).to(device=device, dtype=dtype)
    a = uniform((2, 3, 4)).to(device=device, dtype=dtype)
    b = uniform((2, 3, 36)).to(device=device, dtype=dtype)

    result = sinkhorn_log(cost, a, b)

    for tensor in (result.plan, result.f, result.g, result.marginal_error):
        assert tensor.dtype == expected and tensor.device == cost.device
    assert result.plan.shape == (2, 3, 4, 36)
    assert result.f.shape == (2, 3, 4) and result.g.shape == (2, 3, 36)
    assert result.marginal_error.shape == (2, 3)
    assert isinstance(result.iterations, int) and isinstance(result.converged, bool)


def test_plan_is_exp_of_potentials():
    gen = torch.Generator().manual_seed(4)
    cost = standardised_cost(gen, (3, 36))
    a, b, eps = random_marginal(gen, (3,)), uniform((36,)), 0.05

    result = sinkhorn_log(cost, a, b, eps=eps, max_iter=30)

    expected = torch.exp((result.f[:, None] + result.g[None, :] - cost) / eps)
    torch.testing.assert_close(result.plan, expected)


def test_leading_dims_broadcast():
    """One cost per head shared by all objects, marginals per object: [1, H] x [B, 1]."""
    gen = torch.Generator().manual_seed(5)
    cost = standardised_cost(gen, (1, 4, 3, 36))
    a = random_marginal(gen, (2, 1, 3))
    b = uniform((36,))

    result = sinkhorn_log(cost, a, b, max_iter=20, tol=0.0)

    assert result.plan.shape == (2, 4, 3, 36)
    for obj in range(2):
        for head in range(4):
            single = sinkhorn_log(cost[0, head], a[obj, 0], b, max_iter=20, tol=0.0)
            torch.testing.assert_close(result.plan[obj, head], single.plan)


def test_detached_by_default_and_differentiable_on_request():
    gen = torch.Generator().manual_seed(6)
    cost = standardised_cost(gen, (2, 3, 36)).requires_grad_()
    a, b = uniform((2, 3)), uniform((2, 36))

    detached = sinkhorn_log(cost, a, b)
    attached = sinkhorn_log(cost, a, b, differentiable=True)

    assert not detached.plan.requires_grad
    assert attached.plan.requires_grad
    torch.testing.assert_close(attached.plan.detach(), detached.plan)


def test_gradient_matches_finite_differences():
    """With tol=0 the solver is a fixed smooth map of the cost: gradcheck applies."""
    gen = torch.Generator().manual_seed(7)
    cost = standardised_cost(gen, (2, 3, 5)).requires_grad_()
    a, b = random_marginal(gen, (2, 3)), random_marginal(gen, (2, 5))

    def plan_of(c):
        return sinkhorn_log(c, a, b, eps=0.5, max_iter=8, tol=0.0, differentiable=True).plan

    assert torch.autograd.gradcheck(plan_of, (cost,))


# --- padding -------------------------------------------------------------------------


def pad_problem(cost, a, b, n_parts, n_patches, generator):
    """Embed a [K0, P0] problem in [K, P] with zero marginals and random padded costs."""
    padded_cost = standardised_cost(generator, (n_parts, n_patches)) * 10
    padded_cost[: cost.shape[0], : cost.shape[1]] = cost
    padded_a = torch.zeros(n_parts, dtype=a.dtype)
    padded_a[: a.shape[0]] = a
    padded_b = torch.zeros(n_patches, dtype=b.dtype)
    padded_b[: b.shape[0]] = b
    return padded_cost, padded_a, padded_b


@pytest.mark.parametrize("differentiable", [False, True])
def test_padding_gets_zero_mass_and_leaves_the_rest_unchanged(differentiable):
    gen = torch.Generator().manual_seed(8)
    part_counts, patch_counts = (1, 3, 6), (36, 30, 20)
    n_parts, n_patches = 8, 36
    problems = []
    for n_rows, n_cols in zip(part_counts, patch_counts):
        cost = standardised_cost(gen, (n_rows, n_cols))
        problems.append((cost, random_marginal(gen, (n_rows,)), uniform((n_cols,))))
    padded = [pad_problem(*p, n_parts, n_patches, gen) for p in problems]
    cost, a, b = (torch.stack(parts) for parts in zip(*padded))
    cost.requires_grad_(differentiable)

    result = sinkhorn_log(cost, a, b, max_iter=40, tol=0.0, differentiable=differentiable)

    for index, (n_rows, n_cols) in enumerate(zip(part_counts, patch_counts)):
        plan = result.plan[index]
        assert torch.all(plan[n_rows:] == 0) and torch.all(plan[:, n_cols:] == 0)
        alone = sinkhorn_log(*problems[index], max_iter=40, tol=0.0)
        torch.testing.assert_close(plan[:n_rows, :n_cols], alone.plan, rtol=1e-12, atol=1e-15)
        assert torch.isfinite(result.marginal_error[index])
    if differentiable:
        weights = torch.randn(result.plan.shape, generator=gen, dtype=cost.dtype)
        (result.plan * weights).sum().backward()
        assert torch.isfinite(cost.grad).all()
        assert torch.all(cost.grad[0, 1:] == 0) and torch.all(cost.grad[2, :, 20:] == 0)


# --- properties ----------------------------------------------------------------------


@st.composite
def extreme_problems(draw):
    """Small problems with eps down to 1e-3, costs up to 1e4 and optional padding."""
    n_parts = draw(st.integers(1, 8))
    n_patches = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1.0, 1e2, 1e4]))
    eps = draw(st.sampled_from([1e-3, 1e-2, 0.05, 1.0]))
    n_padded = draw(st.integers(0, n_parts - 1))
    gen = torch.Generator().manual_seed(seed)
    cost = torch.randn(n_parts, n_patches, generator=gen) * scale
    a = random_marginal(gen, (n_parts,), torch.float32)
    a[n_parts - n_padded :] = 0
    a = a / a.sum()
    b = random_marginal(gen, (n_patches,), torch.float32)
    return cost, a, b, eps, gen


@settings(max_examples=100, deadline=None)
@given(problem=extreme_problems())
def test_plans_and_gradients_stay_finite(problem):
    cost, a, b, eps, gen = problem
    cost.requires_grad_()

    result = sinkhorn_log(cost, a, b, eps=eps, max_iter=30, differentiable=True)
    weights = torch.randn(result.plan.shape, generator=gen)
    (result.plan * weights).sum().backward()

    assert torch.isfinite(result.plan).all()
    assert torch.isfinite(result.marginal_error).all()
    assert torch.isfinite(cost.grad).all()
    assert torch.all(result.plan[a == 0] == 0)


@settings(max_examples=40, deadline=None)
@given(
    n_patches=st.integers(1, 64),
    scale=st.sampled_from([1.0, 1e2, 1e4]),
    eps=st.sampled_from([1e-3, 0.05, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_single_part_plan_is_b(n_patches, scale, eps, seed):
    """With K = 1 the only feasible plan is b as a row, whatever the cost."""
    gen = torch.Generator().manual_seed(seed)
    cost = torch.randn(1, n_patches, generator=gen, dtype=torch.float64) * scale
    b = random_marginal(gen, (n_patches,))

    result = sinkhorn_log(cost, torch.ones(1, dtype=torch.float64), b, eps=eps, max_iter=5)

    torch.testing.assert_close(result.plan[0], b, rtol=1e-7, atol=0)
    assert result.converged and result.iterations == 5


@settings(max_examples=40, deadline=None)
@given(
    n_parts=st.integers(1, 8),
    n_patches=st.integers(1, 64),
    value=st.floats(-1e4, 1e4),
    eps=st.sampled_from([1e-3, 0.05, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_constant_cost_gives_independent_coupling(n_parts, n_patches, value, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.full((n_parts, n_patches), value, dtype=torch.float64)
    a, b = random_marginal(gen, (n_parts,)), random_marginal(gen, (n_patches,))

    result = sinkhorn_log(cost, a, b, eps=eps)

    torch.testing.assert_close(result.plan, torch.outer(a, b), rtol=1e-7, atol=0)


# --- entropy -------------------------------------------------------------------------


def test_entropy_of_uniform_plan_is_log_of_size():
    plan = torch.full((2, 3, 4, 36), 1.0 / (4 * 36), dtype=torch.float64)
    expected = torch.full((2, 3), math.log(4 * 36), dtype=torch.float64)
    torch.testing.assert_close(plan_entropy(plan), expected)


def test_entropy_of_coupling_adds_and_ignores_zeros():
    gen = torch.Generator().manual_seed(9)
    a = torch.cat([random_marginal(gen, (3,)), torch.zeros(2, dtype=torch.float64)])
    b = random_marginal(gen, (7,))
    plan = torch.outer(a, b).requires_grad_()

    entropy = plan_entropy(plan)
    entropy.backward()

    def marginal_entropy(p):
        p = p[p > 0]
        return -(p * p.log()).sum()

    torch.testing.assert_close(entropy, marginal_entropy(a) + marginal_entropy(b))
    assert torch.isfinite(plan.grad).all()
