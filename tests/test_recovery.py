"""No sweep left unrecoverable: kills in every start-up window (found by waiting for the file
that opens it), Ctrl-C, a full disk, two sweeps starting on one new SQLite store, impossible
resource requests, a tracking store that stays down, and the tracking-server wrapper."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import group_commands
from mlflow.tracking import MlflowClient

from pact_ray.tracking.server import free_port
from pact_ray.tracking.tags import ROLE_TAG, SWEEP_TAG
from pact_ray.tune.lease import TTL_ENV
from pact_ray.tune.manifest import MANIFEST
from pact_ray.tune.sweep import EXIT_DISK_FULL, EXIT_INTERRUPTED, EXIT_UNSENT, run_sweep

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "stage1_router.py"


def _cmd(tmp: Path, name: str, *extra: str, storage: Path | None = None) -> list[str]:
    return [sys.executable, str(SCRIPT), "--model", "tiny", "--profile", "smoke", "--variants", "baseline,ot_first",
            "--name", name, "--storage-path", str(storage or tmp / "runs"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            "--quiet", *extra]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def _wait_for(ready, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before the window opened: {proc.stdout.read()[-2000:]}")
        if time.time() > deadline:
            pytest.fail("the window never opened")
        time.sleep(0.02)


def _resume(tmp: Path, name: str, storage: Path | None = None) -> subprocess.CompletedProcess:
    """The resume, from another working folder, with nothing but the name and the storage."""
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(SCRIPT), "--name", name, "--storage-path", str(storage or tmp / "runs"),
                           "--resume", "--quiet"], cwd=elsewhere, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def _assert_complete(tmp: Path, name: str, runs_dir: Path | None = None, steps: int = 1, trials: int = 2) -> None:
    """One active MLflow run per trial, each FINISHED with every step once; the parent FINISHED."""
    manifest = json.loads(((runs_dir or tmp / "runs") / name / MANIFEST).read_text())
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs([manifest["experiment_id"]], filter_string=f"tags.`{SWEEP_TAG}` = '{manifest['parent_run_id']}'")
    assert sorted(r.info.run_name for r in runs) == sorted({r.info.run_name for r in runs}) and len(runs) == trials
    for r in runs:
        history = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert sorted(history) == list(range(1, steps + 1)), (r.info.run_name, history)
        assert r.info.status == "FINISHED"
    assert client.get_run(manifest["parent_run_id"]).info.status == "FINISHED"
    parents = client.search_runs([manifest["experiment_id"]], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'")
    assert [p.info.run_id for p in parents] == [manifest["parent_run_id"]]  # no orphan parent


# ------------------------------------------------------------------ kills

# Steps for the tests that interrupt trials mid-training. The trials see a stop request some 30
# to 70 steps after it is made (measured on 2 cores, a tiny step taking about 75 ms): 150 leave
# them training when it comes, and leave the resume less to train than 200 or 300 did.
INTERRUPTED_STEPS = 150


@pytest.mark.slow
@pytest.mark.parametrize("window", [MANIFEST, "tuner.pkl"])
def test_killed_while_starting_resumes(tmp_path, window):
    """SIGKILL the driver's process group the moment the window's file appears, then resume."""
    proc = _start(_cmd(tmp_path, "w"))
    _wait_for(lambda: (tmp_path / "runs" / "w" / window).exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _resume(tmp_path, "w")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    _assert_complete(tmp_path, "w")


def _summary_values(folder: Path) -> list[tuple]:
    """What a sweep's summary says about its trials, without run ids and times: variant, seed,
    status, steps and every metric, from its ablation_summary.json."""
    rows = json.loads((folder / "summary" / "ablation_summary.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    drop = {"run", "run_id", "mlflow_run_id", "start_time", "end_time", "duration_s", "wall_s", "parent_run_id", "sweep",
            "error", "trial_id", "checkpoint", "note"}
    return sorted(tuple(sorted((k, repr(v)) for k, v in row.items() if k not in drop)) for row in rows)


@pytest.mark.slow
def test_the_same_command_three_times_with_two_sigkills_finishes_the_sweep_exactly_once(tmp_path, ray_address):
    """What a scheduler does after preemptions: the same command line (``--resume auto``) run
    again and again. The first two runs are SIGKILLed (process group) at random moments, the
    first within the start-up; the third runs to the end. One parent run, one FINISHED child
    per trial with each training step logged once, and the summary of an uninterrupted sweep
    with the same seeds."""
    import random

    rng = random.Random(31)
    steps = 6
    extra = ("--seeds", "0", "--set", f"steps={steps}", "--set", "checkpoint_every=1")
    (tmp_path / "uninterrupted").mkdir()  # a store of its own: the healed sweep's must hold one parent run
    # The reference needs no process of its own (what the test checks is the healed sweep): it
    # runs here, on the session's Ray, with the same flags.
    assert run_sweep("stage1", _cmd(tmp_path / "uninterrupted", "ref", *extra)[2:]) == 0
    command = _cmd(tmp_path, "healed", *extra, "--resume", "auto")
    results = tmp_path / "runs" / "healed"

    def steps_done() -> int:
        return sum(len(f.read_text().splitlines()) for f in results.glob("*/result.json")) if results.is_dir() else 0

    proc = _start(command)  # 1: killed at a random moment of the start-up (before the manifest, as it happens)
    time.sleep(rng.uniform(0.2, 3.0))
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc = _start(command)  # 2: killed at a random moment among the training steps
    _wait_for(lambda: steps_done() >= 1, proc)
    # A second driver of the same sweep meanwhile (a zombie's replacement, a person's --resume)
    # is refused in one line naming the holder, and touches nothing.
    intruder = subprocess.run(_cmd(tmp_path, "healed", "--resume"), capture_output=True, text=True, timeout=120,
                              env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert intruder.returncode == 2 and f":{proc.pid} " in intruder.stderr and "being run by" in intruder.stderr, intruder.stderr
    time.sleep(rng.uniform(0.0, 1.0))
    assert proc.poll() is None and steps_done() < 2 * steps
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    _assert_complete(tmp_path, "healed", steps=steps)
    assert _summary_values(tmp_path / "runs" / "healed") == _summary_values(tmp_path / "uninterrupted" / "runs" / "ref")
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert again.returncode == 0 and again.stdout.count("\n") == 1 and "nothing to do" in again.stdout, again.stdout


@pytest.mark.slow
def test_sigterm_to_the_drivers_process_group_checkpoints_the_trials_and_exits_143_in_the_grace_period(tmp_path):
    """A preemption notice as a batch system or a shell sends it, to the whole process group
    of a driver started by a script: the trials checkpoint after their current step, the sweep
    says how to continue and exits 143 ("resume me") in well under its grace period, and the
    same command with --resume auto finishes it, every step once."""
    steps = INTERRUPTED_STEPS  # enough of them that the signal finds the trials training
    command = _cmd(tmp_path, "preempted", "--seeds", "0", "--set", f"steps={steps}", "--resume", "auto")
    results = tmp_path / "runs" / "preempted"
    # The driver as a batch script's child: its process group is the script's (a wrapper that
    # outlives the SIGTERM to report the driver's exit status).
    wrapper = ("import signal, subprocess, sys\n"
               "signal.signal(signal.SIGTERM, lambda *a: None)\n"
               "print('EXIT', subprocess.call(sys.argv[1:]), flush=True)\n")
    script = subprocess.Popen([sys.executable, "-c", wrapper, *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    _wait_for(lambda: results.is_dir() and any(f.read_text() for f in results.glob("*/result.json")), script)
    t0 = time.monotonic()
    os.killpg(script.pid, signal.SIGTERM)
    out, _ = script.communicate(timeout=60)
    assert time.monotonic() - t0 < 30, "the driver did not exit within 30 s of the SIGTERM"
    assert "EXIT 143" in out and "Continue with:" in out, out[-2000:]
    manifest = json.loads((results / MANIFEST).read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(manifest["parent_run_id"]).info.status == "KILLED"
    assert "finished" not in manifest
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    _assert_complete(tmp_path, "preempted", steps=steps)


def test_a_start_killed_while_it_creates_a_new_stores_schema_leaves_no_half_made_store(tmp_path):
    """MLflow's first schema is some 50 migrations, not one transaction: a kill among them used
    to leave a file no MLflow could open again ("duplicate column name"). The schema is now
    made beside the store and renamed into place: after a kill mid-creation there is no store
    or a whole one, and the next start makes it and removes the stray file."""
    from pact_ray.tracking.store import CREATING, prepare_store

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    # No schema template: the store is made by the migrations, slowly enough to be killed among them.
    env = {**os.environ, "PACT_RAY_SCHEMA_CACHE": str(tmp_path / "no-template-yet")}
    proc = subprocess.Popen([sys.executable, "-c", f"from pact_ray.tracking.store import prepare_store; prepare_store({uri!r})"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    def staging() -> bool:  # the schema is being made beside the store
        for p in tmp_path.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if CREATING in p.name and p.stat().st_size > 0:
                    return True
        return False

    _wait_for(staging, proc, timeout=60)
    proc.kill()
    proc.wait()
    assert not db.exists() or ("runs",) in sqlite3.connect(db).execute("select name from sqlite_master").fetchall()
    prepare_store(uri)
    assert [p.name for p in tmp_path.iterdir() if CREATING in p.name] == []
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("after-the-kill")).info.run_id
    client.log_metric(run, "loss", 1.0, step=1)
    assert client.get_metric_history(run, "loss")[0].value == 1.0


def test_a_new_store_never_replaces_one_made_meanwhile_outside_the_lock(tmp_path, monkeypatch):
    """Another program (an `mlflow ui` on the same path, say) may create the store while ours
    is made beside it: that store stands, and ours is dropped."""
    import mlflow.store.tracking.sqlalchemy_store as sqlalchemy_store

    from pact_ray.tracking.store import CREATING, prepare_store

    db = tmp_path / "mlflow.db"
    real = sqlalchemy_store.SqlAlchemyStore

    class MadeMeanwhile(real):
        def __init__(self, uri, *args, **kwargs):
            super().__init__(uri, *args, **kwargs)
            if not db.exists():
                with sqlite3.connect(db) as con:
                    con.execute("create table theirs (x)")

    monkeypatch.setattr(sqlalchemy_store, "SqlAlchemyStore", MadeMeanwhile)
    prepare_store(f"sqlite:///{db}")
    with sqlite3.connect(db) as con:
        assert con.execute("select name from sqlite_master").fetchall() == [("theirs",)]
    assert [p.name for p in tmp_path.iterdir() if CREATING in p.name] == []


_KILLED_MID_WRITE = """
import os, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("create table t (x blob)")
con.execute("begin")
for _ in range(500):
    con.execute("insert into t values (randomblob(1000))")
con.execute("commit")
con.execute("pragma cache_size=1")  # the transaction below spills into the file: the journal is hot
con.execute("begin")
con.execute("delete from t")
for _ in range(100):
    con.execute("insert into t values (randomblob(10000))")
os.kill(os.getpid(), 9)
"""


def test_a_store_left_mid_write_by_a_kill_is_rolled_back_not_refused(tmp_path):
    """A driver killed while MLflow writes leaves a hot journal beside the SQLite file. The
    resume's store check rolls it back, as any SQLite client does on its first read, instead of
    calling the file "not an SQLite database"; the committed rows are what is left."""
    from pact_ray.tracking.store import check_tracking_uri

    db = tmp_path / "mlflow.db"
    killed = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(db)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    journal = db.with_name(db.name + "-journal")
    assert journal.exists() and journal.stat().st_size > 0
    uri = f"sqlite:///{db}"
    assert check_tracking_uri(uri) == uri
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*), min(length(x)) from t").fetchone() == (500, 1000)
    assert not journal.exists() or journal.stat().st_size == 0


def test_a_start_killed_before_the_manifest_names_its_parent_run_adopts_that_run(tmp_path, monkeypatch):
    """The window between creating the parent run and recording its id in the manifest: the
    resume finds the run by the manifest's uid instead of leaving it orphaned beside a new one."""
    from types import SimpleNamespace

    import pact_ray.tune.prepare as prepare
    from pact_ray.kinds import get_kind
    from pact_ray.tune.storage import open_storage

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    folder = tmp_path / "runs" / "k"
    folder.mkdir(parents=True)
    args = SimpleNamespace(profile="smoke", model="tiny", search="grid", variants="baseline", seeds="0", until_conclusive=0,
                           cpus_per_trial=1, gpus_per_trial=0)
    plan = SimpleNamespace(kind=get_kind("stage1"), args=args, name="k", store=open_storage(str(folder)))
    manifest = {"kind": "stage1", "name": "k", "experiment_id": None, "parent_run_id": None, "uid": "0123abcd"}

    def killed(*_a, **_k):
        raise KeyboardInterrupt  # stands in for the SIGKILL: nothing after create_parent runs

    monkeypatch.setattr(prepare, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare.open_sweep(plan, client, dict(manifest))
    monkeypatch.undo()
    experiment_id, parent_id = prepare.open_sweep(plan, client, dict(manifest))
    parents = client.search_runs([experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'")
    assert [p.info.run_id for p in parents] == [parent_id]
    assert json.loads((folder / MANIFEST).read_text())["parent_run_id"] == parent_id


@pytest.mark.slow
def test_ctrl_c_checkpoints_exits_130_and_resume_finishes(tmp_path):
    steps = INTERRUPTED_STEPS
    proc = _start(_cmd(tmp_path, "c", "--set", f"steps={steps}"))
    runs = tmp_path / "runs" / "c"
    _wait_for(lambda: sum(len(p.read_text().splitlines()) for p in runs.glob("*/result.json")) >= 6, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_INTERRUPTED, out[-2000:]
    assert "Continue with: " in out and "--name c" in out and "--resume" in out and "Traceback" not in out
    manifest = json.loads((runs / MANIFEST).read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(manifest["parent_run_id"]).info.status == "KILLED"
    rows = json.loads((runs / "summary" / "ablation_summary.json").read_text())
    assert {r["status"] for r in rows} == {"interrupted"} and all(r["steps"] < steps for r in rows)
    assert all(list(folder.glob("checkpoint_*")) for folder in runs.glob("*_s0_*"))  # stopped with a checkpoint
    # A stopped trial is not retried (each retry would start a worker only to stop again), and
    # the stop does not use up its retries (--max-failures, 2 by default), which a resume keeps.
    assert [p.read_text().count("Failure #") for p in runs.glob("*/error.txt")] == [1, 1]
    assert _trial_states(runs) == [("ERROR", 0)] * 2  # (status, failures counted)
    done = _resume(tmp_path, "c")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    _assert_complete(tmp_path, "c", steps=steps)
    assert _trial_states(runs, "max_failures") == [("TERMINATED", 2)] * 2  # the retries are back after the resume


def _trial_states(exp_dir: Path, field: str = "num_failures") -> list[tuple[str, int]]:
    """Each trial's status and ``field`` (of its run metadata, or of the trial) in Ray's newest experiment state."""
    state = json.loads(max(exp_dir.glob("experiment_state-*.json")).read_text())
    out = []
    for trial_json, meta_json in state["trial_data"]:
        trial, meta = json.loads(trial_json), json.loads(meta_json)
        out.append((trial["status"], meta[field] if field in meta else trial[field]))
    return sorted(out)


@pytest.mark.slow
def test_a_full_disk_ends_in_one_line_and_resume_finishes_after_freeing_space(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        filler = disk / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=33"], check=True, capture_output=True)
        # 7 MiB left, and each trial's checkpoint takes 4.8 MiB: the second of the two trials fills the disk.
        # A lease renewed every 0.25 s fails to write on the full disk while the driver winds down:
        # its warnings must come before the one-line error, not after it (as they once did in CI).
        full = subprocess.run(_cmd(tmp_path, "d", "--seeds", "0", storage=disk / "runs"), capture_output=True, text=True,
                              timeout=400, env={**os.environ, "RAY_AUTH_MODE": "disabled", TTL_ENV: "1"})
        assert full.returncode == EXIT_DISK_FULL, full.stdout[-2000:]
        error = full.stderr.strip().splitlines()[-1]
        assert error.startswith("error: the storage ") and "is full" in error and "--resume" in error
        filler.unlink()
        done = _resume(tmp_path, "d", storage=disk / "runs")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        _assert_complete(tmp_path, "d", runs_dir=disk / "runs", trials=2)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ------------------------------------------------------------------ start-up checks

def _create_store_and_experiment(uri: str, barrier) -> str:
    from pact_ray.tracking.store import ensure_experiment, prepare_store

    barrier.wait()
    prepare_store(uri)
    return ensure_experiment(MlflowClient(uri), "pact-ray/stage1_router")


def test_state_files_are_read_as_ray_writes_them(tmp_path):
    """Ray pickles the search algorithm's state, basic-variant-state-*.json included; only
    experiment_state-*.json is JSON. A whole file of either kind is readable, a cut one is
    not, and repair puts the last good copy back."""
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.utils.util import _atomic_save

    from pact_ray.tune.state import backup, readable, repair

    _atomic_save(BasicVariantGenerator().get_state(), str(tmp_path), "basic-variant-state-s.json", "tmp")
    (tmp_path / "experiment_state-s.json").write_text(json.dumps({"trial_data": [], "runner_data": {}}))
    assert backup(tmp_path) == 2  # both readable, both copied
    for name in ("basic-variant-state-s.json", "experiment_state-s.json"):
        path = tmp_path / name
        assert readable(path), name
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        assert not readable(path)
        assert f"restored {name} from its last good copy" in repair(tmp_path)
        assert path.read_bytes() == whole


def test_concurrent_first_use_of_one_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(4)
    with ctx.Pool(4) as pool:
        ids = pool.starmap(_create_store_and_experiment, [(uri, barrier)] * 4)
    assert len(set(ids)) == 1  # one experiment, every process found it
    with sqlite3.connect(tmp_path / "new.db") as con:
        assert con.execute("select count(*) from experiments where name = 'pact-ray/stage1_router'").fetchone()[0] == 1


@pytest.mark.slow
@pytest.mark.parametrize("extra, fragment", [
    (["--cpus-per-trial", "1000"], "--cpus-per-trial 1000 asks for more CPUs than"),
    (["--gpus-per-trial", "1"], "--gpus-per-trial 1 asks for more GPUs than"),
    (["--address", "127.0.0.1:9"], "--address 127.0.0.1:9: no Ray cluster answers there"),
])
def test_impossible_requests_fail_before_anything_is_created(tmp_path, ray_address, capsys, extra, fragment):
    started = time.time()
    rc = run_sweep("stage1", ["--model", "tiny", "--profile", "smoke", "--name", "x", "--storage-path", str(tmp_path / "runs"),
                              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and fragment in err and "\n" not in err, err
    assert time.time() - started < 60
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


# ------------------------------------------------------------------ the tracking store

@pytest.mark.slow
def test_a_store_that_stays_down_ends_the_sweep_in_bounded_time_and_resume_replays(tmp_path, ray_address, monkeypatch, capsys):
    from pact_ray.tracking.server import start_server
    from pact_ray.tune import finish

    monkeypatch.setattr(finish, "FLUSH_TIMEOUT_S", 5.0)
    store = tmp_path / "tracking"
    server = start_server(store)
    port = int(server.uri.rsplit(":", 1)[1])
    db = store / "mlflow.db"

    def logged_steps() -> int:
        with sqlite3.connect(db) as con:
            return con.execute("select count(*) from metrics where key = 'loss'").fetchone()[0]

    import threading

    def outage():
        while True:
            try:
                if logged_steps() >= 3:
                    break
            except sqlite3.Error:
                pass
            time.sleep(0.1)
        server.stop()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    args = ["--model", "tiny", "--profile", "quick", "--seeds", "0", "--variants", "baseline", "--name", "down", "--storage-path",
            str(tmp_path / "runs"), "--tracking-uri", server.uri, "--quiet", "--set", "steps=60"]
    started = time.time()
    rc = run_sweep("stage1", args)
    out = capsys.readouterr().out
    assert rc == EXIT_UNSENT, out[-2000:]
    assert "did not reach" in out and "--resume" in out and time.time() - started < 240
    again = start_server(store, port=port)
    try:
        rc = run_sweep("stage1", ["--name", "down", "--storage-path", str(tmp_path / "runs"), "--resume", "--quiet"])
        assert rc == 0
        client = MlflowClient(again.uri)
        [run] = client.search_runs([client.get_experiment_by_name("pact-ray/stage1_router").experiment_id],
                                   filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 61))
        assert run.info.status == "FINISHED"
    finally:
        again.stop()


def test_the_server_wrapper_refuses_a_busy_port_and_bad_flags_before_creating_anything(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "pact_ray.tracking.server", "--store", str(tmp_path / "s1"), "--port", str(port)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and f"port {port}" in out.stderr and "in use" in out.stderr
        assert not (tmp_path / "s1").exists()
    out = subprocess.run([sys.executable, "-m", "pact_ray.tracking.server", "--store", str(tmp_path / "s2"), "--port", "-1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--port must be in 1..65535" in out.stderr and not (tmp_path / "s2").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_server_wrapper_stops_its_workers_on_sigterm(tmp_path, sig):
    """Stopped (SIGTERM) or killed outright (SIGKILL, which it cannot catch), the wrapper leaves
    no mlflow server running: its port is free for the next start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pact_ray.tracking.server", "--store", str(tmp_path / "s"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert "serving" in proc.stdout.readline()
        # The wrapper starts `mlflow server` in a session of its own, under a reaper that leads it
        # (a Ctrl-C in the wrapper's terminal reaches only the wrapper, which stops it): the
        # process group is the reaper's pid.
        [server] = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        group = subprocess.run(["pgrep", "-g", server], capture_output=True, text=True).stdout.split()
        assert len(group) > 1  # mlflow server and its workers
        proc.send_signal(sig)
        proc.wait(timeout=60)
        deadline = time.time() + 30
        while subprocess.run(["pgrep", "-g", server], capture_output=True).returncode == 0 and time.time() < deadline:
            time.sleep(0.2)
        assert subprocess.run(["pgrep", "-g", server], capture_output=True).returncode != 0  # none left
        with socket.socket() as s:
            # The port is free again: a new server can listen on it. SO_REUSEADDR, as servers set
            # it (uvicorn does): the closed connections' TIME_WAIT entries must not count, while
            # a socket still listening there would still make the bind fail.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_the_server_wrapper_stops_cleanly_on_a_second_ctrl_c(tmp_path):
    """Two SIGINTs in a row (a second Ctrl-C, or `timeout` passing one on) stop the server once,
    without a traceback, and leave none of its processes."""
    port = free_port()
    # SIGINT at its default in the wrapper whatever this test inherited: a shell that runs the
    # suite as a background job (`make test &`) ignores SIGINT, an ignored signal stays ignored
    # across exec, and Python keeps it so: the wrapper would never see this test's Ctrl-C.
    proc = subprocess.Popen([sys.executable, "-m", "pact_ray.tracking.server", "--store", str(tmp_path / "s"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert "serving" in proc.stdout.readline()
        [server] = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)  # the wrapper is stopping the server now
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in out, out
        deadline = time.time() + 30
        while subprocess.run(["pgrep", "-g", server], capture_output=True).returncode == 0 and time.time() < deadline:
            time.sleep(0.2)
        assert subprocess.run(["pgrep", "-g", server], capture_output=True).returncode != 0  # none left
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_the_server_wrapper_starts_no_job_runner_unless_asked(tmp_path, monkeypatch):
    """MLflow's job runner (huey consumers for GenAI jobs) is not started: the server is the CLI
    and its one uvicorn worker (under the wrapper's reaper), and it tracks runs. With MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true
    in the environment the runner starts (which also shows that the check above can fail)."""
    from pact_ray.tracking.server import start_server

    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    with start_server(tmp_path / "plain") as server:
        time.sleep(1)  # `mlflow server` launches the runner right after its web server
        commands = group_commands(server.process.pid)
        # The reaper that ties the server to the wrapper (pact_ray.tracking.server), the CLI, one worker.
        assert len(commands) == 3 and not [c for c in commands if "mlflow.server.jobs" in c or "huey" in c], commands
        client = MlflowClient(server.uri)
        run = client.create_run(client.create_experiment("jobs-off")).info.run_id
        client.log_metric(run, "loss", 1.5, step=1)
        assert [m.value for m in client.get_metric_history(run, "loss")] == [1.5]

    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")
    with start_server(tmp_path / "asked") as server:
        deadline = time.time() + 60
        while not any("mlflow.server.jobs" in c for c in group_commands(server.process.pid)):
            assert time.time() < deadline, "the job runner asked for never started"
            time.sleep(0.25)


# The "Open the UI" command a sweep prints serves the store's runs and starts no job runner (as
# printed before, it started one: 8 more processes, 1.8 GB): tests/test_printed_commands.py runs
# it as a sweep prints it and checks both.


def test_a_store_prepared_while_ray_starts_is_removed_when_the_sweep_is_refused(tmp_path):
    """The SQLite schema is created in a thread while a local Ray starts (the trials fit this
    machine by os's count); if Ray's own resource check then refuses the sweep, the files that
    preparation created are removed, so a refused sweep leaves nothing behind."""
    from types import SimpleNamespace

    from pact_ray.tune.prepare import StorePreparation

    db = tmp_path / "mlflow.db"
    from pact_ray.kinds import STAGE1
    from pact_ray.runs.stage1 import Stage1RunConfig

    plan = SimpleNamespace(tracking_uri=f"sqlite:///{db}", args=SimpleNamespace(verbose=False),
                           configs=[(STAGE1, Stage1RunConfig.for_variant("baseline", "smoke", "tiny", 0))])
    early = StorePreparation(plan, early=True)
    early.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="Ray did not start"):  # any failure while Ray starts or checks
        with StorePreparation(plan, early=True).undone_on_error():
            raise RuntimeError("Ray did not start")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    kept = StorePreparation(plan, early=True)
    kept.wait()
    tables = sqlite3.connect(db).execute("select name from sqlite_master where type = 'table'").fetchall()
    assert ("runs",) in tables and ("experiments",) in tables
    existing = StorePreparation(plan, early=True)
    existing.undo()  # a store that was there before is never removed
    assert db.exists()
