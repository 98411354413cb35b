"""The errors a user can cause, and the one line that tells them.

Every error a user can fix (a bad flag, config value, path, data file or checkpoint) is a
:class:`ValueError` whose message is one sentence; the command-line entry points
(:mod:`pact_ray.cli`) print its first line as ``error: ...`` and exit with status 2. The
subsystems keep their own subclasses where they raise them (``CheckpointError`` in
``pact_ray.models.checkpoint``, ``TrackingError`` in ``pact_ray.tracking.store``,
``SweepError`` in ``pact_ray.tune``); the configuration error, which every layer raises, and
the data error, which both data families (``pact_ray.data.objects``, ``pact_ray.data.arm``)
raise, live here.
"""

from __future__ import annotations

import os


class ConfigError(ValueError):
    """A run configuration value that cannot be used (one-sentence message)."""


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


class SweepInterrupted(RuntimeError):
    """Raised by a trial that stopped because the sweep was interrupted (its progress is checkpointed)."""


def is_interruption(error: str) -> bool:
    """Whether a trial's error line (:func:`pact_ray.errors.error_line`) is the sweep's own
    interruption, which ``--resume`` continues, rather than a failure."""
    return SweepInterrupted.__name__ in error


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an error's message (its type name when the message is empty),
    cut to ``limit`` characters when given."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line[:limit] if limit else line


def error_line(trial) -> str:
    """The last line of a Ray Tune trial's error (what the summary shows): from its
    ``error_file`` when that exists, else its ``error_msg``."""
    path = getattr(trial, "error_file", None)
    text = ""
    if path and os.path.isfile(path):
        with open(path) as f:
            text = f.read()
    elif getattr(trial, "error_msg", None):
        text = trial.error_msg
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "unknown error"
