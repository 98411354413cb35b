"""Tolerances derived from the arithmetic a test checks, so that the suite holds on any CPU.

Two evaluations of one expression that differ only in the order of their floating-point
operations (another CPU's vector width, another blocking of a matmul or of SDPA, another
thread count, a batch of another size) differ by rounding, and how much depends on the
computation, not on the machine a test was written on. The standard model (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., 2002, §2.2 and §3.1): every
operation rounds with a relative error of at most the unit roundoff u (half of the dtype's
eps), so a value computed along a chain of ``n`` dependent operations whose intermediate
magnitudes are at most ``S`` carries an error of at most ``gamma_n * S`` with
``gamma_n = n u / (1 - n u)``; two such evaluations differ by at most twice that.

How the tests use it:

- An *exactness* claim (strength 0 is the plain core, the zero-initialised adapter is the
  baseline, object 0 ignores object 1) is checked with ``torch.equal``, never a tolerance.
- An *invariance* claim (padding, batching, recomputation change nothing) is exact only in
  real arithmetic. It is checked in float64, where the rounding bound is tiny next to what
  the test guards against (a padded token leaking through attention moves outputs by O(1)):
  :func:`rounding_bound` with ``ops`` counted from the model's sizes and a stated ``gain``
  (how much the layers after an error can amplify it; random weights of a few tenths at
  widths of 64 amplify by a few units per layer, so the tests pass ``gain`` 10 per block).
- A *closed-form* claim (a moment, an MSE, a decoded angle) is checked at the dtype it runs
  in with ``ops`` the length of that short computation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

FLOAT32, FLOAT64 = torch.float32, torch.float64


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one rounded operation."""
    return torch.finfo(dtype).eps / 2


def gamma(ops: int, dtype: torch.dtype) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of ``ops`` dependent operations."""
    nu = ops * unit_roundoff(dtype)
    if not 0 <= nu < 1:
        raise ValueError(f"{ops} operations exhaust {dtype}'s precision: the bound says nothing")
    return nu / (1 - nu)


def rounding_bound(scale: float, ops: int, dtype: torch.dtype, gain: float = 1.0) -> float:
    """The largest |a - b| between two evaluations of one computation in another operation
    order: ``2 * gamma_ops * scale * gain``.

    ``scale``: the magnitude of the values carried along the computation (the largest
    intermediate, or of the output where the computation does not grow its inputs);
    ``ops``: the length of its longest chain of dependent operations (a sum or matmul counts
    its reduction length; a network, the sum over its layers); ``gain``: a bound on how much
    the operations after a rounding error amplify it (1 for a plain reduction).
    """
    # Higham's model with underflow adds an absolute error of at most u * tiny per operation
    # (gradual underflow), which matters only for values near the dtype's smallest normal.
    underflow = ops * unit_roundoff(dtype) * torch.finfo(dtype).tiny
    return 2.0 * (gamma(ops, dtype) * float(scale) * float(gain) + underflow)


def magnitude(*tensors: torch.Tensor) -> float:
    """The largest absolute value in ``tensors`` (at least the smallest normal number, so a
    bound from an all-zero reference is not zero)."""
    top = max(float(t.detach().abs().max()) if t.numel() else 0.0 for t in tensors)
    return max(top, torch.finfo(torch.float64).tiny)


def assert_within_rounding(actual: torch.Tensor, expected: torch.Tensor, *, ops: int, gain: float = 1.0,
                           scale: float | None = None, what: str = "") -> None:
    """``actual`` equals ``expected`` to :func:`rounding_bound` at their dtype; the scale is
    the larger magnitude of the two unless given."""
    assert actual.dtype == expected.dtype, f"{what}: dtypes differ ({actual.dtype} vs {expected.dtype})"
    assert actual.shape == expected.shape, f"{what}: shapes differ ({tuple(actual.shape)} vs {tuple(expected.shape)})"
    s = magnitude(actual, expected) if scale is None else scale
    bound = rounding_bound(s, ops, actual.dtype, gain)
    diff = float((actual - expected).detach().abs().max()) if actual.numel() else 0.0
    assert diff <= bound, (
        f"{what or 'values'} differ by {diff:.3e}, more than rounding allows "
        f"({bound:.3e} = 2 gamma_{ops} x scale {s:.3e} x gain {gain:g} in {actual.dtype})"
    )


def one_ulp_off(model: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    """A rounding-level change to ``model``: every parameter moved by one ulp of its dtype, up
    or down at random (in place; returns the model). A golden test must pass it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            up = torch.rand(p.shape, generator=g) < 0.5
            p.copy_(torch.where(up, torch.nextafter(p, torch.full_like(p, math.inf)),
                                torch.nextafter(p, torch.full_like(p, -math.inf))))
    return model


def transformer_ops(width: int, tokens: int, blocks: int, mlp_ratio: float = 4, cond_tokens: int = 0) -> int:
    """The longest chain of dependent operations through ``blocks`` transformer blocks:
    per block, the projections and norms (reductions over ``width``), self-attention's
    softmax and weighted sum (over ``tokens``), cross-attention's (over ``cond_tokens``, with
    its own projections) and the MLP (over ``width`` and ``mlp_ratio * width``)."""
    per_block = 4 * width + 2 * tokens + int(mlp_ratio * width) + width
    if cond_tokens:
        per_block += 3 * width + 2 * cond_tokens
    return blocks * per_block


def pairwise_sum_ops(n: int) -> int:
    """The longest chain of additions in a blocked pairwise sum of ``n`` values, as NumPy and
    torch's CPU reductions do it: NumPy sums blocks of 128 values with 8 interleaved
    accumulators (16 additions each, then 3 to combine them) and pairs the blocks up (one
    addition per level); torch's cascade sum is no deeper. Counted as n for n <= 19, where a
    plain sequential sum is the worst case."""
    if n <= 19:
        return max(n - 1, 1)
    levels = max(0, math.ceil(math.log2(n / 128)))
    return 16 + 3 + levels


def statistic_bound(*samples, ops: int = 16) -> float:
    """The largest float64 rounding difference between two implementations of a mean, a
    sample standard deviation or a t interval over ``samples`` (sequences of floats).

    The sums run over all n values (n + ``ops`` operations with the divisions, the square root
    and the t quantile's scaling). The sample variance is ill-conditioned when the spread is
    small next to the mean: its relative error is amplified by ``kappa = 1 + mean^2 / var``
    (Chan, Golub & LeVeque, "Algorithms for computing the sample variance", 1983), which is the
    gain here. The scale is the largest magnitude of the values.
    """
    values = [float(v) for s in samples for v in s]
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    kappa = 1.0 + mean * mean / var if var > 0 else 1.0
    return rounding_bound(max(abs(v) for v in values), n + ops, torch.float64, gain=kappa)


# ---------------------------------------------------------------- golden comparisons
#
# A golden pass was computed in float32 on another machine. Two float32 evaluations of one
# network (the reference's and ours) differ by their rounding errors, which a worst-case
# bound (``rounding_bound``) overstates by orders of magnitude once a dozen layers amplify
# them: it would accept a transposed kernel. The bound below is derived instead from the
# rounding model itself, applied to the network's own operations:
#
# 1. Every rounding of a float32 evaluation commits an error of at most the standard model's
#    (Higham 2002, §2.2): ``u |result|`` for one arithmetic operation, a few ulp for a
#    library function, and for a sum of n terms (a product of inner length n, a norm, an
#    attention's weighted sum) n roundings of at most ``u`` times the sum of the absolute
#    terms, whatever the summation order, so whatever another CPU's blocking, vector width
#    or thread count (``_Float32Rounding._error`` states each operation's).
# 2. Rounding errors behave as independent, mean-zero random variables (the probabilistic
#    model of Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM
#    J. Sci. Comput. 41(5), 2019). To first order an output element's error is then a sum of
#    independent bounded terms (one per rounding; a rounding inside a sum reaches the
#    output with the sum's own gain), and Hoeffding's inequality bounds it:
#    P(|e_i| >= t) <= 2 exp(-t^2 / (2 sum_j c_ij^2 a_j^2)), where a_j is the bound of
#    operation j and c_ij its gain to output i.
# 3. That sum of squares is measured, not assumed: the computation is replayed in float64
#    (exact next to float32) with every operation's result moved by a uniform random error in
#    [-a_j, a_j] (Monte Carlo arithmetic: Parker, Pierce & Eggert, "Monte Carlo arithmetic",
#    Computing in Science & Engineering 2(4), 2000). A uniform error has variance a_j^2 / 3,
#    so the replays' variance at output i is sigma_i^2 = sum_j c_ij^2 a_j^2 / 3.
# 4. Hence, with probability at least 1 - p for all M outputs together (a union bound),
#    |e_i| <= sigma_i sqrt(6 ln(2 M / p)); for two evaluations (ours and the reference's) the
#    variances add. sigma is estimated from K replays; the bound uses the largest sigma_i, made
#    an upper confidence bound with the chi-square quantile (K / chi2_K(p)) ** 0.5.
#
# A bound of this kind holds on any CPU (it depends on the weights, the inputs and the
# network's operations, which the float64 replay reproduces to 1e-15 anywhere), stays
# orders of magnitude below the effect of a real defect, and fails when an operation the
# table does not know appears: then it must be classified, not guessed.

GOLDEN_FAILURE_PROBABILITY = 1e-6  # p above: a correct model fails a golden test once in a million runs


U32 = torch.finfo(torch.float32).eps / 2  # float32's unit roundoff


def _terms(n: int) -> float:
    """The half-width of one uniform error whose variance is that of ``n`` independent
    roundings of at most ``u S`` each (``S`` the operation's scale): ``sqrt(n) u``. In the
    Hoeffding bound only the sum of the squared bounds counts, n (u S)^2, so ``n`` roundings
    that share a gain (the additions of one sum) can stand as one term of this half-width."""
    return math.sqrt(n) * U32


def _promote(x):
    if isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return x.to(torch.float64)
    return x


def _abs_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.abs() @ b.abs()


class _Float32Rounding:
    """A ``TorchDispatchMode`` (built on first use: torch's dispatch-mode module is imported
    only here) that runs every operation in float64 and, given a generator, moves each
    floating result by a uniform random error within the float32 standard-model bound of that
    operation. Without a generator it is the exact (float64) evaluation. Float32 tensors and
    float32 requests (``.float()``, ``arange(dtype=float32)``) are promoted to float64."""

    # Data movement, comparisons, selections and integer work: no rounding.
    EXACT = frozenset({
        "view", "_unsafe_view", "reshape", "permute", "t", "transpose", "expand", "clone", "cat", "stack",
        "index", "index_select", "select", "slice", "split", "split_with_sizes", "unbind", "unsqueeze", "squeeze",
        "embedding", "constant_pad_nd", "new_zeros", "new_empty", "new_ones", "zeros", "zeros_like", "ones",
        "ones_like", "empty", "empty_like", "full", "fill", "masked_fill", "index_fill", "index_copy", "clamp",
        "clamp_min", "clamp_max", "max", "min", "amax", "amin", "sort", "lift_fresh", "repeat_interleave",
        "detach", "alias", "copy", "where", "neg", "abs", "relu", "arange", "_to_copy", "expand_as", "gather",
        "flip", "roll", "repeat", "narrow", "select_scatter", "slice_scatter", "_local_scalar_dense",
        "scalar_tensor", "lift_fresh_copy", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge", "equal",
        "any", "all", "bincount", "nonzero", "searchsorted", "unique_dim", "bitwise_not", "argmax", "argmin",
        "promote_types",
    })
    # Elementwise operations: how many ulp of the result one can be off (IEEE arithmetic 1; a
    # library function within 1 ulp plus its own rounding, 2; composites the sum of their parts).
    ELEMENTWISE = {
        "add": 1, "sub": 1, "mul": 1, "div": 1, "reciprocal": 1, "sqrt": 1, "rsqrt": 2, "square": 1,
        "exp": 2, "log": 2, "sin": 2, "cos": 2, "tanh": 2, "pow": 2, "sigmoid": 4, "silu": 5,
        "gelu": 9,  # tanh form: a cube, three products, a sum, tanh, one plus, a product, a half
        "erf": 2, "softplus": 4, "addcmul": 2, "lerp": 3,
    }

    def __init__(self, noise: torch.Generator | None):
        from torch.utils._python_dispatch import TorchDispatchMode

        owner = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return owner._dispatch(func, args, kwargs or {})

        self.mode = Mode()
        self.noise = noise

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def _dispatch(self, func, args, kwargs):
        name = func.overloadpacket.__name__
        name = name[:-1] if name.endswith("_") and not name.startswith("_") else name
        if kwargs.get("dtype") in (torch.float32, torch.float16, torch.bfloat16):
            kwargs = {**kwargs, "dtype": torch.float64}
        args = torch.utils._pytree.tree_map(_promote, args)
        kwargs = torch.utils._pytree.tree_map(_promote, kwargs)
        if self.noise is None or name in self.EXACT:
            return func(*args, **kwargs)
        # An in-place accumulation (index_add_) is bounded by its operands as they were.
        before = args[0].abs() if func._schema.is_mutable and isinstance(args[0], torch.Tensor) else None
        out = func(*args, **kwargs)
        result = out[0] if isinstance(out, tuple) else out
        if not isinstance(result, torch.Tensor) or not result.is_floating_point():
            return out
        error = self._error(name, func, args, kwargs, out, result, before)
        moved = (torch.rand(result.shape, generator=self.noise, dtype=torch.float64) * 2 - 1) * error
        if before is not None:
            return result.add_(moved) if not isinstance(out, tuple) else out
        return result + moved if not isinstance(out, tuple) else (result + moved, *out[1:])

    def _error(self, name, func, args, kwargs, out, result, before):
        """The half-width of the float32 rounding error of this operation's (first) result,
        elementwise (a term of the Hoeffding sum above; see :func:`_terms`)."""
        if name in self.ELEMENTWISE:
            return self.ELEMENTWISE[name] * U32 * result.abs()
        if name in ("mm", "bmm"):  # n products and n sums of at most u (|A||B|)
            return _terms(2 * args[0].shape[-1]) * _abs_mm(args[0], args[1])
        if name in ("addmm", "baddbmm"):
            return _terms(2 * args[1].shape[-1] + 1) * (args[0].abs() + _abs_mm(args[1], args[2]))
        if name in ("sum", "mean", "cumsum"):
            x = args[0]
            n = x.shape[args[1]] if name == "cumsum" else x.numel() // max(result.numel(), 1)
            plain = {k: v for k, v in kwargs.items() if k != "dtype"}
            return _terms(max(n, 1) + (name == "mean")) * func(x.abs(), *args[1:], **plain).abs()
        if name == "linalg_vector_norm":
            order = args[1] if len(args) > 1 else kwargs.get("ord", 2)
            if order != 2:
                raise NotImplementedError(f"linalg_vector_norm of order {order}: classify its rounding")
            n = args[0].numel() // max(result.numel(), 1)
            return _terms(2 * n + 1) * result.abs()  # n squares, n sums, a root: no cancellation
        if name == "index_add":
            dim, index, source = args[1:4]
            count = int(torch.bincount(index).max()) if index.numel() else 0
            start = before if before is not None else args[0].abs()
            return _terms(count) * start.index_add(dim, index, source.abs())
        if name == "scatter_reduce":
            self_, dim, index, src, reduce = args[:5]
            if reduce in ("amax", "amin"):
                return torch.zeros_like(result)
            if reduce not in ("sum", "mean"):
                raise NotImplementedError(f"scatter_reduce with {reduce}: classify its rounding")
            include_self = kwargs.get("include_self", args[5] if len(args) > 5 else True)
            count = int(torch.bincount(index.reshape(-1)).max()) + 1  # the division of a mean, once
            return _terms(count + 1) * self_.abs().scatter_reduce(dim, index, src.abs(), reduce, include_self=include_self)
        if name == "native_layer_norm":
            x, shape, weight, bias = args[:4]
            dims = tuple(range(x.dim() - len(shape), x.dim()))
            # The mean and the variance are sums of n terms (2n roundings each, of at most
            # u max|x| once scaled by 1 / std); x - mean, the scaling and the affine map round
            # once each.
            scaled = x.abs().amax(dim=dims, keepdim=True) * out[2]
            affine = scaled * (weight.abs() if weight is not None else 1) + (bias.abs() if bias is not None else 0)
            return _terms(4 * math.prod(shape) + 4) * affine
        if name == "_scaled_dot_product_flash_attention_for_cpu":
            q, k, v = args[:3]
            scale = kwargs.get("scale") or q.shape[-1] ** -0.5
            # Scores: 2d + 2 roundings of at most u |q||k| scale (the products, the sums, the
            # scale, an additive mask); the softmax turns a score error into a relative weight
            # error of at most twice the largest one of the query; the exponentials, the
            # normaliser and the weighted sum over L keys add 4L + 4 roundings of at most
            # u sum_j p_j |v_j|.
            score = _terms(2 * q.shape[-1] + 2) * scale * (q.abs() @ k.abs().transpose(-1, -2)).amax(-1, keepdim=True)
            weighted = func(q, k, v.abs(), *args[3:], **kwargs)[0]
            return (2 * score + _terms(4 * k.shape[-2] + 4)) * weighted
        raise NotImplementedError(
            f"{func}: its float32 rounding is not classified in tests/numerics.py; add it to a table there")


@dataclass(frozen=True)
class Float32Bound:
    """What :func:`float32_error_bound` measured: per output, the largest replay standard
    deviation (``sigma``), and the factors that make it a bound."""

    sigma: dict[str, float]
    hoeffding: float  # sqrt(6 ln(2 M / p)): all M outputs together, with probability 1 - p
    chi: float  # sqrt(K / chi2_K(p)): sigma's upper confidence bound from K replays

    def __call__(self, name: str, evaluations: int = 1) -> float:
        """The largest |error| of one float32 evaluation of output ``name`` (``evaluations=1``:
        a golden against the exact value, which a float64 evaluation is), or the largest
        difference between two independent ones (``evaluations=2``: ours in float32 and the
        golden; their variances add)."""
        return self.hoeffding * self.chi * math.sqrt(evaluations) * self.sigma[name]


def float32_error_bound(fn, *, replays: int = 16, probability: float = GOLDEN_FAILURE_PROBABILITY,
                        seed: int = 0, key: str | None = None) -> Float32Bound:
    """How far from its exact value rounding can move a float32 evaluation of ``fn`` (which
    returns a dict name -> tensor), with probability ``1 - probability``, on any CPU: the
    argument is above. ``fn`` runs its network as written; float32 weights and inputs are
    promoted to float64 for the replays, and the caller's tensors are not changed.

    ``key`` names what ``fn`` computes (for a golden test: the fixture's sha256). Where the
    environment names a folder in ``PACT_RAY_BOUND_CACHE``, the bound is kept there under that
    key: ``make test`` runs the numerical tests twice, under two kernel sets, and the bound is
    the same in both (it is a float64 computation: the kernels move it by 1e-15)."""
    import json
    import os
    from pathlib import Path

    from scipy import stats

    folder = os.environ.get("PACT_RAY_BOUND_CACHE")
    cached = Path(folder) / f"{key}-{replays}-{probability:g}-{seed}.json" if folder and key else None
    if cached is not None and cached.is_file():
        return Float32Bound(**json.loads(cached.read_text()))

    with _Float32Rounding(None):
        exact = fn()
    sq = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in exact.items()}
    for r in range(replays):
        with _Float32Rounding(torch.Generator().manual_seed(seed + r)):
            replay = fn()
        for k in sq:
            sq[k] += (replay[k].double() - exact[k].double()) ** 2
    outputs = sum(v.numel() for v in exact.values())
    bound = Float32Bound(
        sigma={k: float((v / replays).sqrt().max()) for k, v in sq.items()},
        hoeffding=math.sqrt(6 * math.log(2 * outputs / probability)),
        chi=math.sqrt(replays / stats.chi2.ppf(probability, replays)),
    )
    if cached is not None:
        cached.write_text(json.dumps(dataclasses.asdict(bound)))
    return bound
