"""OT router inside Stage1: bit-identity when off, gating semantics, variants, diagnostics, numerics.

Tolerances (issue #11): exact where exactness is the claim; otherwise derived with
``tests/numerics.py`` from the computation checked (a comment says from what).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import magnitude, rounding_bound, transformer_ops

from pact_ray.errors import ConfigError
from pact_ray.metrics import names as M
from pact_ray.models.stage1 import STAGE1_PRESETS, build_stage1
from pact_ray.ot import router as router_module
from pact_ray.ot.router import RouterConfig, resolve_blocks
from pact_ray.runs.registry import STAGE1_VARIANTS

N_PARTS = torch.tensor([3, 2])


def randomised(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def inputs(seed=0, n_parts=N_PARTS, masks=None, images=None):
    g = torch.Generator().manual_seed(seed)
    n = int(n_parts.sum())
    b = n_parts.shape[0]
    x = torch.randn(n, 8, 8, 8, 8, generator=g)
    t = torch.rand(n, generator=g) * 1000
    cond = torch.randn(n, 41, 64, generator=g)
    if masks is None:
        obj_masks = torch.randint(0, 4, (b, 6, 6), generator=g)
        masks = torch.repeat_interleave(obj_masks, n_parts, dim=0)
    if images is None:
        images = torch.rand(b, 3, 48, 48, generator=g)
    return dict(x=x, t=t, cond=cond, masks=masks, num_parts=n_parts, images=images)


def model_for(router: RouterConfig | None, mask_condition="hard", seed=1):
    return randomised(build_stage1("tiny", router=router, mask_condition=mask_condition), seed)


def capture_bias(model):
    """Record the (k, v, bias) the router returns for each patched block."""
    seen = []
    route = model.ot_router.route

    def wrapped(block_id, q, k, v, ctx):
        out = route(block_id, q, k, v, ctx)
        seen.append((block_id, out))
        return out

    model.ot_router.route = wrapped
    return seen


# --------------------------------------------------------------- bit identity

@pytest.mark.parametrize("variant", [n for n, v in STAGE1_VARIANTS.items() if v.router])
def test_strength_zero_is_bit_identical_to_plain_core(variant):
    rcfg = dict(STAGE1_VARIANTS[variant].router)
    mask_condition = "none" if rcfg.get("mask_prior") else "hard"
    plain = model_for(None, mask_condition)
    routed = build_stage1("tiny", router=RouterConfig(**{**rcfg, "strength": 0.0}), mask_condition=mask_condition)
    routed.load_state_dict(plain.state_dict(), strict=False)
    inp = inputs()
    with torch.no_grad():
        assert torch.equal(plain(**inp), routed(**inp))
    assert routed.router_diagnostics() == {}


def in_float64(inp: dict) -> dict:
    return {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}


def tiny_forward_bound(out: torch.Tensor, cond_tokens: int = 41) -> float:
    """The rounding bound of a float64 forward pass of the tiny preset (numerics.py, with the
    house gain of 10 per block): what two evaluations differing only in rounding may differ by."""
    preset = STAGE1_PRESETS["tiny"]
    tokens = (preset["resolution"] // preset["patch_size"]) ** 3
    ops = transformer_ops(preset["model_channels"], tokens, preset["num_blocks"], preset["mlp_ratio"], cond_tokens)
    return rounding_bound(magnitude(out), ops, torch.float64, gain=10.0 ** (preset["num_blocks"] + 1))


def test_router_off_is_the_official_path_and_changes_output_when_on():
    plain = model_for(None).double()
    routed = build_stage1("tiny", router=RouterConfig(blocks="first")).double()
    routed.load_state_dict(plain.state_dict())
    inp = in_float64(inputs())
    with torch.no_grad():
        a, b = plain(**inp), routed(**inp)
    # In float64, by far more than rounding could move the output.
    assert (a - b).abs().max() > tiny_forward_bound(a)


def test_uninformative_plan_leaves_attention_unchanged():
    """Zero queries -> constant cost -> plan a b^T -> gate 1 -> bias ~0, also with area marginals and a virtual patch."""
    for rc in (RouterConfig(blocks="all"), RouterConfig(blocks="all", part_marginal="area", virtual_patch=True, m_v=0.2)):
        routed = build_stage1("tiny", router=rc)
        randomised(routed)
        with torch.no_grad():
            for blk in routed.blocks:
                blk.cross_attn.to_q.weight.zero_()
                blk.cross_attn.to_q.bias.zero_()
        seen = capture_bias(routed)
        with torch.no_grad():
            routed(**inputs())
        n_parts = int(N_PARTS.max())
        for _, (_, _, bias) in seen:
            # The cost is exactly 0, so the plan is a b^T up to the rounding of one softmax
            # over K and the products with b and 1/(a b): g = 1 + d with |d| within that
            # bound, and bias = strength log(g + 1e-6) <= strength (1e-6 + |d|).
            assert bias.abs().max() <= rc.strength * (1e-6 + rounding_bound(1.0, n_parts + 8, torch.float32))


# ------------------------------------------------------------------ semantics

def test_bias_is_a_broadcast_mask_and_prefix_tokens_are_ungated():
    model = model_for(RouterConfig(blocks="first_third", virtual_patch=True))
    seen = capture_bias(model)
    with torch.no_grad():
        model(**inputs())
    assert [b for b, _ in seen] == resolve_blocks("first_third", 4) == [0, 1]
    k, v, bias = seen[0][1]
    assert bias.shape == (5, 4, 1, 41 + 1)  # [N, H, 1, L + virtual]: never [N, H, Lq, L]
    assert k.shape[1] == v.shape[1] == 42
    assert torch.equal(bias[..., :5], torch.zeros_like(bias[..., :5]))  # cls + registers


def test_mask_prior_routes_each_part_to_its_mask_region():
    masks_obj = torch.zeros(2, 6, 6, dtype=torch.long)
    masks_obj[0, :, :2], masks_obj[0, :, 2:4], masks_obj[0, :, 4:] = 1, 2, 3
    masks_obj[1, :3], masks_obj[1, 3:] = 1, 2
    masks = torch.repeat_interleave(masks_obj, N_PARTS, dim=0)
    model = model_for(RouterConfig(blocks="first", mask_prior=True, lambda_mask=50.0, iterations=200), mask_condition="none")
    seen = capture_bias(model)
    with torch.no_grad():
        model(**inputs(masks=masks))
    bias = seen[0][1][2][:, :, 0, 5:]  # [N, H, P] over patches
    labels = masks.flatten(1)
    part_idx = torch.tensor([0, 1, 2, 0, 1])
    for row in range(5):
        own = labels[row] == part_idx[row] + 1
        assert bias[row][:, own].min() > bias[row][:, ~own].max()


def test_timestep_range_switches_the_router_off_per_row():
    inp = inputs()
    rc = RouterConfig(blocks="first", t_min=0.0, t_max=0.5)
    model = model_for(rc)
    seen = capture_bias(model)
    with torch.no_grad():
        model(**inp)
    bias = seen[0][1][2]
    off = inp["t"] / 1000 > 0.5
    assert off.any() and (~off).any()
    assert torch.equal(bias[off], torch.zeros_like(bias[off]))
    assert bias[~off].abs().max() > 0


@pytest.mark.parametrize("variant", [n for n, v in STAGE1_VARIANTS.items() if v.router])
def test_every_variant_reports_its_diagnostics(variant):
    rcfg = dict(STAGE1_VARIANTS[variant].router)
    config = RouterConfig(**rcfg)
    model = model_for(config, "none" if rcfg.get("mask_prior") else "hard")
    inp = inputs()
    out = model(**inp, pixel_masks=torch.repeat_interleave(torch.arange(4).repeat_interleave(12), 48).view(1, 48, 48).expand(2, 48, 48))
    out.pow(2).mean().backward()
    d = model.router_diagnostics()
    assert set(d) == set(M.ROUTER_DIAGNOSTICS)
    assert all(math.isfinite(float(v)) for v in d.values())
    assert all(v.device.type == "cpu" and v.dim() == 0 for v in d.values())
    # -KL(A || A^g) = E_A[bias] - log E_A[e^bias] <= 0 (Jensen). Computed as two sums of M
    # terms: E_A[bias] rounds by M operations on terms up to |bias| <= log 1e6 (strength 1),
    # log E_A[e^(bias - max)] by M + 3 relative to 1.
    n_keys = 41 + int(bool(rcfg.get("virtual_patch")))
    max_bias = -math.log(1e-6)
    assert float(d[M.GATE]) <= rounding_bound(1.0, 2 * n_keys + 8, torch.float32, gain=1 + 2 * max_bias)
    # Converged plans by default: every plan of the step met the solver's tolerance, in
    # the iterations logged (two solves with an edge term, the second warm-started).
    assert float(d[M.MARGINAL_ERROR]) <= float(d[M.MARGINAL_ERROR_MAX]) < config.tol
    two_solves = bool(rcfg.get("edge"))
    assert 0 < float(d[M.SINKHORN_ITERS]) <= config.iterations * (2 if two_solves else 1)
    assert (float(d[M.EDGE_SOLVE_ITERS]) > 0) == two_solves
    if rcfg.get("virtual_patch"):
        # The virtual column's mass is its marginal m_v up to the plan's marginal error (an
        # L1 error over all columns bounds any one column's), plus the rounding of the sum
        # over the K parts.
        slack = float(d[M.MARGINAL_ERROR_MAX]) + rounding_bound(rcfg["m_v"], int(N_PARTS.max()) + 2, torch.float32)
        assert abs(float(d[M.VIRTUAL_MASS]) - rcfg["m_v"]) <= slack
    else:
        assert float(d[M.VIRTUAL_MASS]) == 0.0
    if not rcfg.get("edge"):
        assert float(d[M.EDGE_DELTA]) == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_diagnostics_are_computed_when_read_not_in_the_forward_pass(monkeypatch):
    """The forward pass only keeps references; the work (and, on a GPU, the one host sync)
    happens once, when the trainer reads the diagnostics after the step."""
    calls = []
    compute = router_module._Record.compute
    monkeypatch.setattr(router_module._Record, "compute", lambda self: calls.append(1) or compute(self))
    model = model_for(RouterConfig(blocks="first_third", edge="rgb"))
    out = model(**inputs())
    out.pow(2).mean().backward()
    assert calls == []
    d = model.router_diagnostics()
    assert len(calls) == len(model.ot_router.block_ids) == 2
    assert set(d) == set(M.ROUTER_DIAGNOSTICS)
    # Read once: a second read returns the same values without recomputing them, and the
    # blocks' queries and keys are no longer held.
    again = model.router_diagnostics()
    assert len(calls) == 2 and model.ot_router._last_records == []
    assert all(torch.equal(d[key], again[key]) for key in d)


def test_edge_term_defragments_smooth_regions():
    """Two flat halves of an image: the edge term pulls each half's patches to one part."""
    images = torch.zeros(2, 3, 48, 48)
    images[:, :, :, 24:] = 1.0
    model = model_for(RouterConfig(blocks="first", edge="rgb", lambda_edge=1.0, edge_beta=8.0, iterations=100), seed=3)
    with torch.no_grad():
        model(**inputs(images=images))
    assert float(model.router_diagnostics()[M.EDGE_DELTA]) > 0


def test_edge_variant_needs_images():
    model = model_for(RouterConfig(blocks="first", edge="rgb"))
    inp = inputs()
    inp.pop("images")
    with pytest.raises(ValueError, match="RGB images"):
        model(**inp)


def test_differentiable_plan_changes_gradients():
    """With the flag, gradients also flow through the plan (implicit differentiation): the
    key projection's gradient changes by more than rounding could explain (float64)."""
    grads = []
    for diff in (False, True):
        model = model_for(RouterConfig(blocks="first", differentiable_plan=diff)).double()
        model(**in_float64(inputs())).pow(2).mean().backward()
        grads.append(model.blocks[0].cross_attn.to_kv.weight.grad.clone())
    assert torch.isfinite(grads[1]).all()
    # The backward pass is about as long a chain of operations as the forward.
    assert (grads[0] - grads[1]).abs().max() > 2 * tiny_forward_bound(grads[0])


# ---------------------------------------------------------------- block specs

def test_resolve_blocks():
    assert resolve_blocks("first", 24) == [0]
    assert resolve_blocks("first_third", 24) == list(range(8))
    assert resolve_blocks("first_third", 4) == [0, 1]
    assert resolve_blocks("all", 3) == [0, 1, 2]
    assert resolve_blocks("0,2,5", 6) == [0, 2, 5]
    assert resolve_blocks([3, 1], 6) == [1, 3]
    for bad in ("7", "a,b", "", "0,-1"):
        with pytest.raises(ConfigError):
            resolve_blocks(bad, 6)


@pytest.mark.parametrize("field,value", [("eps", 0.0), ("eps", -1.0), ("m_v", 0.0), ("m_v", 1.0), ("edge", "sobel"),
                                         ("iterations", 0), ("strength", -0.5), ("t_max", 1.5)])
def test_bad_router_values_are_one_sentence_errors(field, value):
    with pytest.raises(ConfigError) as e:
        RouterConfig(**{field: value}).validate()
    assert "\n" not in str(e.value) and field.split("_")[0] in str(e.value).replace("virtual mass", "m_v")


# ------------------------------------------------------------------ numerics

@settings(max_examples=25, deadline=None)
@given(
    eps=st.floats(1e-3, 1.0),
    q_scale=st.floats(1e-3, 1e4),
    parts=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    empty_masks=st.booleans(),
    constant_image=st.booleans(),
    variant=st.sampled_from([n for n, v in STAGE1_VARIANTS.items() if v.router]),
)
def test_router_numerics_property(eps, q_scale, parts, empty_masks, constant_image, variant):
    """Finite outputs and gradients for small eps, huge costs, empty masks, single parts, constant images."""
    rcfg = dict(STAGE1_VARIANTS[variant].router, eps=eps)
    model = build_stage1("tiny", router=RouterConfig(**rcfg), mask_condition="none" if rcfg.get("mask_prior") else "hard")
    randomised(model, seed=len(parts))
    with torch.no_grad():
        model.blocks[0].cross_attn.to_q.weight.mul_(q_scale)
    n_parts = torch.tensor(parts)
    b = len(parts)
    masks = torch.zeros(b, 6, 6, dtype=torch.long) if empty_masks else torch.randint(0, max(parts) + 1, (b, 6, 6))
    images = torch.full((b, 3, 48, 48), 0.5) if constant_image else torch.rand(b, 3, 48, 48)
    inp = inputs(n_parts=n_parts, masks=torch.repeat_interleave(masks, n_parts, dim=0), images=images)
    out = model(**inp)
    assert torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(math.isfinite(float(v)) for v in model.router_diagnostics().values())
