"""What a sweep does while it starts: the stop flag that exists only once raised, and the
preparation thread that runs beside Ray's start-up without importing what Ray imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_a_new_stores_schema_is_made_without_mlflows_info_lines_unless_verbose(tmp_path, capfd, monkeypatch):
    """MLflow announces a new SQLite schema at INFO; a sweep shows that only with --verbose
    (prepare_store's announce), and the logger's level is left as it was. (No schema template
    here: a store copied from one runs no migration, and MLflow says nothing.)"""
    import logging

    from pact_ray.tracking.store import prepare_store

    messages = logging.getLogger("mlflow.store.db.utils")
    level = messages.level
    capfd.readouterr()
    monkeypatch.setenv("PACT_RAY_SCHEMA_CACHE", str(tmp_path / "cache-quiet"))
    prepare_store(f"sqlite:///{tmp_path / 'quiet.db'}")
    quiet = capfd.readouterr()
    assert (tmp_path / "quiet.db").stat().st_size > 0
    assert "database tables" not in quiet.err + quiet.out and messages.level == level
    monkeypatch.setenv("PACT_RAY_SCHEMA_CACHE", str(tmp_path / "cache-verbose"))
    prepare_store(f"sqlite:///{tmp_path / 'verbose.db'}", announce=True)
    verbose = capfd.readouterr()
    assert "Creating initial MLflow database tables" in verbose.err + verbose.out and messages.level == level


_RAY_START_IMPORTS = """
import importlib, json, sys
import ray, mlflow.tracking
import pact_ray.tune.sweep as sweep
for name in sweep._IMPORTED_BY_BOTH:  # as _StorePreparation does before its thread starts
    importlib.import_module(name)
before = set(sys.modules)
if sys.argv[1] == "ray":
    sweep.init_ray(None)
    import ray
    ray.nodes()
    ray.shutdown()
else:
    from pact_ray.runs.kinds import RUN_KINDS
    sweep._import_driver_modules(tuple(k.trainer.module for k in RUN_KINDS.values() if k.trainer))
print(json.dumps(sorted(set(sys.modules) - before)))
"""


@pytest.mark.slow
def test_the_preparation_thread_imports_nothing_that_rays_start_up_imports():
    """Both run at once (see _StorePreparation): a module imported by both at the same time
    could be seen half made. Each side's new modules (every module, not only packages: both
    import parts of Ray), measured in a fresh process."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def new_modules(side: str) -> set[str]:
        out = subprocess.run([sys.executable, "-c", _RAY_START_IMPORTS, side], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return set(json.loads(out.stdout.strip().splitlines()[-1]))

    ray_side, preparation = new_modules("ray"), new_modules("preparation")
    # The thread does import the report, the store and Ray Tune
    assert {"matplotlib", "alembic", "ray.tune", "pact_ray.tracking.callback", "torch", "pact_ray.training.stage2"} <= preparation
    assert "aiohttp" in ray_side  # Ray's start-up imports modules of its own: the measure sees them
    assert ray_side & preparation == set(), sorted(ray_side & preparation)


_WORKERS = """
import json, os, time


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
"""

_IDLE_WORKERS = _WORKERS + """
import pact_ray.tune.sweep as sweep
import ray

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
def test_a_local_ray_starts_no_idle_workers_unless_asked():
    """Ray prestarts one worker per CPU for the first driver: a sweep's own Ray starts none
    unless its trials will run in them all (_prestart_fits; the task after shows that the
    measure sees workers)."""
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


def _store_content(db) -> tuple[dict, list]:
    """A SQLite store's schema (each object's SQL) and every table's rows, the Default
    experiment's location and times aside (they belong to each store)."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(db)) as con:
        # Each object's SQL as a set of lines: MLflow's migrations list a table's constraints in
        # no fixed order (two runs in one process differ), which changes nothing in the store.
        schema = {name: sorted(line.strip().rstrip(",") for line in (sql or "").splitlines())
                  for name, sql in con.execute("select name, sql from sqlite_master")}
        rows = {}
        for (table,) in con.execute("select name from sqlite_master where type = 'table'"):
            rows[table] = sorted(map(repr, con.execute(f'select * from "{table}"')))
        default = con.execute("select experiment_id, name, lifecycle_stage, artifact_location from experiments").fetchall()
    rows["experiments"] = [(i, name, stage, location.rsplit("/", 2)[-2:]) for i, name, stage, location in default]
    return schema, rows


def test_a_new_store_made_from_the_schema_template_is_the_store_mlflows_migrations_make(tmp_path, monkeypatch):
    """The first new store on a machine runs MLflow's migrations and leaves the schema
    template; the next one is a copy of it, made without a migration, and is the same store
    (schema, revision, rows; its own Default experiment in its own folder) that MLflow
    then opens and writes to as usual."""
    import mlflow.store.db.utils as db_utils
    from mlflow.tracking import MlflowClient

    from pact_ray.tracking.store import prepare_store, schema_template

    monkeypatch.setenv("PACT_RAY_SCHEMA_CACHE", str(tmp_path / "cache"))
    template = schema_template()
    assert not template.exists()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    prepare_store(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    assert template.is_file() and template.parent == tmp_path / "cache" and "mlflow-" in template.name

    def no_migrations(engine):
        raise AssertionError("the store was made by the migrations, not from the template")

    monkeypatch.setattr(db_utils, "_initialize_tables", no_migrations)
    prepare_store(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    made, copied = _store_content(tmp_path / "a" / "mlflow.db"), _store_content(tmp_path / "b" / "mlflow.db")
    assert copied == made
    assert made[1]["experiments"] == [(0, "Default", "active", ["mlartifacts", "0"])]
    assert str(tmp_path / "b" / "mlartifacts") in MlflowClient(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}").get_experiment("0").artifact_location
    client = MlflowClient(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("from-the-template")).info.run_id
    client.log_metric(run, "loss", 0.5, step=3)
    assert [(m.step, m.value) for m in client.get_metric_history(run, "loss")] == [(3, 0.5)]


@pytest.mark.parametrize("spoil", ["damaged", "older schema"])
def test_a_template_mlflow_refuses_is_not_used_and_is_made_again(tmp_path, monkeypatch, spoil):
    """A damaged template, or one from an older schema (the MLflow of the day is checked
    against it on opening), is passed over: the store is made by the migrations, whole, and
    a good template replaces the bad one."""
    import sqlite3
    from contextlib import closing

    from pact_ray.tracking.store import prepare_store, schema_template

    monkeypatch.setenv("PACT_RAY_SCHEMA_CACHE", str(tmp_path / "cache"))
    prepare_store(f"sqlite:///{tmp_path / 'first.db'}")
    template = schema_template()
    good = _store_content(template)
    if spoil == "damaged":
        template.write_bytes(b"not a database" * 100)
    else:
        with closing(sqlite3.connect(template)) as con, con:
            con.execute("update alembic_version set version_num = '451aebb31d03'")  # MLflow 1.x's first revision
    prepare_store(f"sqlite:///{tmp_path / 'second.db'}")
    assert _store_content(tmp_path / "second.db") == _store_content(tmp_path / "first.db")
    assert _store_content(template) == good
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


_STOP_RAY = """
import sys
import ray
import pact_ray.tune.sweep as sweep

sweep.init_ray(None)
node = ray._private.worker._global_node
monitor = node.all_processes["monitor"][0].process
children = [p.process for procs in node.all_processes.values() for p in procs]


@ray.remote
class Busy:
    def ping(self):
        return 1


ray.get(Busy.remote().ping.remote())  # a worker too
order = []
kill = node._kill_process_impl


def spy(process_type, **kw):
    order.append((process_type, monitor.poll() is not None))
    return kill(process_type, **kw)


node._kill_process_impl = spy
getattr(sweep, sys.argv[1])()
print("ORDER", order)
print("LEFT", [p.pid for p in children if p.poll() is None], "INIT", ray.is_initialized())
"""


@pytest.mark.slow
def test_stopping_the_sweeps_ray_ends_the_autoscaler_monitor_before_its_gcs():
    """Ray stops the GCS before the autoscaler's monitor, whose SIGTERM handler then waits on
    that gone GCS until Ray kills it a second later: stop_ray ends the monitor first. Ray's own
    shutdown then stops everything else as usual, and nothing is left running or printed."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", _STOP_RAY, "stop_ray"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    order = dict(eval(out.stdout.split("ORDER ", 1)[1].splitlines()[0]))
    assert order["gcs_server"] is True, order  # the monitor had ended when Ray came to stop the GCS
    assert "LEFT [] INIT False" in out.stdout
    assert "autoscaler failed" not in out.stdout + out.stderr


# The end of each wrapper below: run the sweep script named by the first argument, as `python script ...` would.
_RUN_SCRIPT = """
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""

_UNTIL_RAY = """
import runpy, sys
import pact_ray.tune.sweep as sweep

def connect_ray(address, verbose=False, preload=None):
    print("TORCH_BEFORE_RAY", "torch" in sys.modules)
    raise SystemExit(0)

sweep.connect_ray = connect_ray
""" + _RUN_SCRIPT + """
print("RAY NOT REACHED")
"""


@pytest.mark.parametrize("script", ["stage1_router", "ot_matrix", "mae_world_model"])
def test_a_sweep_reads_and_checks_every_config_without_torch_so_ray_starts_first(tmp_path, script):
    """The driver imports torch (1 s) in the preparation thread while Ray starts: everything it
    does before (flags, every trial's config, the storage and tracking checks) is torch-free.
    A bad config value is still refused there, before Ray."""
    root = Path(__file__).resolve().parents[1]
    base = [sys.executable, "-c", _UNTIL_RAY, str(root / "sweeps" / f"{script}.py"), "--profile", "smoke", "--model", "tiny",
            "--storage-path", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    assert "TORCH_BEFORE_RAY False" in out.stdout, out.stdout + out.stderr[-2000:]
    bad = subprocess.run(base + ["--set", "lr=-1"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "lr" in bad.stderr and "TORCH_BEFORE_RAY" not in bad.stdout, bad.stdout + bad.stderr[-2000:]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


_WATCH_TORCH = """
import runpy, sys, traceback

class WatchTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.stderr.write("TORCH IMPORTED BY THE DRIVER\\n" + "".join(traceback.format_stack(limit=15)))
            sys.meta_path.remove(self)
        return None

sys.meta_path.insert(0, WatchTorch())
""" + _RUN_SCRIPT


@pytest.mark.slow
def test_a_sweep_on_cached_data_never_imports_torch_in_the_driver_nor_writes_tensorboard_files(tmp_path):
    """With its data set cached, the driver describes it without the generators, hands Tune
    torch-free trainables and leaves Tune's TensorBoard logger (tensorboardX imports torch) out:
    torch is imported by the trials only, which saves every sweep's start-up a second. Ray's
    result files that --resume and Ray's own API read are still written."""
    from pact_ray.runs.kinds import STAGE1
    from pact_ray.runs.stage1 import Stage1RunConfig

    STAGE1.dataset(Stage1RunConfig.for_variant("baseline", "smoke", "tiny", 0))  # in the session's data cache
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _WATCH_TORCH, str(root / "sweeps" / "stage1_router.py"), "--profile", "smoke",
                          "--model", "tiny", "--variants", "baseline", "--name", "notorch", "--quiet",
                          "--storage-path", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                         capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "TORCH IMPORTED BY THE DRIVER" not in out.stderr, out.stderr[-3000:]
    (trial,) = [p for p in (tmp_path / "runs" / "notorch").iterdir() if p.name.startswith("baseline_s0")]
    names = {p.name for p in trial.iterdir()}
    assert {"result.json", "params.json", "progress.csv"} <= names, names
    assert not [n for n in names if n.startswith("events.out.tfevents")], names
    assert len((trial / "result.json").read_text().splitlines()) == Stage1RunConfig.for_variant("baseline", "smoke", "tiny", 0).steps


_PRESTARTED = _WORKERS + """
import contextlib, runpy, sys
import pact_ray.tune.sweep as sweep
from ray._private.utils import get_num_cpus

original = sweep._trials_in_prestarted_workers


@contextlib.contextmanager
def watched(prestarted):
    idle = []
    for _ in range(50):  # the prestarted workers boot with Ray: wait for them (at most 10 s)
        idle = workers()
        if len(idle) >= int(get_num_cpus()):
            break
        time.sleep(0.2)
    print("IDLE_AT_FIT", json.dumps(idle), flush=True)
    with original(prestarted):
        yield


sweep._trials_in_prestarted_workers = watched
""" + _RUN_SCRIPT


@pytest.mark.slow
def test_trials_that_fill_the_machine_run_in_the_workers_ray_prestarted(tmp_path):
    """Where the trials fill every CPU, the sweep's Ray boots its idle workers while the sweep
    starts, and Tune's trial actors run in them (PL_DISABLE_FORK left out of their environment)
    rather than in new workers booted after Tune starts. Each trial's pid (Tune's result
    field) is one of the workers that were idle when Tune began."""
    from ray._private.utils import get_num_cpus

    cpus = int(get_num_cpus())
    if cpus > 4:
        pytest.skip("the sweep below fills 2 to 4 CPUs")
    variants = ["baseline", "ot_first", "mask_prior", "rgb_edge"][:max(cpus, 2)]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _PRESTARTED, str(root / "sweeps" / "stage1_router.py"), "--profile", "smoke",
                          "--model", "tiny", "--variants", ",".join(variants), "--name", "pre", "--quiet",
                          "--storage-path", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                         capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    idle = set(json.loads(out.stdout.split("IDLE_AT_FIT ", 1)[1].splitlines()[0]))
    pids = {json.loads(line)["pid"] for folder in (tmp_path / "runs" / "pre").iterdir() if (folder / "result.json").is_file()
            for line in (folder / "result.json").read_text().splitlines()}
    assert len(idle) == cpus and pids and pids <= idle, (idle, pids)


def test_a_sweep_prestarts_workers_only_where_its_trials_fill_every_cpu(monkeypatch):
    """A prestarted worker that hosts no trial only takes CPU from the start-up: none for a
    cluster, GPU trials, a resume, fewer trials (or a lower --max-concurrent) than CPUs, or
    trials of several CPUs each."""
    from types import SimpleNamespace

    import ray._private.utils

    from pact_ray.tune.sweep import _prestart_fits

    monkeypatch.setattr(ray._private.utils, "get_num_cpus", lambda **_: 2.0)

    def fits(trials=8, **changed):
        args = dict(address=None, gpus_per_trial=0, resume=False, search="grid", until_conclusive=0, max_concurrent=0,
                    cpus_per_trial=1, num_samples=8)
        return _prestart_fits(SimpleNamespace(args=SimpleNamespace(**{**args, **changed}), trial_configs=[{}] * trials))

    assert fits() and fits(trials=2) and fits(cpus_per_trial=0.5) and fits(search="optuna", trials=1)
    assert not fits(address="127.0.0.1:6379") and not fits(gpus_per_trial=1) and not fits(resume=True)
    assert not fits(trials=1) and not fits(max_concurrent=1) and not fits(cpus_per_trial=2)
    assert not fits(search="optuna", trials=1, num_samples=1)


_PRELOADED = """
import json, sys
import pact_ray.tune.sweep as sweep
import ray

sweep.init_ray(None, preload=["pact_ray.tune.trial", "torch._dynamo", "pact_ray.ot.preload"])


@ray.remote(num_cpus=1)
def seen():
    # What the worker held before this task ran: nothing here imports them.
    solver = sys.modules.get("pact_ray.ot.cpu_solver")
    return {"modules": [m for m in ("torch", "ray.tune", "pact_ray.tune.trial", "torch._dynamo", "pact_ray.ot.preload")
                        if m in sys.modules],
            "kernels": len(solver.solve_batch.signatures) if solver else 0}


print(json.dumps(ray.get(seen.remote())))
sweep.stop_ray()
"""


@pytest.mark.slow
def test_the_sweeps_ray_boots_its_workers_with_the_trials_imports_and_the_ot_kernel_loaded():
    """The idle workers a sweep's Ray prestarts import what a first trial would (the trial's
    body with torch and Ray Tune, torch._dynamo) and load the OT kernel from numba's cache
    (float32 and float64, cold and warm-started) as they boot."""
    out = subprocess.run([sys.executable, "-c", _PRELOADED], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["modules"] == ["torch", "ray.tune", "pact_ray.tune.trial", "torch._dynamo", "pact_ray.ot.preload"], seen
    assert seen["kernels"] >= 2, seen
