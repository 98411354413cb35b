"""Importing this module loads the CPU kernel of :mod:`pact_ray.ot.cpu_solver` from numba's
on-disk cache (0.6 s, paid once per process at its first solve otherwise).

A sweep's own local Ray imports it in each worker as the worker boots (Ray's
``preload_python_modules``, see ``pact_ray.tune.sweep._worker_preload``), while the driver is
still starting, so that a trial's first step does not pay it. A failure here only costs that
time back: Ray logs it and the worker goes on.
"""

from pact_ray.ot.cpu_solver import warm_up

warm_up()
