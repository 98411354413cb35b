"""What a sweep does while it starts: the stop flag that exists only once raised, and the
preparation thread that runs beside Ray's start-up without importing what Ray imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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
from pact_ray.tune import fast_start, launch, prepare
fast_start.import_shared_modules()  # as StorePreparation does before its thread starts
before = set(sys.modules)
if sys.argv[1] == "ray":
    launch.init_ray(None)
    import ray
    ray.nodes()
    ray.shutdown()
else:
    from pact_ray.kinds import RUN_KINDS
    prepare.import_driver_modules(tuple(k for k in RUN_KINDS.values() if k.training))
print(json.dumps(sorted(set(sys.modules) - before)))
"""


@pytest.mark.slow
def test_the_preparation_thread_imports_nothing_that_rays_start_up_imports():
    """Both run at once (see prepare.StorePreparation): a module imported by both at the same time
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


# The end of each wrapper below: run the sweep script named by the first argument, as `python script ...` would.
_RUN_SCRIPT = """
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""

_UNTIL_RAY = """
import runpy, sys
import pact_ray.tune.launch as launch

def connect_ray(address, verbose=False):
    print("TORCH_BEFORE_RAY", "torch" in sys.modules)
    raise SystemExit(0)

launch.connect_ray = connect_ray
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


# ------------------------------------------------ one sweep of the script's own, watched three ways

# Hooks put in front of the sweep script (then _RUN_SCRIPT): the first reports the driver's
# first import of torch, the second every socket its local Ray's processes listen on.
_WATCH_TORCH = """
import runpy, sys, traceback

class WatchTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.stderr.write("TORCH IMPORTED BY THE DRIVER\\n" + "".join(traceback.format_stack(limit=15)))
            sys.meta_path.remove(self)
        return None

sys.meta_path.insert(0, WatchTorch())
"""

_LISTENING = """
import json, runpy, sys
import pact_ray.tune.launch as launch

original = launch.init_ray

def init_ray(*args, **kwargs):
    started = original(*args, **kwargs)
    import psutil  # Ray's own copy, on the path once Ray is imported
    listening = []
    for child in psutil.Process().children(recursive=True):
        try:
            listening += [(child.name(), c.laddr.ip) for c in child.net_connections(kind="inet") if c.status == "LISTEN"]
        except psutil.Error:
            pass
    print("LISTENING", json.dumps(listening), flush=True)
    return started

launch.init_ray = init_ray
"""

_OTHER_RAY = """
import os, runpy, sys
import pact_ray.tune.fast_start as fast_start

if os.environ.get("PRETEND_OTHER_RAY"):
    fast_start.WRITTEN_FOR = "0.0."  # as on a Ray release the shortcuts were not written for
""" + _RUN_SCRIPT

OWN_SWEEP_STEPS = 30  # short steps, each one checkpointed: what made Ray warn about its snapshots


@pytest.fixture(scope="module")
def own_sweep(tmp_path_factory):
    """One sweep as `python sweeps/stage1_router.py ...` runs it, with a local Ray of its own,
    on a data set already cached, and short steps that each write a checkpoint, watched for the
    three tests below (one sweep instead of three: each starts its own Ray). Returns the
    finished process, the sweep's script, its --name/--storage-path/--tracking-uri flags and
    environment, and the files of its baseline trial folder when it ended, with the lines of
    its result.json (before a test resumes the sweep)."""
    from pact_ray.kinds import STAGE1
    from pact_ray.runs.stage1 import Stage1RunConfig

    STAGE1.dataset(Stage1RunConfig.for_variant("baseline", "smoke", "tiny", 0))  # in the session's data cache
    tmp = tmp_path_factory.mktemp("own_sweep")
    script = str(Path(__file__).resolve().parents[1] / "sweeps" / "stage1_router.py")
    where = ["--name", "own", "--storage-path", str(tmp / "runs"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env["RAY_AUTH_MODE"] = "disabled"
    out = subprocess.run([sys.executable, "-c", _WATCH_TORCH + _LISTENING + _RUN_SCRIPT, script, "--profile", "smoke", "--model",
                          "tiny", "--variants", "baseline,ot_first", "--seeds", "0", "--set", f"steps={OWN_SWEEP_STEPS}",
                          "--set", "checkpoint_every=1", "--quiet", *where], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (trial,) = [p for p in (tmp / "runs" / "own").iterdir() if p.name.startswith("baseline_s0")]
    names = {p.name for p in trial.iterdir()}
    result_lines = len((trial / "result.json").read_text().splitlines()) if "result.json" in names else None
    return SimpleNamespace(out=out, script=script, where=where, env=env, trial_files=names, result_lines=result_lines)


@pytest.mark.slow
def test_a_quiet_sweep_that_checkpoints_every_step_prints_no_snapshot_warnings(own_sweep):
    """Short steps that checkpoint at every step make Ray warn that its experiment-state
    snapshots "may become a bottleneck" (14 lines for this sweep before the fix): a sweep
    without --verbose does not print them. (Other warnings of Ray's depend on the machine,
    such as a small /dev/shm, and are left to it.)"""
    err = own_sweep.out.stderr
    assert "snapshotting" not in err and "experiment_state.py" not in err, err[-3000:]


@pytest.mark.slow
def test_a_sweep_on_cached_data_never_imports_torch_in_the_driver_nor_writes_tensorboard_files(own_sweep):
    """With its data set cached, the driver describes it without the generators, hands Tune
    torch-free trainables and leaves Tune's TensorBoard logger (tensorboardX imports torch) out:
    torch is imported by the trials only, which saves every sweep's start-up a second. Ray's
    result files that --resume and Ray's own API read are still written."""
    assert "TORCH IMPORTED BY THE DRIVER" not in own_sweep.out.stderr, own_sweep.out.stderr[-3000:]
    names = own_sweep.trial_files
    assert {"result.json", "params.json", "progress.csv"} <= names, names
    assert not [n for n in names if n.startswith("events.out.tfevents")], names
    assert own_sweep.result_lines == OWN_SWEEP_STEPS


@pytest.mark.slow
def test_a_sweeps_own_ray_listens_on_loopback_only_and_resumes_on_rays_public_behaviour(own_sweep):
    """The local Ray a sweep starts accepts no connection from another machine: every socket
    its processes listen on is a loopback address (RAY_AUTH_MODE=disabled is safe only so).
    With PACT_RAY_FAST_START=0, or on a Ray release other than the one fast_start knows, the
    sweep uses none of Ray's internals: a resume runs with the first command's callbacks,
    says so, and ends with its summary as usual."""
    listening = json.loads(own_sweep.out.stdout.split("LISTENING ", 1)[1].splitlines()[0])
    assert {"gcs_server", "raylet"} <= {name for name, _ in listening}, listening
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, ip in listening), listening
    for how in ({"PACT_RAY_FAST_START": "0"}, {"PRETEND_OTHER_RAY": "1"}):
        resumed = subprocess.run([sys.executable, "-c", _OTHER_RAY, own_sweep.script, *own_sweep.where, "--resume"],
                                 capture_output=True, text=True, env={**own_sweep.env, **how}, timeout=300)
        assert resumed.returncode == 0, (how, resumed.stdout[-2000:] + resumed.stderr[-3000:])
        assert "This resume logs through the first command's callbacks" in resumed.stdout, (how, resumed.stdout[-2000:])
        assert "2/2 trials finished" in resumed.stdout and "Route status" in resumed.stdout, (how, resumed.stdout[-2000:])


def test_the_shortcut_falls_back_to_rays_public_behaviour_when_rays_internals_differ(monkeypatch):
    """A use of Ray's internals that does not find what it expects warns once and does what
    Ray's public API does; the environment turns it off."""
    from pact_ray.tune import fast_start

    monkeypatch.delenv(fast_start.ENV, raising=False)
    assert fast_start.enabled("callbacks")
    with pytest.warns(RuntimeWarning, match="public behaviour"):
        assert fast_start.set_restored_callbacks(object(), [], verbose=0) is False  # no _local_tuner: as if Ray had changed
    monkeypatch.setenv(fast_start.ENV, "0")
    assert not any(fast_start.enabled(t) for t in fast_start.TRICKS)
    assert fast_start.set_restored_callbacks(object(), [], verbose=0) is False
