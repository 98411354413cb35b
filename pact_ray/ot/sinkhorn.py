r"""Batched entropic optimal transport in the log domain (Sinkhorn).

The OT router solves one small transport problem per (object, head): the K parts of
an object against the P image patches of its condition. This module holds the solver
and nothing router-specific, so that it can be checked against POT on its own.

The problem, for every leading batch index, is

.. math::
    \pi^\star = \mathop{\arg\min}_{\pi \geq 0} \ \langle \pi, \mathbf{C} \rangle_F
        - \varepsilon H(\pi)
    \quad \text{s.t.} \quad \pi \mathbf{1}_P = \mathbf{a}, \ \pi^T \mathbf{1}_K = \mathbf{b},

with :math:`H(\pi) = -\sum_{kp} \pi_{kp} \log \pi_{kp}` (see :func:`plan_entropy`).
Its solution is :math:`\pi_{kp} = \exp((f_k + g_p - C_{kp}) / \varepsilon)` for the
dual potentials :math:`\mathbf{f}, \mathbf{g}` that Sinkhorn's alternating projections
find [Cuturi 2013]. In the log domain [Peyré & Cuturi 2019, Section 4.4;
Schmitzer 2019] each half-step is an exact log-sum-exp, so small
:math:`\varepsilon` or large costs never under- or overflow :math:`\exp(-C/\varepsilon)`:

.. math::
    f_k &\leftarrow \varepsilon \log a_k
        - \varepsilon \operatorname{LSE}_p\big((g_p - C_{kp}) / \varepsilon\big) \\
    g_p &\leftarrow \varepsilon \log b_p
        - \varepsilon \operatorname{LSE}_k\big((f_k - C_{kp}) / \varepsilon\big)

References
----------
.. [1] M. Cuturi, "Sinkhorn Distances: Lightspeed Computation of Optimal Transport",
   NeurIPS 2013.
.. [2] G. Peyré and M. Cuturi, "Computational Optimal Transport", Foundations and
   Trends in Machine Learning 11(5-6), 2019, Section 4.4 (log-domain stabilisation).
.. [3] B. Schmitzer, "Stabilized Sparse Scaling Algorithms for Entropy Regularized
   Transport Problems", SIAM J. Sci. Comput. 41(3), 2019.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch

__all__ = ["SinkhornNotConverged", "SinkhornResult", "plan_entropy", "sinkhorn_log"]


class SinkhornNotConverged(RuntimeWarning):
    """Sinkhorn reached ``max_iter`` with a marginal error still above ``tol``."""


@dataclass(frozen=True)
class SinkhornResult:
    """Output of :func:`sinkhorn_log`; ``...`` is the broadcast batch shape."""

    plan: torch.Tensor  # [..., K, P] transport plan, float32 or wider
    f: torch.Tensor  # [..., K] row potential in cost units; -inf where a_k = 0
    g: torch.Tensor  # [..., P] column potential in cost units; -inf where b_p = 0
    iterations: int  # Sinkhorn iterations run (one iteration = an f and a g update)
    marginal_error: torch.Tensor  # [...] ||plan 1 - a||_1 + ||plan^T 1 - b||_1
    converged: bool  # max over the batch of the row-marginal L1 error < tol


def sinkhorn_log(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float = 0.05,
    max_iter: int = 50,
    tol: float = 1e-6,
    check_every: int = 5,
    differentiable: bool = False,
    warn: bool = False,
) -> SinkhornResult:
    r"""Solve a batch of entropic OT problems with log-domain Sinkhorn iterations.

    For every batch index, solves

    .. math::
        \min_{\pi \geq 0} \ \langle \pi, \mathbf{C} \rangle_F - \varepsilon H(\pi)
        \quad \text{s.t.} \quad \pi \mathbf{1} = \mathbf{a}, \ \pi^T \mathbf{1} = \mathbf{b}

    by alternating the exact log-domain projections on the two marginal constraints
    (module docstring, [1]_ [2]_ [3]_), starting from :math:`\mathbf{g} = 0`. Each
    iteration updates :math:`\mathbf{f}` (rows) and then :math:`\mathbf{g}` (columns),
    so after it the column marginal holds up to rounding and the row marginal
    :math:`\pi \mathbf{1} = \mathbf{a}` is the one still violated. The solver stops as
    soon as the largest row-marginal L1 error in the batch is below ``tol``. Reading
    that error needs a device-to-host sync, so it is checked only every
    ``check_every`` iterations (and at ``max_iter``). It costs no extra pass over the
    cost matrix: the log-sum-exp of the next f update gives the row sums,
    :math:`(\pi \mathbf{1})_k = \exp\big((f_k + \varepsilon \operatorname{LSE}_p((g_p -
    C_{kp})/\varepsilon)) / \varepsilon\big)`.

    Padding: a zero weight (:math:`a_k = 0` or :math:`b_p = 0`) gives a potential of
    :math:`-\infty` and therefore exactly zero plan mass in that row or column; the
    other entries are those of the problem with the padded rows/columns removed.
    Gradients stay finite: :math:`-\infty` entries get exactly zero weight and zero
    gradient in every log-sum-exp. Each problem must still have some positive mass in ``a``
    and ``b`` (both sum to 1).

    Parameters
    ----------
    cost : torch.Tensor, shape [..., K, P]
        Cost matrix :math:`\mathbf{C}` of each problem; any leading batch dims
        (e.g. [B, H, K, P] for objects x heads). Must be finite.
    a : torch.Tensor, shape [..., K]
        Row (part) marginals, non-negative, summing to 1 per problem. Leading dims
        broadcast against those of ``cost`` and ``b``.
    b : torch.Tensor, shape [..., P]
        Column (patch) marginals, non-negative, summing to 1 per problem.
    eps : float, optional
        Entropic regularisation :math:`\varepsilon > 0`, in cost units. Smaller is
        closer to unregularised OT and needs more iterations.
    max_iter : int, optional
        Maximum number of Sinkhorn iterations (each one an f and a g update).
    tol : float, optional
        Stop when the maximum over the batch of :math:`\|\pi \mathbf{1} - \mathbf{a}\|_1`
        is below ``tol``. In float32 the potentials, of size up to
        :math:`\max|C| / \varepsilon`, are rounded to about 1e-7 of that, which
        bounds the reachable error: near 1e-6 for standardised costs at
        ``eps=0.05``. Pass float64 inputs for tighter tolerances.
    check_every : int, optional
        Check the stopping criterion every ``check_every`` iterations; larger values
        sync less often but may run up to ``check_every - 1`` iterations too many.
    differentiable : bool, optional
        If False (default), run under :func:`torch.no_grad` and return a detached plan.
        If True, keep the autograd graph of every iteration, so that gradients flow
        from the plan to ``cost`` (and to ``a``, ``b`` where they are positive).
        Memory grows linearly with the iterations run.
    warn : bool, optional
        If True, emit one :class:`SinkhornNotConverged` warning when ``max_iter`` is
        reached before ``tol``. Off by default: the router calls this every step and
        logs ``marginal_error`` instead.

    Returns
    -------
    SinkhornResult
        ``plan`` [..., K, P], potentials ``f`` [..., K] and ``g`` [..., P] (cost
        units, :math:`\pi = \exp((f \oplus g - C)/\varepsilon)`), ``iterations``,
        per-problem ``marginal_error`` [...] (L1 error of both marginals, computed
        on the returned plan) and ``converged``. Everything is computed and
        returned in ``float32``, or in the widest dtype of the inputs if that is
        wider: float16/bfloat16 inputs are upcast and the plan is *not* cast back,
        because a plan with entries around 1/(K P) loses most of its marginal
        accuracy in half precision. The outputs are on ``cost.device``.

    Raises
    ------
    ValueError
        If shapes do not match or a numeric argument is out of range.

    Examples
    --------
    >>> cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    >>> half = torch.tensor([0.5, 0.5])
    >>> sinkhorn_log(cost, half, half, eps=1.0, max_iter=100).plan
    tensor([[0.3655, 0.1345],
            [0.1345, 0.3655]])
    """
    if cost.dim() < 2:
        raise ValueError(f"cost must be [..., K, P], got shape {tuple(cost.shape)}")
    n_rows, n_cols = cost.shape[-2:]
    if a.shape[-1:] != (n_rows,) or b.shape[-1:] != (n_cols,):
        raise ValueError(
            f"marginals must be a [..., {n_rows}] and b [..., {n_cols}] for cost "
            f"{tuple(cost.shape)}, got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if max_iter < 1 or check_every < 1:
        raise ValueError(
            f"max_iter and check_every must be >= 1, got {max_iter} and {check_every}"
        )

    dtype = torch.promote_types(
        torch.promote_types(cost.dtype, a.dtype),
        torch.promote_types(b.dtype, torch.float32),
    )
    batch_shape = torch.broadcast_shapes(cost.shape[:-2], a.shape[:-1], b.shape[:-1])
    grad_context = contextlib.nullcontext() if differentiable else torch.no_grad()

    with grad_context:
        cost = cost.to(dtype)
        # Work with potentials scaled by 1/eps, u = f/eps as [..., K, 1] and
        # v = g/eps as [..., 1, P], and with the log of the Gibbs kernel,
        # log K = -C/eps: each half-step is then a single LSE over one axis.
        log_kernel = cost / -eps
        a = a.to(device=cost.device, dtype=dtype).unsqueeze(-1)  # [..., K, 1]
        b = b.to(device=cost.device, dtype=dtype).unsqueeze(-2)  # [..., 1, P]
        log_a, log_b = _log_weights(a), _log_weights(b)
        # Without autograd, every LSE reuses one [..., K, P] buffer in place: fresh
        # temporaries of that size cost more than the arithmetic on CPU.
        workspace = None if torch.is_grad_enabled() else torch.empty(
            batch_shape + (n_rows, n_cols), dtype=dtype, device=cost.device
        )

        # Start from g = 0 on the real columns; padded ones are out from the start.
        v = torch.where(b > 0, 0.0, log_b).expand(batch_shape + (1, n_cols))
        row_lse = _logsumexp(log_kernel, v, -1, workspace)
        converged = False
        for iteration in range(1, max_iter + 1):
            u = log_a - row_lse
            v = log_b - _logsumexp(log_kernel, u, -2, workspace)
            # LSE of the next u update; it also gives this plan's row sums.
            row_lse = _logsumexp(log_kernel, v, -1, workspace)
            if iteration % check_every == 0 or iteration == max_iter:
                with torch.no_grad():
                    row_error = (torch.exp(u + row_lse) - a).abs().sum(dim=(-2, -1))
                    converged = bool((row_error < tol).all())
                if converged:
                    break

        plan = torch.exp(log_kernel + u + v)
        with torch.no_grad():
            row_error = (plan.sum(dim=-1, keepdim=True) - a).abs().sum(dim=(-2, -1))
            col_error = (plan.sum(dim=-2, keepdim=True) - b).abs().sum(dim=(-2, -1))
            marginal_error = row_error + col_error

    if warn and not converged:
        warnings.warn(
            f"Sinkhorn did not converge in {max_iter} iterations (max marginal error "
            f"{marginal_error.max().item():.3e} >= tol {tol:.1e}); increase max_iter "
            "or eps.",
            SinkhornNotConverged,
            stacklevel=2,
        )
    return SinkhornResult(
        plan=plan,
        f=eps * u.squeeze(-1),
        g=eps * v.squeeze(-2),
        iterations=iteration,
        marginal_error=marginal_error,
        converged=converged,
    )


def _log_weights(weights: torch.Tensor) -> torch.Tensor:
    """``log(weights)`` with -inf at zeros and a zero (not infinite) gradient there."""
    positive = weights > 0
    safe = torch.where(positive, weights, torch.ones_like(weights))
    return torch.where(positive, safe.log(), -math.inf)


def _logsumexp(
    log_kernel: torch.Tensor,
    potential: torch.Tensor,
    dim: int,
    workspace: torch.Tensor | None,
) -> torch.Tensor:
    r"""Stabilised :math:`\operatorname{LSE}` over ``dim`` of ``log_kernel + potential``.

    The usual max shift makes every term at most :math:`e^0 = 1`. Shifted exponents
    are then clamped below at :math:`\log(\text{tiny}) + 1` of the dtype: a term that
    small (about 3e-38 in float32) is far below the rounding of a sum that is at
    least 1, so the value does not change, but the vectorised CPU ``exp`` takes a
    slow path (5-10x) for results that underflow to subnormals or zero, and with
    costs spread over many multiples of eps most of a row underflows. Terms of
    :math:`-\infty` (padding) get a zero gradient through the clamp.

    Parameters
    ----------
    log_kernel : torch.Tensor, shape [..., K, P]
        :math:`-\mathbf{C} / \varepsilon`.
    potential : torch.Tensor, shape [..., 1, P] or [..., K, 1]
        Scaled potential v or u, broadcast against ``log_kernel``.
    dim : int
        -1 (reduce over P, the f update) or -2 (reduce over K, the g update).
    workspace : torch.Tensor or None, shape [..., K, P]
        Buffer overwritten in place when autograd is off; None to build a graph.

    Returns
    -------
    torch.Tensor, shape [..., K, 1] (dim=-1) or [..., 1, P] (dim=-2)
        The LSE, keeping ``dim`` as a singleton.
    """
    floor = math.log(torch.finfo(log_kernel.dtype).tiny) + 1.0
    if workspace is None:
        scores = log_kernel + potential
        shift = scores.detach().amax(dim=dim, keepdim=True)
        terms = (scores - shift).clamp_min(floor).exp()
        return terms.sum(dim=dim, keepdim=True).log() + shift
    scores = torch.add(log_kernel, potential, out=workspace)
    shift = scores.amax(dim=dim, keepdim=True)
    terms = scores.sub_(shift).clamp_min_(floor).exp_()
    return terms.sum(dim=dim, keepdim=True).log_().add_(shift)


def plan_entropy(plan: torch.Tensor) -> torch.Tensor:
    r"""Entropy :math:`H(\pi) = -\sum_{kp} \pi_{kp} \log \pi_{kp}` of each plan.

    Uses the convention :math:`0 \log 0 = 0`; zero entries (padding) contribute
    nothing to the value and a zero (not NaN) gradient.

    Parameters
    ----------
    plan : torch.Tensor, shape [..., K, P]
        Non-negative transport plans.

    Returns
    -------
    torch.Tensor, shape [...]
        Entropy per plan, in nats; at most :math:`\log(KP)` for a plan of mass 1.
    """
    positive = plan > 0
    safe_log = torch.log(torch.where(positive, plan, torch.ones_like(plan)))
    return -(plan * safe_log).sum(dim=(-2, -1))
