"""The terminal view of a running sweep: one line per trial (run, step / total, latest
training and validation loss, elapsed, ETA, state), in place of Ray's per-trial boxes.

On a terminal the block is redrawn in place at most every ``refresh_s``; anywhere else (a
log file, CI) it is printed whole every ``interval_s`` and once at the end, with no escape
codes. Trials are listed in the order they started; finished ones stay, so the last block is
the sweep's record.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import IO

from ray import tune

from pact_ray.errors import error_line, is_interruption
from pact_ray.metrics import names as M
from pact_ray.tracking.callback import run_name

LINE_WIDTH = 100


@dataclass
class _Trial:
    name: str
    total: int
    started: float = field(default_factory=time.monotonic)
    step: int = 0
    loss: float | None = None
    val: float | None = None
    state: str = "pending"
    elapsed: float = 0.0


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class ProgressLines(tune.Callback):
    """A Tune callback that prints the sweep's progress, one line per trial."""

    def __init__(self, totals: dict[str, int], numbered: bool = False, stream: IO[str] | None = None, interval_s: float = 30.0,
                 refresh_s: float = 1.0, planned: int | None = None):
        self.totals = dict(totals)  # variant (matrix: cell) -> its steps
        self.planned = planned  # trials the sweep will run (None: a searcher decides as it goes)
        self.numbered = numbered
        self.stream = stream
        self.interval_s = interval_s
        self.refresh_s = refresh_s
        self._trials: dict[str, _Trial] = {}
        self._last = 0.0
        self._drawn = 0  # lines of the block on screen (terminal mode)
        self._started = time.monotonic()

    def __getstate__(self):  # Ray pickles callbacks into the experiment state: keep settings only
        state = dict(self.__dict__)
        state.update(stream=None, _trials={}, _drawn=0)
        return state

    @property
    def out(self) -> IO[str]:
        return self.stream or sys.stdout

    @property
    def tty(self) -> bool:
        return bool(getattr(self.out, "isatty", lambda: False)())

    def _trial(self, trial) -> _Trial:
        t = self._trials.get(trial.trial_id)
        if t is None:
            name = run_name(trial.config, trial.trial_id, self.numbered)
            t = self._trials[trial.trial_id] = _Trial(name, self.totals.get(trial.config.get("variant"), 0))
        return t

    # ------------------------------------------------------------ Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        self._trial(trial).state = "running"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        t = self._trial(trial)
        t.step = int(result.get(M.STEP, t.step))
        t.loss = result.get(M.LOSS, t.loss)
        t.val = result.get(M.VAL_LOSS, result.get(M.VAL_MSE, t.val))
        t.elapsed = float(result.get("time_total_s", t.elapsed))
        t.state = "running"
        if result.get(M.RESUME_NOTE):
            self.out.write(f"  {t.name}: {str(result[M.RESUME_NOTE])[:300]}\n")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._trial(trial).state = "done"

    def _failed(self, trial, state: str) -> tuple[_Trial, str] | None:
        """Mark a failed trial ``state`` and return it with its error line; None (and marked
        interrupted) when the failure is the sweep's own interruption."""
        t, error = self._trial(trial), error_line(trial)
        t.state = "interrupted" if is_interruption(error) else state
        return None if t.state == "interrupted" else (t, error)

    def on_trial_error(self, iteration, trials, trial, **info):
        if failed := self._failed(trial, "errored"):
            t, error = failed
            where = getattr(trial, "error_file", None) or ""
            self.out.write(f"  {t.name} failed at step {t.step}: {error[:200]}" + (f" ({where})" if where else "") + "\n")

    def on_trial_recover(self, iteration, trials, trial, **info):
        if failed := self._failed(trial, "retrying"):
            t, error = failed
            self.out.write(f"  {t.name} failed at step {t.step} and is retried from its last checkpoint: {error[:160]}\n")

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._last >= (self.refresh_s if self.tty else self.interval_s):
            self.draw()

    def on_experiment_end(self, trials, **info):
        self.draw(final=True)

    # ------------------------------------------------------------ drawing
    def lines(self) -> list[str]:
        done = sum(t.state == "done" for t in self._trials.values())
        # Tune creates trials as it starts them: count the sweep's plan, not the trials seen so far.
        total = max(self.planned or 0, len(self._trials))
        head = f"[{_fmt_s(time.monotonic() - self._started)}] {done}/{total} trials done{'' if self.planned else ', more may start'}"
        width = max((len(t.name) for t in self._trials.values()), default=0)
        out = [head]
        for t in self._trials.values():
            eta = ""
            if t.state == "running" and t.step:
                eta = f"ETA {_fmt_s(t.elapsed / t.step * (t.total - t.step))}"
            loss = "" if t.loss is None else f"loss {t.loss:.4g}"
            val = "" if t.val is None else f"val {t.val:.4g}"
            line = f"  {t.name:<{width}}  {t.step:>5}/{t.total:<5} {loss:<12} {val:<12} {_fmt_s(t.elapsed):>8}  {eta:<12} {t.state}"
            out.append(line.rstrip()[:LINE_WIDTH])
        return out

    def draw(self, final: bool = False) -> None:
        self._last = time.monotonic()
        if not self._trials:
            return
        lines = self.lines()
        if self.tty:
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.out.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
            self._drawn = len(lines)
        else:
            self.out.write("\n".join(lines) + "\n")
        self.out.flush()
