"""Every use of Ray's private internals, behind one door.

pact-ray uses Ray through its public API (``ray.init``, ``ray.tune``) everywhere else. What
is here reaches further, and is written for one Ray version (:data:`WRITTEN_FOR`): it is used
only there. On any other Ray, where the internals are not what the code expects, or with
``PACT_RAY_FAST_START=0``, the sweep falls back to Ray's public behaviour.

``callbacks``
    ``Tuner.restore`` brings back the first command's RunConfig, callbacks included (an
    unpickled copy of the MLflow callback rather than the one the driver flushes and checks,
    and the first command's --quiet); Ray has no public setter, so this command's callbacks
    and verbosity are put into the restored tuner. Without it a resume runs with the first
    command's callbacks and says so.

:func:`import_shared_modules` imports two of Ray's modules by their names before the driver's
preparation thread imports Ray Tune while the main thread starts Ray (see
:mod:`pact_ray.tune.prepare`); a Ray without them is simply not helped.

Speed shortcuts that used to live here (workers booted and preloaded while Ray starts, with
Tune's trial environment emptied so that the trials ran in them; the autoscaler's monitor
killed before ``ray.shutdown``) were measured on the quick matrix, side by side, and none
saved time (bench/README.md): they are gone.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

WRITTEN_FOR = "2.60."  # the Ray release whose internals this module knows
ENV = "PACT_RAY_FAST_START"
TRICKS = ("callbacks",)

# Modules that both ray.init and Ray Tune import (Ray 2.60; tests/test_sweep_startup.py
# measures it). The driver imports them before its preparation thread starts (3 ms), so that
# the two threads never import the same module at once (pact_ray.tune.prepare).
IMPORTED_BY_BOTH = ("ray._common.usage.usage_lib", "ray.dashboard")


def ray_version() -> str:
    import ray

    return ray.__version__


def enabled(trick: str) -> bool:
    """Whether ``trick`` is used: on the Ray version it was written for, unless the
    environment turns it off (``PACT_RAY_FAST_START=0``, or a comma list of those kept)."""
    assert trick in TRICKS, trick
    setting = os.environ.get(ENV, "1").strip().lower()
    if setting in ("0", "off", "false", "no", "none", ""):
        return False
    if setting not in ("1", "on", "true", "yes", "all") and trick not in {t.strip() for t in setting.split(",")}:
        return False
    return ray_version().startswith(WRITTEN_FOR)


def _failed(trick: str, error: BaseException) -> None:
    warnings.warn(f"pact-ray's '{trick}' use of Ray's internals did not fit Ray {ray_version()} "
                  f"({type(error).__name__}: {error}); using Ray's public behaviour", RuntimeWarning, stacklevel=3)


def import_shared_modules() -> None:
    """Import :data:`IMPORTED_BY_BOTH` (those this Ray has) before a second thread imports Ray Tune."""
    with contextlib.suppress(ImportError):
        import ray._common.usage.usage_lib  # noqa: F401
    with contextlib.suppress(ImportError):
        import ray.dashboard  # noqa: F401


def set_restored_callbacks(tuner: Any, callbacks: list, verbose: int) -> bool:
    """Give a tuner from ``Tuner.restore`` this command's callbacks and verbosity; False where
    it cannot (the resume then keeps the first command's, see the module docstring)."""
    if enabled("callbacks"):
        try:
            run_config = tuner._local_tuner.get_run_config()
            run_config.callbacks = callbacks
            run_config.verbose = verbose
            return True
        except Exception as e:  # noqa: BLE001 - any change of Ray's internals falls back
            _failed("callbacks", e)
    return False
