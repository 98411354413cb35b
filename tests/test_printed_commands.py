"""Every kind of command a sweep prints runs as printed: from the project folder, in a fresh
shell with no virtualenv on PATH (``env -i HOME=... PATH=/usr/bin:/bin bash -c "<command>"``).

One small world-model Optuna sweep gives them all: interrupted (Ctrl-C while its summary is
written) it prints the resume command; the resume, run as printed, finishes it and prints the
evaluation report command, the optuna-dashboard command and the MLflow UI command with the
link to the sweep's own runs. The report runs to completion; the two servers start on their
printed ports, answer, show the sweep, and are stopped. The MLflow UI starts no job runner (as
printed before, it started one: 8 more processes, 1.8 GB).

The sweep is also the test of --search optuna over the world model's own knobs (no router
prefix), through the shared harness: its two trials try two values of the variant's knob.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import group_commands
from mlflow.tracking import MlflowClient

from pact_ray.runs.world_model import WM_VARIANTS
from pact_ray.tracking.tags import OPTUNA_STATE_TAG, ROLE_TAG, SWEEP_NAME_TAG
from pact_ray.tune.manifest import MANIFEST
from pact_ray.tune.sweep import EXIT_INTERRUPTED, run_sweep

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def clean_shell(command: str, home: Path) -> list[str]:
    """``command`` in a fresh bash with nothing of this environment: no venv on PATH, no PYTHONPATH."""
    return ["env", "-i", f"HOME={home}", "PATH=/usr/bin:/bin", "bash", "-c", command]


def run_clean(command: str, home: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(clean_shell(command, home), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90) -> bytes:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the server exited ({proc.returncode}) before answering"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return r.read()
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


class Server:
    """A printed server command, started as printed (in its own process group) and stopped."""

    def __init__(self, command: str, home: Path):
        self.proc = subprocess.Popen(clean_shell(command, home), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def test_every_printed_command_runs_as_printed_in_a_clean_shell(tmp_path, ray_address, monkeypatch, capsys):
    home = tmp_path / "home"  # a fresh home too: nothing cached from this session helps
    home.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--profile", "smoke", "--model", "tiny", "--search", "optuna", "--variant", "mae", "--num-samples", "2",
            "--name", "printed", "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri, "--quiet"]

    def ctrl_c(*a, **k):  # Ctrl-C while the summary is written: every trial has finished
        raise KeyboardInterrupt

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("pact_ray.tune.finish.write_summary", ctrl_c)
    assert run_sweep("world_model", args) == EXIT_INTERRUPTED
    monkeypatch.undo()
    err = capsys.readouterr().err
    resume = re.search(r"Continue with: (.*)", err).group(1)
    assert resume.endswith("--resume") and not resume.startswith("python ")

    # The resume, as printed: it summarises the finished sweep and prints the other commands.
    done = run_clean(resume, home, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "Sweep printed: 2/2 trials finished, 0 errored" in out, out
    report = re.search(r"^  (\S+ analysis/eval_report\.py .*)$", out, re.M).group(1)
    dashboard = re.search(r"^Optuna study: (.*)$", out, re.M).group(1)
    ui = re.search(r"^Open the UI:  ((?:.*\\\n)+.*)$", out, re.M).group(1)  # on continued lines, one command
    link = re.search(r"^ +then open the runs of this sweep: (\S+)$", out, re.M).group(1)

    # The evaluation report, to completion.
    out_dir = ROOT / re.search(r"--out (\S+)", report).group(1)
    assert not out_dir.exists()
    try:
        made = run_clean(report, home, timeout=300)
        assert made.returncode == 0, made.stdout + made.stderr
        assert (out_dir / "report.html").is_file() and (out_dir / "report.md").is_file()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            out_dir.parent.rmdir()  # reports/ when this made it

    # The MLflow UI on the printed port; the printed link filters the experiment to this sweep.
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("pact-ray/mae_world_model").experiment_id
    client.create_run(experiment, run_name="another sweep", tags={SWEEP_NAME_TAG: "another"})
    port = int(re.search(r"--port (\d+)", ui).group(1))
    page = urllib.parse.urlsplit(link)
    assert page.port == port and page.fragment.startswith(f"/experiments/{experiment}/runs?searchFilter=")
    search = urllib.parse.parse_qs(page.fragment.split("?", 1)[1])["searchFilter"][0]
    with Server(ui, home) as server:
        wait_http(f"http://127.0.0.1:{port}/health", server.proc)
        time.sleep(2)  # the job runner would start right after the web server
        commands = group_commands(server.proc.pid)
        assert commands and not [c for c in commands if "mlflow.server.jobs" in c or "huey" in c], commands
        assert b"<html" in wait_http(f"http://127.0.0.1:{port}/", server.proc).lower()
        served = MlflowClient(f"http://127.0.0.1:{port}")
        runs = served.search_runs([experiment], filter_string=search)
        assert len(served.search_runs([experiment])) == 4  # the parent, two trials and another sweep's run
        assert sorted(r.data.tags[ROLE_TAG] for r in runs) == ["sweep", "trial", "trial"]

    # The parent's name starts with the sweep's short id; the trials carry only what describes them.
    manifest = json.loads((tmp_path / "runs" / "printed" / MANIFEST).read_text())
    [parent] = [r for r in runs if r.data.tags[ROLE_TAG] == "sweep"]
    assert parent.info.run_name == f"{manifest['uid'][:6]} printed" and parent.data.tags[SWEEP_NAME_TAG] == "printed"
    trials = {r.info.run_id: r for r in runs if r.data.tags[ROLE_TAG] == "trial"}
    for r in trials.values():
        assert not [k for k in r.data.params if k.startswith("fail_")] and "lr" in r.data.params
        assert all(v != "" for v in r.data.tags.values()) and "error" not in r.data.tags
        assert r.data.tags[OPTUNA_STATE_TAG] == "complete"
    knob = WM_VARIANTS["mae"].knobs[0]  # the world model's own knob, with no router prefix
    assert len(trials) == 2 and len({r.data.params[knob] for r in trials.values()}) == 2

    # optuna-dashboard on the printed port, serving the study, whose trials link their runs.
    import optuna

    study = optuna.load_study(study_name="printed", storage=f"sqlite:///{tmp_path / 'runs' / 'printed' / 'optuna.db'}")
    assert study.user_attrs["sweep"] == "printed" and study.user_attrs["metric"] == "val_mse"
    for t in study.trials:
        assert t.user_attrs["mlflow_run_id"] in trials
        assert t.user_attrs["mlflow_run_url"].endswith(f"/#/experiments/{experiment}/runs/{t.user_attrs['mlflow_run_id']}")
    # As Stage1 sweeps say, with the venv's optuna-dashboard by absolute path.
    db = tmp_path / "runs" / "printed" / "optuna.db"
    assert dashboard.startswith(f"{Path(sys.executable).parent / 'optuna-dashboard'} sqlite:///{db} --host 127.0.0.1"), dashboard
    port = int(re.search(r"--port (\d+)", dashboard).group(1))
    with Server(dashboard, home) as server:
        studies = json.loads(wait_http(f"http://127.0.0.1:{port}/api/studies", server.proc))
        assert [s["study_name"] for s in studies["study_summaries"]] == ["printed"]
