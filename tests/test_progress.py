"""The terminal view of a sweep: one line per trial, redrawn in place on a terminal, printed
whole (no escape codes) at a steady interval elsewhere."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from pact_ray.metrics import names as M
from pact_ray.tune.progress import LINE_WIDTH, ProgressLines


@dataclass
class FakeTrial:
    trial_id: str
    config: dict = field(default_factory=dict)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(stream, interval_s: float = 0.0) -> ProgressLines:
    progress = ProgressLines({"baseline": 8, "ot_first": 8}, stream=stream, interval_s=interval_s, refresh_s=0.0, planned=2)
    trials = [FakeTrial(f"abc_{i:05d}", {"variant": v, "seed": s}) for i, (v, s) in enumerate([("baseline", 0), ("ot_first", 0)])]
    for t in trials:
        progress.on_trial_start(0, trials, t)
    for step in (1, 2, 3):
        for t in trials:
            progress.on_trial_result(0, trials, t, {M.STEP: step, M.LOSS: 2.0 - 0.1 * step, "time_total_s": 1.5 * step})
        progress.on_step_end(0, trials)
    progress.on_trial_complete(0, trials, trials[0])
    progress.on_trial_error(0, trials, trials[1])
    progress.on_experiment_end(trials)
    return progress


def test_a_log_gets_whole_blocks_without_escape_codes():
    out = io.StringIO()
    _run(out)
    text = out.getvalue()
    assert "\x1b[" not in text
    blocks = text.split("trials done")
    assert len(blocks) - 1 == 4  # three intervals and the final block
    last = text.strip().splitlines()[-3:]
    assert last[0].endswith("1/2 trials done")
    assert last[1].split()[:3] == ["baseline", "s0", "3/8"] and last[1].endswith("done") and "loss 1.7" in last[1]
    assert last[2].split()[:3] == ["ot_first", "s0", "3/8"] and last[2].endswith("errored")
    assert all(len(line) <= LINE_WIDTH for line in text.splitlines())


def test_a_terminal_gets_one_block_redrawn_in_place():
    out = Terminal()
    _run(out)
    text = out.getvalue()
    assert text.count("\x1b[3F") == 3  # each redraw moves up over the previous 3 lines
    assert text.count("\x1b[2K") == 4 * 3  # and clears every line it rewrites


def test_eta_follows_the_pace_of_the_trial():
    progress = ProgressLines({"baseline": 10}, stream=io.StringIO())
    trial = FakeTrial("t_00000", {"variant": "baseline", "seed": 1})
    progress.on_trial_result(0, [trial], trial, {M.STEP: 4, M.LOSS: 1.0, "time_total_s": 8.0})
    line = progress.lines()[1]
    assert "4/10" in line and "ETA 12 s" in line  # 2 s per step, 6 steps to go


def test_the_count_is_of_the_planned_trials_not_of_those_started():
    """Tune creates a trial when it starts it: three planned, two started, none done reads 0/3;
    without a plan (a searcher that adds seeds) the count says that more may start."""
    trials = [FakeTrial(f"t_{i:05d}", {"variant": "baseline", "seed": i}) for i in range(2)]
    planned = ProgressLines({"baseline": 8}, stream=io.StringIO(), planned=3)
    open_ended = ProgressLines({"baseline": 8}, stream=io.StringIO())
    for progress in (planned, open_ended):
        for t in trials:
            progress.on_trial_start(0, trials, t)
    assert planned.lines()[0].endswith("] 0/3 trials done")
    assert open_ended.lines()[0].endswith("] 0/2 trials done, more may start")
