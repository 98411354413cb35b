"""What a sweep does while it starts: the stop flag that exists only once raised, and the
preparation thread that runs beside Ray's start-up without importing what Ray imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_the_stop_flag_is_raised_by_the_first_signal_and_read_by_trials(ray_address):
    """No process is started for the flag until the first Ctrl-C; a trial then sees it at its
    next step, keeps seeing it, and a flag left by an earlier start is cleared on entry."""
    import signal

    import ray

    from pact_ray.tune.interrupt import DriverInterrupts, StopFlag, TrialStop, flag_name

    name = "startup-flag"
    outside = TrialStop(None)
    with DriverInterrupts(name, out=open(os.devnull, "w")) as interrupts:
        trial = TrialStop(name)
        assert not trial.requested() and not outside.requested()
        with pytest.raises(ValueError):
            ray.get_actor(flag_name(name))  # nothing made up front
        interrupts._handle(signal.SIGINT, None)
        assert interrupts.requested and trial.requested() and TrialStop(name).requested()
        assert not outside.requested()
        with pytest.raises(KeyboardInterrupt):  # the second one stops at once
            interrupts._handle(signal.SIGINT, None)
    with pytest.raises(ValueError):
        ray.get_actor(flag_name(name))  # the exit removed it, name included (Ray frees a name asynchronously)
    stale = StopFlag.options(name=flag_name(name), lifetime="non_detached").remote()
    ray.get(stale.raised.remote())
    with DriverInterrupts(name, out=open(os.devnull, "w")):
        assert not TrialStop(name).requested()  # the leftover flag does not stop the new start's trials


def test_a_new_stores_schema_is_made_without_mlflows_info_lines_unless_verbose(tmp_path, capfd):
    """MLflow announces a new SQLite schema at INFO; a sweep shows that only with --verbose
    (prepare_store's announce), and the logger's level is left as it was."""
    import logging

    from pact_ray.tracking.store import prepare_store

    messages = logging.getLogger("mlflow.store.db.utils")
    level = messages.level
    capfd.readouterr()
    prepare_store(f"sqlite:///{tmp_path / 'quiet.db'}")
    quiet = capfd.readouterr()
    assert (tmp_path / "quiet.db").stat().st_size > 0
    assert "database tables" not in quiet.err + quiet.out and messages.level == level
    prepare_store(f"sqlite:///{tmp_path / 'verbose.db'}", announce=True)
    verbose = capfd.readouterr()
    assert "Creating initial MLflow database tables" in verbose.err + verbose.out and messages.level == level


_RAY_START_IMPORTS = """
import json, sys
import ray, mlflow.tracking
import pact_ray.tune.sweep as sweep
before = set(sys.modules)
if sys.argv[1] == "ray":
    sweep.init_ray(None)
    import ray
    ray.nodes()
    ray.shutdown()
else:
    sweep._import_driver_modules()
print(json.dumps(sorted({m.split(".")[0] for m in set(sys.modules) - before})))
"""


@pytest.mark.slow
def test_the_preparation_thread_imports_nothing_that_rays_start_up_imports():
    """Both run at once (see _StorePreparation): a package imported by both at the same time
    could be seen half made. Each side's new top-level packages, measured in a fresh process."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def new_packages(side: str) -> set[str]:
        out = subprocess.run([sys.executable, "-c", _RAY_START_IMPORTS, side], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return set(json.loads(out.stdout.strip().splitlines()[-1]))

    ray_side, preparation = new_packages("ray"), new_packages("preparation")
    assert "matplotlib" in preparation and "alembic" in preparation  # the thread does import the report and the store
    assert ray_side  # Ray's start-up imports packages of its own (aiohttp, for one): the measure sees them
    assert ray_side & preparation == set(), sorted(ray_side & preparation)


_IDLE_WORKERS = """
import json, os, time
import pact_ray.tune.sweep as sweep
import ray


def workers():
    # The driver's descendants (raylet, then its workers) from /proc: pid -> parent pid.
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            pass
    mine, found = {os.getpid()}, True
    while found:
        new = {p for p, parent in parents.items() if parent in mine} - mine
        found, mine = bool(new), mine | new
    out = []
    for pid in mine - {os.getpid()}:
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                argv = f.read().split(chr(0))
        except OSError:
            continue
        # A worker: default_worker.py until it renames itself "ray::IDLE" or "ray::<task>"
        # (the raylet's agents call themselves "ray::...Agent").
        title = argv[0].split()[0] if argv[0] else ""
        if (len(argv) > 1 and argv[1].endswith("default_worker.py")) or (title.startswith("ray::") and not title.endswith("Agent")):
            out.append(pid)
    return out


sweep.init_ray(None)
idle = []
for _ in range(15):  # Ray would start them with the raylet; give it 3 s
    idle = idle or workers()
    time.sleep(0.2)


@ray.remote
def one():
    return 1


ray.get(one.remote())
after_a_task = workers()
ray.shutdown()
print(json.dumps({"idle": idle, "after_a_task": after_a_task}))
"""


@pytest.mark.slow
def test_a_local_ray_starts_no_idle_workers():
    """Ray prestarts one worker per CPU for the first driver, which Tune's trial actors never
    use: the sweep's own Ray starts none (the task after shows that the measure sees workers)."""
    out = subprocess.run([sys.executable, "-c", _IDLE_WORKERS], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["idle"] == [] and len(seen["after_a_task"]) >= 1, seen


@pytest.mark.slow
def test_a_quiet_sweep_that_checkpoints_every_step_prints_no_snapshot_warnings(tmp_path):
    """Short steps that checkpoint at every step make Ray warn that its experiment-state
    snapshots "may become a bottleneck" (14 lines for this sweep before the fix): a sweep
    without --verbose does not print them. (Other warnings of Ray's depend on the machine,
    such as a small /dev/shm, and are left to it.)"""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "sweeps" / "stage1_router.py"
    out = subprocess.run([sys.executable, str(script), "--model", "tiny", "--profile", "smoke", "--variants", "baseline,ot_first",
                          "--set", "steps=30", "--set", "checkpoint_every=1", "--name", "w", "--storage-path", str(tmp_path / "runs"),
                          "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "snapshotting" not in out.stderr and "experiment_state.py" not in out.stderr, out.stderr[-3000:]
