"""The Newton solver of :mod:`pact_ray.ot.sinkhorn` as one compiled CPU kernel (numba).

Why by hand: the router's problems are tiny ([objects x heads] problems of K <= 8 parts
by P <= 1370 patches) and an iteration of the torch loop is about 25 operations of 2-5 us
on [2, 4, 4, 64] tensors, so on a CPU the solve is dispatch-bound: 0.9 ms for a first
solve, almost none of it arithmetic. Neither torch nor POT has a fused kernel for this
loop (POT's batched solver is plain Sinkhorn, one call per operation), and
``torch.compile`` would compile in every trial process. Compiled once by numba (cached on
disk; ``make install`` compiles it) the same solve takes 0.3 ms with its call, 0.15 ms of
it the loop; a process pays about 0.8 s once to import numba and load the kernel.

The loop is the iteration stated once in :mod:`pact_ray.ot.sinkhorn`'s module docstring
("The iteration": every quantity, step, tolerance and the stopping rule, and how this loop
differs from the torch one: it decides per problem and computes in float64). The step
labels in the comments here, (S) and (N1)-(N3), are that statement's. This module imports
nothing of the package: :mod:`pact_ray.ot.sinkhorn` calls it, and
:mod:`pact_ray.ot.preload` compiles it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# The solver's constants (tolerances, step lengths, floors) are passed in: numba freezes
# globals at compile time, and passing them keeps their one definition in pact_ray.ot.sinkhorn.
# The kernel does not import that module (which calls it): the dependency runs one way.


@njit(cache=True, nogil=True, error_model="numpy")
def _evaluate(cost, scale, u, b, row_floor, soft, rows):
    """The state at u ("State"): s into ``soft`` [K, P] and r into ``rows`` [K]
    (scale = -1/eps, so that scale * cost is the log kernel; row_floor is phi)."""
    n_rows, n_cols = cost.shape
    for k in range(n_rows):
        rows[k] = 0.0
    for p in range(n_cols):
        top = -np.inf
        for k in range(n_rows):
            s = scale * cost[k, p] + u[k]
            if s > top:
                top = s
        total = 0.0
        for k in range(n_rows):
            e = math.exp(scale * cost[k, p] + u[k] - top) if u[k] > -np.inf else 0.0
            soft[k, p] = e
            total += e
        inverse = 1.0 / total
        for k in range(n_rows):
            v = soft[k, p] * inverse
            if v < row_floor[k]:
                v = row_floor[k]
            soft[k, p] = v
            rows[k] += v * b[p]


@njit(cache=True, nogil=True, error_model="numpy")
def _row_error(rows, a):
    """e = ||r - a||_1."""
    err = 0.0
    for k in range(a.shape[0]):
        err += abs(rows[k] - a[k])
    return err


@njit(cache=True, nogil=True, error_model="numpy")
def _newton_direction(soft, b, rows, a, levenberg, max_step, jac, delta):
    """The Newton direction (N1) into ``delta`` [K] (``jac``: workspace for the factor)."""
    n_rows, n_cols = soft.shape
    const = 1.0 / (n_rows * n_rows)
    for i in range(n_rows):
        for j in range(i + 1):
            acc = 0.0
            for p in range(n_cols):
                acc += soft[i, p] * soft[j, p] * b[p]
            value = const - acc
            if i == j:
                value += rows[i] * (1.0 + levenberg)
                if a[i] == 0.0:
                    value += 1.0
            jac[i, j] = value
    # In-place Cholesky (lower triangle).
    for j in range(n_rows):
        d = jac[j, j]
        for m in range(j):
            d -= jac[j, m] * jac[j, m]
        if not d > 0.0:
            for k in range(n_rows):
                delta[k] = np.nan
            return
        d = math.sqrt(d)
        jac[j, j] = d
        for i in range(j + 1, n_rows):
            s = jac[i, j]
            for m in range(j):
                s -= jac[i, m] * jac[j, m]
            jac[i, j] = s / d
    for i in range(n_rows):  # forward: L y = a - r
        s = a[i] - rows[i]
        for m in range(i):
            s -= jac[i, m] * delta[m]
        delta[i] = s / jac[i, i]
    for i in range(n_rows - 1, -1, -1):  # backward: L^T x = y
        s = delta[i]
        for m in range(i + 1, n_rows):
            s -= jac[m, i] * delta[m]
        delta[i] = s / jac[i, i]
    for i in range(n_rows):  # clamped once solved (the back substitution reads the unclamped values)
        delta[i] = min(max(delta[i], -max_step), max_step)


@njit(cache=True, nogil=True, error_model="numpy")
def _line_search(soft, a, b, delta, steps, gains):
    """The line search's choice (N3): the length t of ``steps`` whose G(t delta) is largest,
    and that gain (``gains``: workspace)."""
    n_rows, n_cols = soft.shape
    best, best_gain = 0, -np.inf
    for t in range(steps.shape[0]):
        linear = 0.0
        for k in range(n_rows):
            gains[k] = math.exp(steps[t] * delta[k])
            linear += a[k] * steps[t] * delta[k]
        spread = 0.0
        for p in range(n_cols):
            mixed = 0.0
            for k in range(n_rows):
                mixed += soft[k, p] * gains[k]
            spread += b[p] * math.log(mixed)
        gain = linear - spread
        if gain > best_gain:  # NaN never is
            best, best_gain = t, gain
    return steps[best], best_gain


@njit(cache=True, nogil=True, error_model="numpy")
def solve_batch(cost, eps, a, b, f_init, warm, max_iter, tol, newton, warmup, tiny, floor, levenberg, max_step,
                local_error, steps, plan_out, f_out, error_out):
    """The compiled loop: the iteration of :mod:`pact_ray.ot.sinkhorn`'s module docstring
    (see there), run on every problem of ``cost`` [n, K, P] on its own (``a`` [n, K], ``b``
    [n, P], ``f_init`` [n, K] read when ``warm``). Writes each problem's plan, f (cost units)
    and marginal error ("Result"), and returns the most iterations a problem took."""
    n, n_rows, n_cols = cost.shape
    scale = -1.0 / eps
    soft = np.empty((n_rows, n_cols))
    trial_soft = np.empty((n_rows, n_cols))
    rows = np.empty(n_rows)
    trial_rows = np.empty(n_rows)
    u = np.empty(n_rows)
    trial_u = np.empty(n_rows)
    delta = np.empty(n_rows)
    gains = np.empty(n_rows)
    full = np.ones(1)  # the full Newton step, as a one-candidate line search
    jac = np.empty((n_rows, n_rows))
    row_floor = np.empty(n_rows)
    log_a = np.empty(n_rows)
    most = 0
    for i in range(n):
        ci, ai, bi = cost[i], a[i], b[i]
        for k in range(n_rows):
            row_floor[k] = floor if ai[k] > 0 else 0.0
            log_a[k] = math.log(ai[k]) if ai[k] > 0 else -np.inf
        if warm:
            for k in range(n_rows):
                u[k] = f_init[i, k] / eps if ai[k] > 0 else -np.inf
            n_sinkhorn, steps_done = (0 if newton else max_iter), 0
        else:  # the cold start: iteration 1
            lowest = math.log(tiny) + 1.0
            for k in range(n_rows):
                top = -np.inf
                for p in range(n_cols):
                    top = max(top, scale * ci[k, p])
                total = 0.0
                for p in range(n_cols):
                    total += math.exp(max(scale * ci[k, p] - top, lowest))
                u[k] = log_a[k] - (math.log(total) + top)
            n_sinkhorn, steps_done = (min(warmup, max_iter) if newton else max_iter), 1
        _evaluate(ci, scale, u, bi, row_floor, soft, rows)
        error = _row_error(rows, ai)
        while steps_done < max_iter and not error < tol:
            steps_done += 1
            if steps_done <= n_sinkhorn:  # (S)
                for k in range(n_rows):
                    u[k] += log_a[k] - math.log(max(rows[k], tiny))
                _evaluate(ci, scale, u, bi, row_floor, soft, rows)
                error = _row_error(rows, ai)
                continue
            _newton_direction(soft, bi, rows, ai, levenberg, max_step, jac, delta)  # (N1)
            if error < local_error:  # (N2)
                for k in range(n_rows):
                    trial_u[k] = u[k] + delta[k]
                _evaluate(ci, scale, trial_u, bi, row_floor, trial_soft, trial_rows)
                trial_error = _row_error(trial_rows, ai)
                if (trial_error < error and _line_search(soft, ai, bi, delta, full, gains)[1] > 0.0) or trial_error < tol:
                    u, trial_u = trial_u, u
                    soft, trial_soft = trial_soft, soft
                    rows, trial_rows = trial_rows, rows
                    error = trial_error
                    continue
            length, gain = _line_search(soft, ai, bi, delta, steps, gains)  # (N3)
            if gain > 0.0:
                for k in range(n_rows):
                    u[k] += length * delta[k]
            else:  # (S)
                for k in range(n_rows):
                    u[k] += log_a[k] - math.log(max(rows[k], tiny))
            _evaluate(ci, scale, u, bi, row_floor, soft, rows)
            error = _row_error(rows, ai)
        column_error = 0.0
        for p in range(n_cols):
            mass = 0.0
            for k in range(n_rows):
                plan_out[i, k, p] = soft[k, p] * bi[p]
                mass += plan_out[i, k, p]
            column_error += abs(mass - bi[p])
        row_error = 0.0
        for k in range(n_rows):
            f_out[i, k] = u[k] * eps
            mass = 0.0
            for p in range(n_cols):
                mass += plan_out[i, k, p]
            row_error += abs(mass - ai[k])
        error_out[i] = row_error + column_error
        most = max(most, steps_done)
    return most

