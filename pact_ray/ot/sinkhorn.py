r"""Batched entropic optimal transport in the log domain: Sinkhorn, then Newton.

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
dual potentials :math:`\mathbf{f}, \mathbf{g}` [Cuturi 2013]. We work with scaled
potentials :math:`u = f/\varepsilon`, :math:`v = g/\varepsilon` and the log kernel
:math:`\ell = -\mathbf{C}/\varepsilon`.

**Semi-dual.** For a given u the best v is the exact column projection
:math:`v_p = \log b_p - \operatorname{LSE}_k(\ell_{kp} + u_k)`, and the plan it gives is
:math:`\pi(u) = \operatorname{softmax}_k(\ell + u)\, \operatorname{diag}(\mathbf{b})`: its
column marginals hold by construction and only the K row marginals
:math:`r(u) = \pi(u) \mathbf{1}` remain to be fixed. Solving :math:`r(u) = a` is
maximising the concave semi-dual :math:`F(u) = \langle a, u \rangle + \langle b, v(u)
\rangle` [Cuturi & Peyré 2018], whose Hessian is the K x K matrix

.. math::
    J(u) = \frac{\partial r}{\partial u} = \operatorname{diag}(r) -
        \pi \operatorname{diag}(\mathbf{b})^{-1} \pi^T ,

positive semi-definite with the constants as its null space (adding one constant to
every :math:`u_k` moves it into v and leaves the plan unchanged).

**The iteration.** This is the one statement of the solver's algorithm: the torch loop
(:meth:`_Solver.run`) and the compiled CPU loop (:func:`pact_ray.ot.cpu_solver.solve_batch`)
both run exactly this, and point here instead of restating it. The constants named are this
module's; tiny is the smallest normal number of the solve's dtype.

*State.* The iterate is the scaled row potential :math:`u \in \mathbb{R}^K` (f = eps u).
At an iterate the loop evaluates the column-normalised kernel
:math:`s_{kp} = \max(\operatorname{softmax}_k(\ell + u)_{kp}, \phi_k)`, floored at
:math:`\phi_k = 2^8 \sqrt{\text{tiny}}` where :math:`a_k > 0` and at 0 in a padded row
(see Accuracy); the plan :math:`\pi = s \operatorname{diag}(\mathbf{b})` (the column
projection v(u) above: its columns hold by construction); its row sums
:math:`r = \pi \mathbf{1}`; and the row error :math:`e = \lVert r - a \rVert_1`.

*Start.* Cold: :math:`u = \log a - \operatorname{LSE}_p(\ell)`, the Sinkhorn row update
from v = 0 (as POT's), which counts as iteration 1 (:func:`_logsumexp`: shifted exponents
clamped below at log(tiny) + 1). Warm (``f_init``): :math:`u = f_{init} / \varepsilon`,
:math:`-\infty` in padded rows, iteration 0. Then the state is evaluated.

*Iteration n* (n = 2, 3, ... cold, 1, 2, ... warm) is one of:

(S) the **Sinkhorn step** :math:`u \leftarrow u + \log a - \log \max(r, \text{tiny})`: for
    n <= ``warmup`` (``WARMUP_ITERS``, 2) on a cold start, for every n with
    ``method="sinkhorn"``, and as the Newton step's fallback. After the column projection it
    is exactly the row update :math:`u = \log a - \operatorname{LSE}_p(\ell + v)` [Cuturi
    2013; Peyré & Cuturi 2019, §4.4].
(N) the **Newton step** on the semi-dual otherwise [Brauer, Clason, Lorenz & Wirth 2017;
    Tang et al. 2024]:

    (N1) *Direction.* :math:`\delta` solves
         :math:`(J + \mu \operatorname{diag}(r) + \mathbf{1}\mathbf{1}^T / K^2 + D)\, \delta =
         a - r` with :math:`J = \operatorname{diag}(r) - s \operatorname{diag}(\mathbf{b})
         s^T`, :math:`\mu` = ``LEVENBERG_MARQUARDT`` (1e-4) and D = 1 on the diagonal of
         padded rows, by a Cholesky factorisation; :math:`\delta` is NaN where the
         factorisation fails. Each :math:`\delta_k` is then clamped to ± ``MAX_STEP`` (25).
    (N2) *Full step first* (only where the error is read on the host: ``early_stop``). If
         e < ``LOCAL_ERROR`` (0.3), the state at :math:`u + \delta` is evaluated, and
         :math:`u + \delta` is taken if its row error e' meets ``tol`` (e' < tol), or if
         e' < e and :math:`G(\delta) > 0`.
    (N3) *Line search* otherwise: :math:`t^\star = \arg\max_t G(t \delta)` over t in
         ``LINE_SEARCH_STEPS`` = (2, 1.4, 1, 0.7, 0.5, 0.35, 0.25, 1/8, 1/16, 1/32) (ties: the
         longer step, listed first); :math:`u \leftarrow u + t^\star \delta` if
         :math:`G(t^\star \delta) > 0`, else the Sinkhorn step (S). A NaN gain never wins.

    Here :math:`G(d) = F(u + d) - F(u) = \langle a, d \rangle - \sum_p b_p \log \sum_k
    s_{kp} e^{d_k}`, the gain in the semi-dual, computed from the current s.

After each iteration the state is evaluated at the new u.

*Stop.* With ``early_stop``, the loop ends at the first evaluation with e < ``tol`` (the
start's included) or after ``max_iter`` iterations (the cold start's update counted), and
``iterations`` is the number run. Without (the sync-free loop) it runs all ``max_iter``, and
``iterations`` counts those before e < ``tol`` first held.

*Result.* From the last state: the plan :math:`\pi`, :math:`f = \varepsilon u`, the marginal
error :math:`e + \lVert \pi^T \mathbf{1} - b \rVert_1` of that plan, and, when read,
:math:`g = \varepsilon (\log b - \operatorname{LSE}_k(\ell + u))`.

*What differs between the two loops* (nothing else does). The torch loop solves a batch
together: its stop and the gate of (N2) (e < ``LOCAL_ERROR``) read the batch's largest e
((N2)'s choice is still made per problem), so most of a batch's problems end one quadratic
step further, near the float floor, and its ``iterations`` are those until the whole batch
met ``tol``. Without ``early_stop`` it never tries (N2). The compiled loop decides per
problem (its ``iterations``: the most any problem took), and computes in float64 whatever
the dtype (tiny and :math:`\phi` stay the dtype's), returning :math:`\pi`, f and the error
in the solve's dtype. A problem solved alone in float64 takes the same steps in both
(tests/test_sinkhorn.py, ``test_the_two_loops_take_the_same_steps``).

*Why these choices.* Alone, Sinkhorn converges only linearly, at a rate that is poor when
eps is small next to the spread of the costs: on the router's real costs at eps 0.05 it
needs 85-250 iterations for an L1 error of 1e-4 (bench/bench_ot_convergence.py). Newton
converges quadratically near the solution, and K (the parts of one object) is small, so its
system is tiny and dense: a batched Cholesky solve costs less than one pass over the
[K, P] plan. The rank-one term fixes the potential's free constant (the gauge, J's null
space) and gives it the eigenvalue 1/K, of the order of J's others; a padded row (r = 0)
gets its 1 so that its step is finite. The Levenberg-Marquardt shift [Nocedal & Wright
2006, §10.3]: parts that share almost no patch (a strong mask prior) make J nearly
singular, and float32 rounding can then make it indefinite, failing the factorisation; the
shift changes the step only along directions whose curvature is below 1e-4 of the row
masses. The clamp keeps :math:`e^{t \delta}` finite and normal in float32 (e^±50 is 5e21
and 2e-22); a near-singular J's long step is then shortened by the line search. Away from
the solution a full step may overshoot, so the line search evaluates its candidates in one
batched pass (fixed shapes, no host sync); they hold the backtracking sequence
:math:`1, 1/2, \dots`, so the step gains at least what Armijo's backtracking would [Nocedal
& Wright 2006, §3.1]. G is computed from the current softmax so that it does not cancel
between large values of F. The Sinkhorn step never lowers F either, so no iteration lowers
F (tested, on the sync-free loop). Near the solution the full step is the one the line
search would pick, for half its operations; it is kept only where it does not lower F:
one that lowers the row error but descends F sends the next damped step back (a 2-cycle
that never converged, found by the POT property test: 7 parts, 36 patches, eps 0.01).

``method="sinkhorn"`` runs plain log-domain Sinkhorn only: the same updates, in the same
order (f then g, from g = 0), as POT's ``sinkhorn_log`` and ``solve_batch``; it is kept as
the iterate-for-iterate reference and for the benchmark.

Warm start: ``f_init`` (for instance the potential of a solve of a nearby cost, as the
router's edge-regularised second solve does) replaces the warm-up.

Why not only accelerate Sinkhorn: on the quick matrix's real costs plain Sinkhorn needs
85-250 iterations for an L1 error of 1e-4 and over-relaxed Sinkhorn (:math:`\omega = 1.75`,
[Thibault et al. 2021]) 33-36, at about 16 small kernels each (epsilon scaling did not
shorten either in our trials); the Newton solve needs 6-10 iterations from a cold start and
3-4 warm-started (bench/bench_ot_convergence.py).

**Accuracy.** The stopping criterion is the L1 error of the row marginals of the
current plan (the columns hold to rounding). In float32 the potentials, of size up to
:math:`\max|C| / \varepsilon`, carry relative rounding of about 6e-8, which leaves a
floor of about 1e-6 on that error for standardised costs at eps 0.05: the default
``tol`` of 1e-4 sits two orders above it, so it is reached by every problem, and one
more Newton step (quadratic convergence) usually lands at the floor. Entries of the
softmax below :math:`2^8 \sqrt{\text{tiny}}` (2.8e-17 in float32) are raised to it,
except in padded rows: subnormal numbers make x86 arithmetic 10-50x slower, and a row
sum moves by at most P times that floor.

**Sync-free loop.** Reading the error on the host is a device-to-host sync. On CPU it
costs nothing, and the loop stops at the first iteration below ``tol``. On CUDA
(``early_stop=None``) the loop runs all ``max_iter`` iterations with fixed shapes and no
host read, so that a CUDA graph or ``torch.compile`` can capture it. A Newton step at
the floor leaves the plan unchanged to rounding. The iterations it took are counted on
the device.

**Compiled CPU loop** (:mod:`pact_ray.ot.cpu_solver`, ``compiled``). On a CPU the
router's solves are dispatch-bound: an iteration is about 25 torch operations of 2-5 us
on [2, 4, 4, 64] tensors, so a first solve took 0.9 ms, almost none of it arithmetic.
The same algorithm, compiled with numba and looping in machine code, takes about a
third of that with its call (bench/bench_router_block.py). Its arithmetic is scalar, so
from about 2^15 plan entries in a batch (PAct's shapes) the torch loop is faster again,
and runs (``COMPILED_MAX_ELEMENTS``). How it differs from the torch loop (per-problem
decisions, float64 arithmetic) is stated with the iteration above. Both are tested against
POT and each other.

**Gradients** (``differentiable=True``): implicit differentiation of the optimality
conditions [Luise et al. 2018; Eisenberger et al. 2022], not an unrolled loop. The
backward pass solves one (K + P)-dimensional linear system per problem, reduced to
the same K x K Schur complement J, so the memory of a differentiable plan is that of
the plan itself, whatever the iteration count. The result is the gradient at the exact
optimum, computed at the returned plan: exact to the plan's marginal error.

References
----------
.. [1] M. Cuturi, "Sinkhorn Distances: Lightspeed Computation of Optimal Transport",
   NeurIPS 2013.
.. [2] G. Peyré and M. Cuturi, "Computational Optimal Transport", Foundations and
   Trends in Machine Learning 11(5-6), 2019, Section 4.4 (log-domain stabilisation).
.. [3] M. Cuturi and G. Peyré, "Semidual Regularized Optimal Transport", SIAM Review
   60(4), 2018.
.. [4] C. Brauer, C. Clason, D. Lorenz and B. Wirth, "A Sinkhorn-Newton method for
   entropic optimal transport", arXiv:1710.06635, 2017.
.. [5] X. Tang, M. Shavlovsky, H. Rahmanian, E. Tardini, K. K. Thekumparampil,
   T. Xiao and L. Ying, "Accelerating Sinkhorn algorithm with sparse Newton
   iterations", ICLR 2024.
.. [6] J. Nocedal and S. J. Wright, "Numerical Optimization", 2nd ed., Springer 2006.
.. [7] G. Luise, A. Rudi, M. Pontil and C. Ciliberto, "Differential Properties of
   Sinkhorn Approximation for Learning with Wasserstein Distance", NeurIPS 2018.
.. [8] M. Eisenberger, A. Toker, L. Leal-Taixé, F. Bernard and D. Cremers, "A Unified
   Framework for Implicit Sinkhorn Differentiation", CVPR 2022.
.. [9] A. Thibault, L. Chizat, C. Dossal and N. Papadakis, "Overrelaxed Sinkhorn-Knopp
   Algorithm for Regularized Optimal Transport", Algorithms 14(5), 2021.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy
import torch

# The solver's defaults live with RouterConfig, torch-free: the one place they are set.
from pact_ray.ot.config import DEFAULT_EPS, DEFAULT_MAX_ITER, DEFAULT_TOL

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_MAX_ITER",
    "DEFAULT_TOL",
    "METHODS",
    "WARMUP_ITERS",
    "SinkhornNotConverged",
    "SinkhornResult",
    "plan_entropy",
    "sinkhorn_log",
]

WARMUP_ITERS = 2  # Sinkhorn iterations before the first Newton step (cold starts only)
METHODS = ("newton", "sinkhorn")
# Step lengths of the parallel line search, longest first (ties go to the longer step).
LINE_SEARCH_STEPS = (2.0, 1.4, 1.0, 0.7, 0.5, 0.35, 0.25, 0.125, 0.0625, 0.03125)
LOCAL_ERROR = 0.3  # below this largest row error, a full Newton step is tried first (CPU)
LEVENBERG_MARQUARDT = 1e-4  # relative diagonal shift of J (see _Solver.jacobian)
MAX_STEP = 25.0  # bound on a Newton step of u = f / eps (see _Solver.newton_direction)


class SinkhornNotConverged(RuntimeWarning):
    """The solver reached ``max_iter`` with a marginal error still above ``tol``."""


@dataclass(frozen=True)
class SinkhornResult:
    """Output of :func:`sinkhorn_log`; ``...`` is the broadcast batch shape."""

    plan: torch.Tensor  # [..., K, P] transport plan, float32 or wider
    f: torch.Tensor  # [..., K] row potential in cost units; -inf where a_k = 0
    iterations: torch.Tensor  # [] int64: iterations until the whole batch met tol (max_iter if never)
    marginal_error: torch.Tensor  # [...] ||plan 1 - a||_1 + ||plan^T 1 - b||_1
    tol: float  # the tolerance the solve was run with
    column_potential: Callable[[], torch.Tensor] = field(repr=False, compare=False)

    @cached_property
    def g(self) -> torch.Tensor:
        """[..., P] column potential in cost units; -inf where b_p = 0. Computed on first
        access (one log-sum-exp over the plan): the router never reads it."""
        return self.column_potential()

    @property
    def converged(self) -> bool:
        """Every problem's marginal error is below ``tol``. Reading it syncs with the device."""
        return bool((self.marginal_error < self.tol).all())


def sinkhorn_log(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float = DEFAULT_EPS,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    *,
    method: str = "newton",
    warmup: int = WARMUP_ITERS,
    f_init: torch.Tensor | None = None,
    early_stop: bool | None = None,
    compiled: bool | None = None,
    differentiable: bool = False,
    warn: bool = False,
) -> SinkhornResult:
    r"""Solve a batch of entropic OT problems: log-domain Sinkhorn, then Newton steps.

    For every batch index, solves

    .. math::
        \min_{\pi \geq 0} \ \langle \pi, \mathbf{C} \rangle_F - \varepsilon H(\pi)
        \quad \text{s.t.} \quad \pi \mathbf{1} = \mathbf{a}, \ \pi^T \mathbf{1} = \mathbf{b}

    with the algorithm of the module docstring ([1]_ [3]_ [4]_). One iteration is one
    Sinkhorn iteration (a row and a column update) or one Newton step (with its line
    search and column update); after each, the column marginals hold to rounding and
    the L1 error of the row marginals is the one measured against ``tol``.

    Padding: a zero weight (:math:`a_k = 0` or :math:`b_p = 0`) gives a potential of
    :math:`-\infty` and exactly zero plan mass in that row or column; the other entries
    are those of the problem with the padded rows/columns removed. Each problem must
    still have some positive mass in ``a`` and ``b`` (both sum to 1).

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
        Maximum number of iterations (Sinkhorn iterations and Newton steps together).
    tol : float, optional
        Stop when the largest L1 row-marginal error in the batch is below ``tol``.
        float32 reaches about 1e-6 on standardised costs at eps 0.05 (module
        docstring); pass float64 inputs for tighter tolerances.
    method : {"newton", "sinkhorn"}, optional
        "newton": ``warmup`` Sinkhorn iterations, then Newton steps on the semi-dual.
        "sinkhorn": plain Sinkhorn for all iterations (POT's updates, iterate for
        iterate).
    warmup : int, optional
        Sinkhorn iterations before the first Newton step when starting cold.
    f_init : torch.Tensor, shape [..., K], optional
        Warm start: a row potential in cost units (for instance ``f`` of a solve of a
        nearby cost). It replaces the warm-up; it carries no gradient.
    early_stop : bool, optional
        Stop at the first iteration whose error is below ``tol``. That reads a
        value on the host: a sync on CUDA. None (default): on CPU only; elsewhere the
        loop runs ``max_iter`` iterations with fixed shapes and no host sync.
    compiled : bool, optional
        Run the iterations as one compiled CPU kernel (module docstring, "Compiled CPU
        loop"). None (default): on CPU with ``early_stop``, where numba is installed, for
        batches of up to ``COMPILED_MAX_ELEMENTS`` plan entries (above, the torch loop's
        vectorised arithmetic is faster). True requires CPU, ``early_stop`` and numba;
        False runs the torch loop.
    differentiable : bool, optional
        If False (default), return a detached plan. If True, the plan carries an
        implicit-differentiation backward (module docstring [7]_ [8]_) to ``cost``,
        ``a`` and ``b``. Those two are defined up to adding a constant to every entry
        (only directions along the sum-to-one constraints matter); ``a``'s returned
        gradient sums to zero. Its memory is one plan, whatever the iteration count.
        ``f``, ``g`` and ``marginal_error`` stay detached.
    warn : bool, optional
        If True, emit one :class:`SinkhornNotConverged` warning when ``max_iter`` is
        reached before ``tol`` (a host sync). Off by default: the router calls this
        every step and logs ``marginal_error`` instead.

    Returns
    -------
    SinkhornResult
        ``plan`` [..., K, P], potentials ``f`` [..., K] and ``g`` [..., P] (cost
        units, :math:`\pi = \exp((f \oplus g - C)/\varepsilon)`), ``iterations`` (a
        0-dim tensor: iterations until every problem met ``tol``), per-problem
        ``marginal_error`` [...] (L1 error of both marginals, computed on the
        returned plan), ``tol`` and the ``converged`` property. Everything is
        computed and returned in ``float32``, or in the widest dtype of the inputs if
        that is wider: float16/bfloat16 inputs are upcast and the plan is *not* cast
        back, because a plan with entries around 1/(K P) loses most of its marginal
        accuracy in half precision. The outputs are on ``cost.device``.

    Raises
    ------
    ValueError
        If shapes do not match or a numeric argument is out of range.

    Examples
    --------
    >>> cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    >>> half = torch.tensor([0.5, 0.5])
    >>> sinkhorn_log(cost, half, half, eps=1.0).plan
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
    if f_init is not None and f_init.shape[-1:] != (n_rows,):
        raise ValueError(f"f_init must be [..., {n_rows}], got {tuple(f_init.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if max_iter < 1 or warmup < 0:
        raise ValueError(f"max_iter must be >= 1 and warmup >= 0, got {max_iter} and {warmup}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    dtype = torch.promote_types(
        torch.promote_types(cost.dtype, a.dtype),
        torch.promote_types(b.dtype, torch.float32),
    )
    if early_stop is None:
        early_stop = cost.device.type == "cpu"
    batch_shape = torch.broadcast_shapes(cost.shape[:-2], a.shape[:-1], b.shape[:-1])
    can_compile = early_stop and cost.device.type == "cpu" and _cpu_kernel() is not None
    if compiled is None:
        compiled = can_compile and math.prod(batch_shape) * n_rows * n_cols <= COMPILED_MAX_ELEMENTS
    elif compiled and not can_compile:
        raise ValueError("compiled=True needs a CPU tensor, early_stop and numba (pip install numba)")
    if compiled:
        return _solve_compiled(cost, a, b, batch_shape, eps, max_iter, tol, method == "newton", warmup, f_init, dtype,
                               differentiable, warn)
    with torch.no_grad():
        log_kernel = _as(cost, dtype, cost.device) / -eps  # [..., K, P]
        a_col = _as(a, dtype, cost.device).unsqueeze(-1)  # [..., K, 1]
        b_row = _as(b, dtype, cost.device).unsqueeze(-2)  # [..., 1, P]
        u_init = None if f_init is None else (_as(f_init, dtype, cost.device) / eps).unsqueeze(-1)
        solver = _Solver(log_kernel, a_col, b_row, batch_shape)
        state = solver.run(u_init, max_iter, tol, method == "newton", warmup, early_stop)

    return _result(cost, a, b, eps, max_iter, tol, state.plan, eps * state.u.squeeze(-1), state.iterations,
                   state.marginal_error, differentiable, warn,
                   column_potential=lambda: eps * solver.column_potential(state.u).squeeze(-2))


def _result(cost, a, b, eps, max_iter, tol, plan, f, iterations, marginal_error, differentiable, warn,
            column_potential) -> SinkhornResult:
    """The solve's result, with the implicit backward attached and the warning given when asked."""
    if differentiable:
        plan = _ImplicitPlan.apply(cost, a, b, plan.detach(), eps)
    if warn and not bool((marginal_error < tol).all()):
        warnings.warn(
            f"Sinkhorn did not converge in {max_iter} iterations (max marginal error "
            f"{marginal_error.max().item():.3e} >= tol {tol:.1e}); increase max_iter "
            "or eps.",
            SinkhornNotConverged,
            stacklevel=3,
        )
    return SinkhornResult(plan=plan, f=f, iterations=iterations, marginal_error=marginal_error, tol=tol,
                          column_potential=column_potential)


# The compiled loop's arithmetic is scalar (no vectorised exp without Intel's SVML), the
# torch loop's is vectorised but pays ~75 us of dispatch per iteration: per solve about
# 70 ns per plan entry against 2 ms + 16 ns per entry (bench/bench_sinkhorn.py, 2 cores).
# The compiled loop is the default up to 2^15 entries (the small preset's [2, 4, 4, 65] is
# 2,080; PAct's 2 objects x 16 heads x 8 parts x 1370 patches, 350,720, runs the torch loop).
COMPILED_MAX_ELEMENTS = 2**15
_NO_INIT = {dtype: torch.zeros((0, 0), dtype=dtype).numpy() for dtype in (torch.float32, torch.float64)}
_STEPS_NP = numpy.asarray(LINE_SEARCH_STEPS)


@functools.cache
def _cpu_kernel():
    """The compiled CPU solve, or None where numba is missing (the torch loop then runs)."""
    try:
        from pact_ray.ot.cpu_solver import solve_batch
    except ImportError:
        return None
    return solve_batch


def _solve_compiled(cost, a, b, batch_shape, eps, max_iter, tol, newton, warmup, f_init, dtype, differentiable,
                    warn) -> SinkhornResult:
    """The CPU solve in one compiled call (pact_ray.ot.cpu_solver): the batch flattened to
    [n, K, P], float64 arithmetic inside, the plan, f and the error in ``dtype``; the
    iterations reported are the most any problem took."""
    n_rows, n_cols = cost.shape[-2:]
    n = math.prod(batch_shape)

    def flat(x: torch.Tensor, tail: tuple[int, ...]):
        # C-contiguous always: numba compiles (and caches) one kernel per array layout.
        return _as(x.detach(), dtype, x.device).expand(batch_shape + tail).reshape((n,) + tail).contiguous().numpy()

    plan = torch.empty(batch_shape + (n_rows, n_cols), dtype=dtype)
    f = torch.empty(batch_shape + (n_rows,), dtype=dtype)
    error = torch.empty(batch_shape, dtype=dtype)
    warm = f_init is not None
    most = _cpu_kernel()(flat(cost, (n_rows, n_cols)), float(eps), flat(a, (n_rows,)), flat(b, (n_cols,)),
                  flat(f_init, (n_rows,)) if warm else _NO_INIT[dtype], warm, int(max_iter), float(tol), bool(newton),
                  int(warmup), torch.finfo(dtype).tiny, _kernel_floor(dtype), LEVENBERG_MARQUARDT,
                  MAX_STEP, LOCAL_ERROR, _STEPS_NP, plan.view(n, n_rows, n_cols).numpy(), f.view(n, n_rows).numpy(),
                  error.view(n).numpy())

    def column_potential():
        log_kernel = _as(cost.detach(), dtype, cost.device) / -eps
        b_row = _as(b.detach(), dtype, cost.device).unsqueeze(-2)
        return eps * _column_potential(log_kernel, b_row, (f / eps).unsqueeze(-1)).squeeze(-2)

    return _result(cost, a, b, eps, max_iter, tol, plan, f, torch.tensor(most), error, differentiable, warn,
                   column_potential=column_potential)


def _as(x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``x`` in that dtype and on that device, without a call when it already is (these
    tiny solves are dispatch-bound: every operation saved counts)."""
    return x if x.dtype == dtype and x.device == device else x.to(device=device, dtype=dtype)


_STEPS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _line_search_steps(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """LINE_SEARCH_STEPS as a tensor, made once per dtype and device."""
    key = (dtype, device)
    if key not in _STEPS:
        _STEPS[key] = torch.tensor(LINE_SEARCH_STEPS, dtype=dtype, device=device)
    return _STEPS[key]


def _logsumexp(scores: torch.Tensor, dim: int) -> torch.Tensor:
    r"""Stabilised :math:`\operatorname{LSE}` over ``dim``, keeping ``dim`` as a singleton.

    The usual max shift makes every term at most :math:`e^0 = 1`. Shifted exponents are
    then clamped below at :math:`\log(\text{tiny}) + 1` of the dtype: a term that small
    (about 3e-38 in float32) is far below the rounding of a sum that is at least 1, so
    the value does not change, but the vectorised CPU ``exp`` takes a slow path (5-10x)
    for results that underflow to subnormals or zero, and with costs spread over many
    multiples of eps most of a row underflows (``torch.logsumexp`` has no such guard).
    Every slice must hold a finite value.
    """
    floor = math.log(torch.finfo(scores.dtype).tiny) + 1.0
    shift = scores.amax(dim=dim, keepdim=True)
    terms = (scores - shift).clamp_min_(floor).exp_()
    return terms.sum(dim=dim, keepdim=True).log_().add_(shift)


def _kernel_floor(dtype: torch.dtype) -> float:
    """phi of "State" (module docstring): 2^8 sqrt(tiny) of the dtype, 2.8e-17 in float32."""
    return 2.0**8 * math.sqrt(torch.finfo(dtype).tiny)


def _batched(x: torch.Tensor) -> torch.Tensor:
    """[..., m, n] -> [batch, m, n] (a view of a contiguous tensor) for ``torch.bmm``,
    which, unlike ``@`` on 4-d operands, takes a transposed view without copying it."""
    return x.reshape(-1, *x.shape[-2:])


class _Solver:
    """The torch loop: the iteration of the module docstring ("The iteration"; see there for
    every step and quantity), batched and without autograd. Its state, as tensors: u
    [..., K, 1], s (``soft``) and the plan [..., K, P], r [..., K, 1] and e [..., 1, 1].
    """

    def __init__(self, log_kernel, a, b, batch_shape):
        self.log_kernel, self.a, self.b = log_kernel, a, b
        self.log_a = a.log()  # -inf where a_k = 0 (no autograd here: no 0 * inf gradient)
        self.batch_shape = batch_shape
        finfo = torch.finfo(log_kernel.dtype)
        self.tiny = finfo.tiny  # floor of r in the Sinkhorn step (S)
        # phi of "State". Left alone, the tiny entries and their products become subnormal
        # numbers, on which x86 arithmetic is 10-50x slower (one bmm of this solver took 90 us
        # instead of 5); floored, a product of two entries and a column weight b_p stays
        # normal for P up to 6e4. The floor can only raise the line search's sums, which
        # keeps its test conservative.
        self.row_floor = torch.where(a > 0, _kernel_floor(log_kernel.dtype), 0.0)  # [..., K, 1]
        self.steps = _line_search_steps(log_kernel.dtype, log_kernel.device)
        self.j_const = None

    def evaluate(self, u):
        """The state at u ("State"): s and the plan [..., K, P], r [..., K, 1], e [..., 1, 1]."""
        soft = torch.maximum(torch.softmax(self.log_kernel + u, dim=-2), self.row_floor)
        plan = soft * self.b
        r = plan.sum(dim=-1, keepdim=True)
        error = torch.linalg.vector_norm(r - self.a, ord=1, dim=(-2, -1), keepdim=True)
        return soft, plan, r, error

    def sinkhorn_step(self, u, r):
        """The Sinkhorn step (S)."""
        return u + (self.log_a - r.clamp_min(self.tiny).log())

    def jacobian(self, soft, plan, r):
        """The matrix of the Newton direction (N1), J + mu diag(r) + 1 1^T / K^2 + D: [..., K, K]."""
        if self.j_const is None:
            padded = (self.a.squeeze(-1) == 0).to(soft.dtype).expand(soft.shape[:-1])
            self.j_const = torch.diag_embed(padded) + 1.0 / soft.shape[-2] ** 2
        jac = self.j_const - torch.bmm(_batched(soft), _batched(plan).mT).view(self.j_const.shape)
        jac.diagonal(dim1=-2, dim2=-1).add_(r.squeeze(-1), alpha=1.0 + LEVENBERG_MARQUARDT)
        return jac

    def newton_direction(self, soft, plan, r):
        """The Newton direction (N1), delta [..., K, 1]: NaN where the factorisation failed
        (``cholesky_ex`` leaves a finite, meaningless factor there), clamped to +-MAX_STEP."""
        factor, info = torch.linalg.cholesky_ex(self.jacobian(soft, plan, r))
        delta = torch.cholesky_solve(self.a - r, factor)
        return delta.masked_fill_((info != 0)[..., None, None], math.nan).clamp_(-MAX_STEP, MAX_STEP)

    def gains(self, soft, step):
        """G(d) of (N) [..., T, 1] for each column d of ``step`` [..., K, T]."""
        # sum_k soft_kp exp(d_k) is at least min_k exp(d_k) >= e^-50 (soft sums to at least 1
        # over k, d is clamped to +-MAX_STEP), a normal float32: its log needs no guard.
        mixed = torch.bmm(_batched(step.exp()).mT, _batched(soft))  # [..., T, P]
        spread = (mixed.log_().view(step.shape[:-2] + mixed.shape[-2:]) * self.b).sum(dim=-1, keepdim=True)
        return (self.a * step).sum(dim=-2, keepdim=True).mT - spread

    def newton_step(self, u, soft, r, delta, host_check: bool = False):
        """The line search (N3): the next u. ``host_check``: whether reading a value on the
        host is free (CPU), which lets the step skip computing the Sinkhorn fallback when no
        problem needs it."""
        gain = self.gains(soft, delta * self.steps)  # [..., T, 1], the candidates t delta
        best_gain, best = gain.max(dim=-2, keepdim=True)  # [..., 1, 1]; NaN if delta is
        newton = torch.addcmul(u, self.steps[best], delta)
        gained = best_gain > 0
        if host_check and bool(gained.all()):  # on CPU: skip the Sinkhorn steps nobody takes
            return newton
        return torch.where(gained, newton, self.sinkhorn_step(u, r))

    def run(self, u, max_iter, tol, newton, warmup, early_stop) -> "_State":
        """The loop ("Start", the iterations, "Stop", "Result")."""
        if u is None:  # the cold start: iteration 1
            u = self.log_a - _logsumexp(self.log_kernel, dim=-1)
            n_sinkhorn = max_iter if not newton else min(warmup, max_iter)
            n_steps = 1
        else:
            u = torch.where(self.a > 0, u, self.log_a)
            n_sinkhorn = 0 if newton else max_iter
            n_steps = 0
        u = u.expand(self.batch_shape + u.shape[-2:])
        soft, plan, r, error = self.evaluate(u)
        if early_stop:  # reading the error on the host: free on CPU, a sync elsewhere
            worst = float(error.amax())
            done = worst < tol
        else:  # iterations until the batch met tol, counted on the device
            done = error.amax() < tol
            iterations = torch.full((), n_steps, dtype=torch.long, device=u.device)
        while n_steps < max_iter and not (early_stop and done):
            n_steps += 1
            if n_steps <= n_sinkhorn:
                u = self.sinkhorn_step(u, r)  # (S)
            else:
                delta = self.newton_direction(soft, plan, r)  # (N1)
                if early_stop and worst < LOCAL_ERROR:  # (N2), gated on the batch's largest e
                    trial_u = u + delta
                    trial = self.evaluate(trial_u)
                    take = ((trial[3] < error) & (self.gains(soft, delta) > 0)) | (trial[3] < tol)
                    if bool(take.all()):
                        u = trial_u
                        soft, plan, r, error = trial
                        worst = float(error.amax())
                        done = worst < tol
                        continue
                    u = torch.where(take, trial_u, self.newton_step(u, soft, r, delta, early_stop))  # (N3)
                else:
                    u = self.newton_step(u, soft, r, delta, early_stop)  # (N3)
            soft, plan, r, error = self.evaluate(u)
            if early_stop:
                worst = float(error.amax())
                done = worst < tol
            else:
                iterations = iterations + (~done).long()
                done = done | (error.amax() < tol)
        if early_stop:
            iterations = torch.full((), n_steps, dtype=torch.long, device=u.device)
        col_error = torch.linalg.vector_norm(plan.sum(dim=-2, keepdim=True) - self.b, ord=1, dim=(-2, -1))
        return _State(plan, u, iterations, error.view(error.shape[:-2]) + col_error)

    def column_potential(self, u):
        return _column_potential(self.log_kernel, self.b, u)


def _column_potential(log_kernel, b_row, u):
    """v = log b - LSE_k(log_kernel + u), [..., 1, P]; -inf where b_p = 0 (the exact column
    projection for the row potential u, shared by the torch and the compiled loop's results)."""
    return torch.log(b_row) - _logsumexp(log_kernel + u, dim=-2)


@dataclass(frozen=True)
class _State:
    plan: torch.Tensor
    u: torch.Tensor
    iterations: torch.Tensor
    marginal_error: torch.Tensor


class _ImplicitPlan(torch.autograd.Function):
    r"""The optimal plan as a function of (cost, a, b), differentiated implicitly.

    Differentiating the optimality conditions :math:`\pi = \exp((f \oplus g - C)/\varepsilon)`,
    :math:`\pi 1 = a`, :math:`\pi^T 1 = b` gives, for an upstream gradient G and
    :math:`\hat G = G \odot \pi`, the adjoint system

    .. math::
        \begin{pmatrix} \operatorname{diag}(r) & \pi \\ \pi^T & \operatorname{diag}(c) \end{pmatrix}
        \begin{pmatrix} x \\ y \end{pmatrix} =
        \frac{1}{\varepsilon} \begin{pmatrix} \hat G 1 \\ \hat G^T 1 \end{pmatrix}

    (r, c the plan's row and column sums; the matrix is the dual Hessian, singular
    along (1, -1), which the right-hand side is orthogonal to), and then
    :math:`\partial L / \partial C = \pi \odot (x \oplus y) - \hat G / \varepsilon`,
    :math:`\partial L / \partial a = \varepsilon x`, :math:`\partial L / \partial b =
    \varepsilon y` [7]_ [8]_. Eliminating y leaves the K x K Schur complement
    :math:`J = \operatorname{diag}(r) - \pi \operatorname{diag}(c)^{-1} \pi^T` of the
    Newton steps. It is solved with its pseudo-inverse (an eigendecomposition of the
    symmetric K x K matrix), which picks the solution with :math:`\sum_k x_k = 0`: when the
    plan is (numerically) a union of independent blocks, as at a tiny eps, J has one null
    vector per block, and every solution gives the same gradient of the cost.

    Memory: the plan, saved once (it is the output), whatever the iteration count.
    """

    @staticmethod
    def forward(ctx, cost, a, b, plan, eps):
        out = plan.clone()
        ctx.save_for_backward(out)
        ctx.eps = eps
        ctx.shapes = (cost.shape, a.shape, b.shape)
        ctx.dtypes = (cost.dtype, a.dtype, b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_plan):
        (plan,) = ctx.saved_tensors
        eps = ctx.eps
        weighted = grad_plan * plan  # G ⊙ π
        rows = plan.sum(dim=-1, keepdim=True)  # [..., K, 1]
        cols = plan.sum(dim=-2, keepdim=True)  # [..., 1, P]
        live_cols = cols > 0
        safe_cols = torch.where(live_cols, cols, torch.ones_like(cols))
        soft = plan / safe_cols  # π diag(c)^-1
        rhs_rows = weighted.sum(dim=-1, keepdim=True) / eps
        rhs_cols = weighted.sum(dim=-2, keepdim=True) / eps
        jac = torch.diag_embed(rows.squeeze(-1)) - soft @ plan.mT
        x = _psd_solve(jac, rhs_rows - soft @ rhs_cols.mT)  # [..., K, 1]
        y = torch.where(live_cols, (rhs_cols - x.mT @ plan) / safe_cols, 0.0)  # [..., 1, P]
        grads = []
        shapes, dtypes = ctx.shapes, ctx.dtypes
        if ctx.needs_input_grad[0]:
            grad_cost = plan * (x + y) - weighted / eps
            grads.append(grad_cost.sum_to_size(shapes[0]).to(dtypes[0]))
        else:
            grads.append(None)
        if ctx.needs_input_grad[1]:
            grads.append((eps * x.squeeze(-1)).sum_to_size(shapes[1]).to(dtypes[1]))
        else:
            grads.append(None)
        if ctx.needs_input_grad[2]:
            grads.append((eps * y.squeeze(-2)).sum_to_size(shapes[2]).to(dtypes[2]))
        else:
            grads.append(None)
        return (*grads, None, None)


def _psd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Minimum-norm solution of ``matrix x = rhs`` for symmetric positive semi-definite
    [..., K, K] matrices: eigenvalues below K eps of the largest count as zero."""
    values, vectors = torch.linalg.eigh(matrix)
    cutoff = values.amax(dim=-1, keepdim=True) * (matrix.shape[-1] * torch.finfo(matrix.dtype).eps)
    inverse = torch.where(values > cutoff, 1.0 / values, 0.0)
    return vectors @ (inverse.unsqueeze(-1) * (vectors.mT @ rhs))


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
