"""Importing this module loads the CPU kernel of :mod:`pact_ray.ot.cpu_solver` from numba's
on-disk cache (0.6 s, paid once per process at its first solve otherwise); run as a script
(``make install``), it compiles the kernel into that cache.

``make install`` runs it once, so that no sweep or test pays the first compilation.
"""

import torch

from pact_ray.ot.sinkhorn import sinkhorn_log


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) the kernel for float32 and float64
    problems, cold and warm-started, through the solver's own call, so that the argument
    types are those of every later solve: no sweep or test then pays the first compilation
    (about 4 s) in a trial."""
    for dtype in (torch.float32, torch.float64):
        cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=dtype)
        half = torch.full((2,), 0.5, dtype=dtype)
        first = sinkhorn_log(cost, half, half, compiled=True)
        sinkhorn_log(cost, half, half, f_init=first.f, compiled=True)


warm_up()
