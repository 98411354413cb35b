"""Ctrl-C that a sweep survives: the trials stop at their next step with a checkpoint, the
sweep exits with 130 and says how to resume.

Ray Tune's own SIGINT handler stops the experiment by killing the trials, which loses what
they trained since their last checkpoint (the quick profiles checkpoint only at the end). We
turn it off (``TUNE_DISABLE_SIGINT_HANDLER``) and install ours in the driver instead: the
first Ctrl-C (or SIGTERM) raises the sweep's flag, which every trial reads after each step; a
trial that sees it writes a checkpoint and ends with :class:`SweepInterrupted`, and trials
that had not started end at once. Tune then finishes on its own, and ``--resume`` continues
every trial from its checkpoint. A second Ctrl-C stops at once, as Ray would.

The flag is a named actor of the sweep that exists only once raised: a trial reads it with
``ray.get_actor`` (one lookup in Ray's control store, about a millisecond). Made up front, it
would take a worker process of its own for the whole sweep, and that process would start
(and import what the trials import) just while the first trials do.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import ray
from ray import tune

from pact_ray.errors import SweepInterrupted, error_line, is_interruption  # noqa: F401 - the trials' and progress lines' names

FLAG_PREFIX = "pact_ray_stop:"


@ray.remote(num_cpus=0)
class StopFlag:
    """The raised flag of one sweep: its existence, under the sweep's name, is the request."""

    def raised(self) -> bool:
        return True


def flag_name(sweep: str) -> str:
    return FLAG_PREFIX + sweep


class TrialStop:
    """The trial side: ``requested()`` is True once the sweep asked its trials to stop."""

    def __init__(self, sweep: str | None):
        self._name = flag_name(sweep) if sweep else None  # None: outside a pact-ray sweep driver
        self._seen = False

    def requested(self) -> bool:
        if self._name is None or self._seen:
            return self._seen
        try:
            self._seen = _raised_flag(self._name) is not None
        except Exception:  # noqa: BLE001 - a driver that went away is not an interruption request
            return False
        return self._seen


GRACE_S = float(os.environ.get("PACT_RAY_GRACE_S", "25"))  # SIGTERM -> exit: the trials' checkpoints, then a hard stop


class DriverInterrupts:
    """The driver side, as a context manager around ``Tuner.fit``: SIGINT and SIGTERM raise
    the sweep's flag the first time and stop at once the second time.

    A SIGTERM is a scheduler's preemption notice (SLURM's --signal, Kubernetes' termination
    grace period), which a SIGKILL follows: if the trials have not all stopped ``grace_s``
    after it, the driver stops at once as after a second signal (what the trials had
    checkpointed stays; ``--resume`` continues from there)."""

    def __init__(self, sweep: str, out: Any = None, grace_s: float | None = None):
        self.sweep = sweep
        self.out = out or sys.stderr
        self.requested = False
        self.signal: int | None = None  # the first signal received
        self.grace_s = GRACE_S if grace_s is None else grace_s
        self._flag = None
        self._timer = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "DriverInterrupts":
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours, not Ray's
        _clear_stale_flag(flag_name(self.sweep))
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second time: stop now
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signum
        if signum == signal.SIGTERM:
            import _thread
            import threading

            self._timer = threading.Timer(self.grace_s, _thread.interrupt_main)
            self._timer.daemon = True
            self._timer.start()
        self._flag = StopFlag.options(name=flag_name(self.sweep), get_if_exists=True, lifetime="non_detached").remote()
        if signum == signal.SIGTERM:
            print(f"\nSIGTERM: each trial saves a checkpoint after its current step; stopping at once in "
                  f"{self.grace_s:.0f} s otherwise (PACT_RAY_GRACE_S).", file=self.out, flush=True)
        else:
            print("\nStopping: each trial saves a checkpoint after its current step (Ctrl-C again to stop at once).",
                  file=self.out, flush=True)

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._flag is not None:
            try:
                # Waits until the name is free again: a start that follows in this process
                # (a resume) must not find this flag, dying but still registered, raised.
                _remove_flag(self._flag, flag_name(self.sweep))
            except Exception:  # noqa: BLE001 - Ray may already be shutting down
                pass


class RetryOnlyFailures(tune.Callback):
    """A Tune callback: a trial that ended because the sweep was interrupted is not retried,
    and the stop does not count against its retries.

    Tune retries every failed trial up to ``max_failures`` times. A trial that sees the raised
    flag checkpoints and ends with :class:`SweepInterrupted`, and a pending one ends at once, so
    each retry started a worker process only to stop again: Ctrl-C took 40 s to end the quick
    matrix (every trial failed three times, measured on 2 cores). Those failures also stayed in
    the trial's count, which a resume keeps, leaving it no retry for a real failure. Once the
    flag is raised no trial is retried; each stop is taken back from the count; and the first
    step of a (resumed) sweep gives every trial its ``max_failures`` again."""

    def __init__(self, interrupts: "DriverInterrupts", max_failures: int):
        self.interrupts = interrupts
        self.max_failures = max_failures
        self._set = False

    def __getstate__(self):  # Tune pickles its callbacks with the experiment; a resume installs its own
        return {**self.__dict__, "interrupts": None}

    def on_step_begin(self, iteration, trials, **info):
        if self.interrupts is not None and self.interrupts.requested:
            for trial in trials:  # Trial.should_recover: num_failures <= max_failures
                trial.max_failures = 0
        elif not self._set:  # an interrupted sweep's state keeps the 0 set above
            for trial in trials:
                trial.max_failures = self.max_failures
            self._set = True

    def on_trial_error(self, iteration, trials, trial, **info):
        if is_interruption(error_line(trial)):
            trial.run_metadata.num_failures = max(0, trial.run_metadata.num_failures - 1)


def _raised_flag(name: str):
    """The handle of the sweep's raised flag, or None while it is not raised."""
    try:
        return ray.get_actor(name)
    except ValueError:
        return None


def _clear_stale_flag(name: str, timeout_s: float = 10.0) -> None:
    """Remove a raised flag left under this sweep's name (an interrupted start of the same
    sweep on a Ray instance that outlived it), so that the resumed trials do not stop at once."""
    stale = _raised_flag(name)
    if stale is not None:
        _remove_flag(stale, name, timeout_s)


def _remove_flag(handle, name: str, timeout_s: float = 10.0) -> None:
    """Kill the flag and wait (at most ``timeout_s``) until its name is released: Ray
    releases the name of a killed actor asynchronously."""
    ray.kill(handle)
    deadline = time.monotonic() + timeout_s
    while _raised_flag(name) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
