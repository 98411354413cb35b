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

import math

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
