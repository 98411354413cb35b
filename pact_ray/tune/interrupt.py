"""Ctrl-C that a sweep survives: the trials stop at their next step with a checkpoint, the
sweep exits with 130 and says how to resume.

Ray Tune's own SIGINT handler stops the experiment by killing the trials, which loses what
they trained since their last checkpoint (the quick profiles checkpoint only at the end). We
turn it off (``TUNE_DISABLE_SIGINT_HANDLER``) and install ours in the driver instead: the
first Ctrl-C (or SIGTERM) raises a flag that every trial reads after each step (a named actor
of the sweep, a call of about a millisecond); a trial that sees it writes a checkpoint and
ends with :class:`SweepInterrupted`, and trials that had not started end at once. Tune then
finishes on its own, and ``--resume`` continues every trial from its checkpoint. A second
Ctrl-C stops at once, as Ray would.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import ray

FLAG_PREFIX = "pact_ray_stop:"


class SweepInterrupted(RuntimeError):
    """Raised by a trial that stopped because the sweep was interrupted (its progress is checkpointed)."""


@ray.remote(num_cpus=0)
class StopFlag:
    """One per running sweep, named after it: raised once by the driver, read by the trials."""

    def __init__(self) -> None:
        self.raised = False

    def raise_flag(self) -> None:
        self.raised = True

    def is_raised(self) -> bool:
        return self.raised


def flag_name(sweep: str) -> str:
    return FLAG_PREFIX + sweep


class TrialStop:
    """The trial side: ``requested()`` is True once the sweep asked its trials to stop."""

    def __init__(self, sweep: str | None):
        self._flag = None
        if sweep:
            try:
                self._flag = ray.get_actor(flag_name(sweep))
            except ValueError:  # no flag: the trial runs outside a pact-ray sweep driver
                self._flag = None

    def requested(self) -> bool:
        if self._flag is None:
            return False
        try:
            return bool(ray.get(self._flag.is_raised.remote(), timeout=10))
        except Exception:  # noqa: BLE001 - a driver that went away is not an interruption request
            return False


class DriverInterrupts:
    """The driver side, as a context manager around ``Tuner.fit``: SIGINT and SIGTERM raise
    the sweep's flag the first time and stop at once the second time."""

    def __init__(self, sweep: str, out: Any = None):
        self.sweep = sweep
        self.out = out or sys.stderr
        self.requested = False
        self._flag = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "DriverInterrupts":
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours, not Ray's
        self._flag = StopFlag.options(name=flag_name(self.sweep), get_if_exists=True, lifetime="non_detached").remote()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second time: stop now
            raise KeyboardInterrupt
        self.requested = True
        self._flag.raise_flag.remote()
        print("\nStopping: each trial saves a checkpoint after its current step (Ctrl-C again to stop at once).",
              file=self.out, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._flag is not None:
            try:
                ray.kill(self._flag)
            except Exception:  # noqa: BLE001 - Ray may already be shutting down
                pass
