"""Command-line plumbing every entry point shares: one-sentence errors with exit status 2,
typed flag values, and the guard that turns a user's error into that one line."""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from pact_ray.errors import first_line

EXIT_USAGE = 2  # a user error: bad flag, value, path, data file or checkpoint
ROOT = Path(__file__).resolve().parents[1]  # the project folder (sweeps/, analysis/)


# ------------------------------------------------ commands printed for the user to run
# Every command the tool prints runs as printed, from the project folder, in a fresh shell
# with no virtualenv on PATH: the running interpreter and the console scripts beside it are
# named by absolute path, and every word is shell-quoted.

def venv_executable(name: str) -> str:
    """The absolute path of ``name`` (``mlflow``, ``optuna-dashboard``) in the running
    interpreter's bin folder (the virtualenv's), or ``name`` where there is none. The folder
    of ``sys.executable`` as invoked, not its resolved target (a venv's python is a link)."""
    path = Path(sys.executable).absolute().parent / name
    return str(path) if path.exists() else name


def python_executable() -> str:
    """The running interpreter by absolute path (a venv's own ``bin/python``, unresolved)."""
    return str(Path(sys.executable).absolute())


def project_path(relative: str) -> str:
    """A file of the project (``sweeps/stage1_router.py``) as a command names it: relative
    when the command runs in the project folder, absolute from anywhere else."""
    return relative if Path.cwd().resolve() == ROOT else str(ROOT / relative)


def project_command(script: str, *args: str) -> str:
    """``<venv>/bin/python <script> args...``, shell-quoted: a script of the project run by
    the interpreter that runs now (``script`` relative to the project folder)."""
    return shell_join([python_executable(), project_path(script), *args])


def shell_join(words: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def free_port(preferred: int, host: str = "127.0.0.1", tries: int = 100) -> int:
    """``preferred`` when nothing listens on it on ``host``, else the next free port above it
    (so a printed server command starts as printed)."""
    for port in range(preferred, preferred + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    return preferred


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with each default said once: appended as "(default: X)" where the help text does
    not already say it and the default is a value (not None, False or empty); the
    description and the examples (epilog) keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        # 0 and 0.0 are values to show (``0 in (False,)`` would hide them).
        unset = default is None or default is False or default is argparse.SUPPRESS or (isinstance(default, (str, list)) and not default)
        if "%(default)" in text or "default" in text.lower() or unset:
            return text
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one sentence (no usage dump) and exits with 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def user_errors(run: Callable[[], int], *extra: type[BaseException]) -> int:
    """``run()``'s exit status; a user error (a ValueError such as ConfigError, DataError,
    CheckpointError, TrackingError or SweepError, a missing or unreadable file, or one of
    ``extra``) prints ``error: <first line>`` on stderr and gives :data:`EXIT_USAGE`."""
    try:
        return run()
    except (ValueError, FileNotFoundError, PermissionError, *extra) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return EXIT_USAGE


def _number(kind: type, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def nonneg_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def nonneg_float(text: str) -> float:
    value = _number(float, text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def exit_now(code: int) -> NoReturn:
    """End a finished command at once: streams and log handlers are flushed, then the process
    exits without the interpreter's teardown of torch, Ray and MLflow (about 2 s on 2 cores,
    measured after a sweep). Only for a command's own process, once everything it wrote is
    closed; never for code that runs inside someone else's (tests, notebooks)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say on it
            pass
    os._exit(code)
