"""Ray Tune's experiment state, kept restorable whatever interrupts a sweep.

Ray keeps a sweep's state in its experiment folder: ``tuner.pkl`` (written at start),
``experiment_state-<session>.json`` (the trials and their checkpoints, rewritten as the
sweep runs) and the search algorithm's ``*-state-<session>.json`` / ``.pkl``. A driver killed
while Ray writes them, or a full disk, leaves them missing or truncated, and Ray's restore
then fails (a TypeError or an EOFError). So:

- :class:`StateBackup` copies every readable state file to ``.pact_ray_state/`` beside them
  (at most every ``interval_s`` and at the end of the run), each copy written beside and
  renamed into place, so a full disk never spoils the last good one;
- :func:`repair` puts a good copy back over a missing or unreadable file before a resume,
  or moves an unreadable file aside when there is no copy (Ray then reads an older session's);
- :func:`restorable` says whether what is left can be restored at all; when it cannot (the
  sweep was killed before Ray wrote its state), the harness starts the sweep's trials again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from ray import tune

log = logging.getLogger(__name__)

BACKUP_DIR = ".pact_ray_state"
PATTERNS = ("tuner.pkl", "experiment_state-*.json", "*-state-*.json", "searcher-state-*.pkl")


def state_files(exp_dir: Path) -> list[Path]:
    found = {p for pattern in PATTERNS for p in exp_dir.glob(pattern) if p.is_file()}
    return sorted(found)


def readable(path: Path) -> bool:
    """Whether a state file can be read back whole: ``experiment_state-*.json`` parsed as
    JSON, the others loaded with cloudpickle (Ray pickles the search algorithms' state,
    ``basic-variant-state-*.json`` included, whatever the suffix says)."""
    try:
        if path.name.startswith("experiment_state-"):
            json.loads(path.read_text())
        else:
            from ray import cloudpickle

            with open(path, "rb") as f:
                cloudpickle.load(f)
        return True
    except Exception:  # noqa: BLE001 - truncated, empty or otherwise unreadable
        return False


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def backup(exp_dir: Path) -> int:
    """Copy the readable, changed state files into the backup folder; returns how many."""
    target = exp_dir / BACKUP_DIR
    copied = 0
    for path in state_files(exp_dir):
        dst = target / path.name
        stat = path.stat()
        if dst.is_file() and dst.stat().st_size == stat.st_size and dst.stat().st_mtime >= stat.st_mtime:
            continue
        if not readable(path):
            continue
        try:
            target.mkdir(exist_ok=True)
            _copy_atomic(path, dst)
            copied += 1
        except OSError as e:  # a full disk: the previous copy stays as it was
            log.warning("could not back up %s (%s)", path.name, e.strerror)
    return copied


def repair(exp_dir: Path) -> list[str]:
    """Make the state files readable again from their copies; returns what was done."""
    done = []
    saved = exp_dir / BACKUP_DIR
    names = {p.name for p in state_files(exp_dir)} | ({p.name for p in saved.iterdir() if p.is_file() and not p.name.startswith(".")}
                                                     if saved.is_dir() else set())
    for error_file in exp_dir.glob("*/error.pkl"):  # a trial's pickled error, truncated by a full disk
        if not readable(error_file):
            error_file.unlink()
            done.append(f"removed the unreadable {error_file.parent.name}/error.pkl (its error.txt stays)")
    for name in sorted(names):
        live, copy = exp_dir / name, saved / name
        if live.is_file() and readable(live):
            continue
        if copy.is_file() and readable(copy):
            _copy_atomic(copy, live)
            done.append(f"restored {name} from its last good copy")
        elif live.is_file():
            live.rename(live.with_name(f"{name}.unreadable"))
            done.append(f"set aside the unreadable {name}")
    return done


def restorable(exp_dir: Path) -> bool:
    """Whether Ray can restore the experiment: its tuner.pkl and an experiment state read
    back, and no search-algorithm state was lost (without it Ray would generate the grid's
    trials a second time beside the restored ones)."""
    if not tune.Tuner.can_restore(str(exp_dir)):
        return False
    if any(exp_dir.glob("*-state-*.unreadable")) or any(exp_dir.glob("searcher-state-*.unreadable")):
        return False
    states = list(exp_dir.glob("experiment_state-*.json"))
    return readable(exp_dir / "tuner.pkl") and any(readable(p) for p in states)


def reset(exp_dir: Path, keep: tuple[str, ...]) -> None:
    """Remove everything of Ray's from the experiment folder but the files in ``keep`` (the
    manifest), for a sweep whose trials start again."""
    for path in exp_dir.iterdir():
        if path.name in keep:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


class StateBackup(tune.Callback):
    """Keeps the copies of :func:`backup` up to date while the sweep runs."""

    def __init__(self, exp_dir: str, interval_s: float = 10.0):
        self.exp_dir = exp_dir
        self.interval_s = interval_s
        self._last = 0.0

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.interval_s:
            self._last = time.monotonic()
            backup(Path(self.exp_dir))

    def on_trial_start(self, iteration, trials, trial, **info):
        self.on_step_end(iteration, trials)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self._last = 0.0  # a new checkpoint: the state that names it is worth keeping now
        self.on_step_end(iteration, trials)

    def on_experiment_end(self, trials, **info):
        backup(Path(self.exp_dir))
