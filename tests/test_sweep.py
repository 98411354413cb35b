"""Real sweeps through Ray Tune with the SQLite MLflow store (tiny preset, smoke/quick profiles)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pact_ray.report.summary import ALL_COLUMNS, COLUMNS, JSON_NAME
from pact_ray.runs.registry import STAGE1_VARIANTS
from pact_ray.runs.stage1 import Stage1RunConfig
from pact_ray.tracking.tags import CHECKPOINT_TAG, STEP_TAG, SWEEP_TAG, TRIAL_TAG
from pact_ray.tune.manifest import MANIFEST
from pact_ray.tune.sweep import run_sweep

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "stage1_router.py"


def sweep_args(tmp_path: Path, name: str, *extra: str, quiet: bool = True) -> list[str]:
    return ["--model", "tiny", "--name", name, "--storage-path", str(tmp_path / "runs"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *(["--quiet"] if quiet else []), *extra]


def child_runs(tmp_path: Path, name: str):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    manifest = json.loads((tmp_path / "runs" / name / MANIFEST).read_text())
    runs = client.search_runs([manifest["experiment_id"]], filter_string=f"tags.`{SWEEP_TAG}` = '{manifest['parent_run_id']}'")
    return client, manifest, runs


def test_smoke_sweep_of_every_variant(tmp_path, ray_address, capsys):
    rc = run_sweep("stage1", sweep_args(tmp_path, "smoke-all", "--profile", "smoke", quiet=False))
    out = capsys.readouterr().out
    assert rc == 0, out
    # The terminal: our progress lines and the summary, no Ray boxes, no escape codes off a terminal.
    assert len(out.splitlines()) <= 80 and "\x1b[" not in out and "Configuration for experiment" not in out
    assert max(len(line) for line in out.splitlines()) <= 160
    assert all(f"{v} s0" in out for v in STAGE1_VARIANTS) and "trials done" in out
    client, manifest, runs = child_runs(tmp_path, "smoke-all")
    assert sorted(r.data.tags["variant"] for r in runs) == sorted(STAGE1_VARIANTS)
    assert sorted(r.info.run_name for r in runs) == sorted(f"{v} s0" for v in STAGE1_VARIANTS)  # distinct at a glance
    parent = client.get_run(manifest["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "smoke-all"
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == manifest["parent_run_id"] and r.data.tags["sweep"] == "smoke-all"
        assert {"variant", "phase", "profile", "note", "git_commit", "seed", "model"} <= set(r.data.tags) and r.data.tags[TRIAL_TAG]
        assert r.data.params["variant"] == r.data.tags["variant"] and r.data.params["model"] == "tiny"
        assert "step" not in r.data.metrics and r.data.tags[STEP_TAG] == "1" and "loss" in r.data.metrics
        routed = STAGE1_VARIANTS[r.data.tags["variant"]].router is not None
        assert ("gate" in r.data.metrics) == routed
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["config.json"]
        [dataset] = r.inputs.dataset_inputs  # the Dataset column: name, digest, source
        assert dataset.dataset.name and len(dataset.dataset.digest) == 8 and dataset.dataset.source_type == "local"
        assert Path(r.data.tags[CHECKPOINT_TAG]).is_dir()
    # The parent: the summary as artifacts, the verdicts as its description, headline numbers as metrics.
    summary_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/index.html", "summary/ablation_summary.csv", "summary/route_status.json"} <= summary_artifacts
    assert "| setting | variant | metric | step |" in parent.data.tags["mlflow.note.content"]
    assert parent.data.metrics["trials_finished"] == len(STAGE1_VARIANTS) and parent.data.metrics["trials_errored"] == 0
    # The summary files hold one row per trial, matching MLflow.
    rows = json.loads((tmp_path / "runs" / "smoke-all" / "summary" / JSON_NAME).read_text())
    assert len(rows) == len(STAGE1_VARIANTS) and list(rows[0]) == ALL_COLUMNS
    by_id = {r.info.run_id: r for r in runs}
    for row in rows:
        run = by_id[row["mlflow_run_id"]]
        assert row["loss"] == run.data.metrics["loss"]  # the same float64 MLflow holds
        assert row["steps"] == 1 and row["status"] == "finished" and row["phase"] == STAGE1_VARIANTS[row["variant"]].phase
        assert (row["gate"] is None) == (row["variant"] == "baseline")
    csv_lines = (tmp_path / "runs" / "smoke-all" / "summary" / "ablation_summary.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[: len(COLUMNS)] == COLUMNS and len(csv_lines) == 1 + len(STAGE1_VARIANTS)
    assert all(row["val_loss"] is not None and row["val_step"] == 1 for row in rows)
    # One seed: no interval, so no verdict and no "best"; the sweep says so.
    assert "Route status (primary metric" in out and "Stage1: intervals only, no verdicts: the smoke profile" in out and "Best" not in out
    assert f"{Path(sys.executable).parent / 'mlflow'} ui --host 127.0.0.1 --port " in out and "--backend-store-uri sqlite:///" in out
    assert "then open the runs of this sweep: http://127.0.0.1:" in out and "runs?searchFilter=tags.sweep+%3D+%27smoke-all%27" in out
    # The UI command (its environment on a continued line of its own) is one command to paste.
    from pact_ray.tracking.store import ui_command

    printed = out.split("Open the UI:  ", 1)[1].split("\n              then ")[0]
    assert " ".join(printed.replace("\\\n", " ").split()) == ui_command(f"sqlite:///{tmp_path / 'mlflow.db'}").split(", then ")[0]
    # On demand, from the tracking store alone: the same table.
    from analysis.summarize import main as summarize

    assert summarize(["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", "pact-ray/stage1_router",
                      "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "ablation_summary.csv").read_text() == "\n".join(csv_lines) + "\n"


def test_optuna_search_with_asha_and_persistent_study(tmp_path, ray_address, capfd):
    import optuna

    # Three steps, validation at the last only: the steps before report no val_loss, Optuna's objective.
    rc = run_sweep("stage1", sweep_args(tmp_path, "opt", "--profile", "smoke", "--search", "optuna", "--variant", "rgb_edge",
                                        "--num-samples", "3", "--scheduler", "asha", "--set", "router.iterations=20",
                                        "--set", "steps=3"))
    captured = capfd.readouterr()
    out = captured.out
    assert rc == 0, out
    assert "A new study created" not in captured.err  # Optuna's INFO lines only with --verbose
    # One variant tuned, no baseline: one line says so (not a row per configuration, nor "one seed per side").
    assert "Route status: no baseline ran in this sweep, so none of its " in out and "seeds 1/0" not in out
    assert "one seed per side" not in out
    client, _, runs = child_runs(tmp_path, "opt")
    assert len(runs) == 3
    eps = {r.data.params["router.eps"] for r in runs}
    assert len(eps) == 3  # Optuna proposed three different values
    assert {r.data.params["router.iterations"] for r in runs} == {"20"}  # fixed by --set, not searched
    assert len({r.info.run_name for r in runs}) == 3  # "rgb_edge s0 #1", "#2", ...
    db = tmp_path / "runs" / "opt" / "optuna.db"
    study = optuna.load_study(study_name="opt", storage=f"sqlite:///{db}")
    assert len(study.trials) == 3 and all("router.eps" in t.params for t in study.trials)
    # The study names its objective and links each trial to its MLflow run, and the run to the trial.
    assert study.metric_names == ["val_loss"]
    by_run = {r.info.run_id: r for r in runs}
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == set(by_run)
    for t in study.trials:
        assert by_run[t.user_attrs["mlflow_run_id"]].data.tags["pact_ray.optuna_trial"] == str(t.number)
    # A trial ASHA stopped before step 3 has no value at step 3: Optuna holds it as pruned, not
    # as a value from another step, and the best is the best of the trials validated at step 3.
    steps = {t.number: max(m.step for m in client.get_metric_history(t.user_attrs["mlflow_run_id"], "loss")) for t in study.trials}
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(steps[t.number] == 3 for t in done)
    assert all(t.state == optuna.trial.TrialState.PRUNED and steps[t.number] < 3 for t in study.trials if t not in done)
    stopped = f" ({3 - len(done)} stopped early or failed)" if len(done) < 3 else ""
    best = min(t.value for t in done)
    assert f"Optuna best of {len(done)} trial{'s' * (len(done) != 1)} at step 3{stopped}: router.eps=" in out
    assert f"-> val_loss {best:.6g}" in out and f"optuna-dashboard sqlite:///{db}" in out
    assert "optuna-dashboard sqlite:///" in (tmp_path / "runs" / "opt" / "summary" / "index.html").read_text()
    # The study starts from the variant's defaults, and the summary compares the best with them.
    defaults = Stage1RunConfig.for_variant("rgb_edge", "smoke", "tiny").flat()
    assert study.trials[0].params["router.eps"] == pytest.approx(defaults["router.eps"])
    assert "the variant's defaults" in out or study.trials[0].state != optuna.trial.TrialState.COMPLETE
    # One seed per trial and no grid sweep of this setting in the store: the seed noise is unknown, and it says so.
    assert "no sweep in this store measured the seed noise" in out
    best_trial = min(done, key=lambda t: t.value)
    confirm = out.split("confirm it against the baseline over seeds: ", 1)[1].splitlines()[0]
    assert confirm.startswith(f"{sys.executable} sweeps/stage1_router.py ")  # the venv's interpreter, by absolute path
    assert "--variants baseline,rgb_edge --seeds 0,1,2" in confirm and f"--set router.eps={best_trial.params['router.eps']}" in confirm
    # It runs as printed in a fresh shell without the venv (here up to parsing its flags: --list-keys then exits).
    checked = subprocess.run(["env", "-i", f"HOME={tmp_path}", "PATH=/usr/bin:/bin", "bash", "-c", f"{confirm} --list-keys"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0 and "router.eps (float" in checked.stdout, checked.stderr
    tagged = [r.info.run_id for r in child_runs(tmp_path, "opt")[2] if r.data.tags.get("pact_ray.optuna_best") == "true"]
    assert tagged == [best_trial.user_attrs["mlflow_run_id"]]
    # ASHA compares trials on the validation metric at its rungs (steps 1 and 2 of 3): every trial validated there.
    for t in study.trials:
        assert {m.step for m in client.get_metric_history(t.user_attrs["mlflow_run_id"], "val_loss")} >= {1}


def test_until_conclusive_adds_seeds_within_the_cap(tmp_path, ray_address, capsys):
    rc = run_sweep("stage1", sweep_args(tmp_path, "adapt", "--profile", "stability", "--variants", "baseline,ot_first",
                                        "--seeds", "0,1", "--until-conclusive", "3", "--set", "steps=3"))  # validation at step 3 only
    out = capsys.readouterr().out
    assert rc == 0, out
    _, _, runs = child_runs(tmp_path, "adapt")
    pairs = [(r.data.tags["variant"], int(r.data.tags["seed"])) for r in runs]
    assert len(pairs) == len(set(pairs))  # no trial ran twice
    seeds = {v: sorted(s for name, s in pairs if name == v) for v in ("baseline", "ot_first")}
    assert seeds["ot_first"][:2] == [0, 1] and len(seeds["ot_first"]) <= 3 and set(seeds["ot_first"]) <= set(seeds["baseline"])
    [entry] = json.loads((tmp_path / "runs" / "adapt" / "summary" / "route_status.json").read_text())
    assert entry["variant"] == "ot_first" and entry["seeds"] == seeds["ot_first"]
    assert entry["verdict_corrected"] != "inconclusive" or len(seeds["ot_first"]) == 3  # settled, or at the cap
    assert entry["design"]["max_seeds"] == 3 and entry["design"]["first_look"] == 2  # the intervals of its looks
    # A smoke run is not meant for verdicts, so it cannot run until they are conclusive.
    assert run_sweep("stage1", sweep_args(tmp_path, "adapt2", "--profile", "smoke", "--variants", "baseline,ot_first",
                                          "--until-conclusive", "3")) == 2
    assert "not meant for conclusions" in capsys.readouterr().err


def _step_counts(db: Path) -> dict[str, list[int]]:
    with sqlite3.connect(db) as con:
        rows = con.execute("select run_uuid, step from metrics where key = 'loss'").fetchall()
    out: dict[str, list[int]] = {}
    for run, step in rows:
        out.setdefault(run, []).append(step)
    return out


def test_sigkilled_sweep_resumes_without_duplicates(tmp_path, ray_address):
    """The driver is killed with SIGKILL mid-sweep; --resume finishes every trial, each step logged once."""
    name = "killed"
    args = sweep_args(tmp_path, name, "--profile", "quick", "--seeds", "0", "--variants", "baseline,ot_first,mask_prior",
                      "--max-concurrent", "1", "--set", "steps=40", "--set", "checkpoint_every=5", "--address", ray_address)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    db = tmp_path / "mlflow.db"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # kill once some trial has logged steps past its first checkpoint
            if db.exists():
                try:
                    counts = _step_counts(db)
                except sqlite3.OperationalError:
                    counts = {}
                if any(max(s) >= 8 for s in counts.values()):
                    break
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(0.5)
        else:
            pytest.fail("the sweep never got going")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _step_counts(db)
    assert len(before) < 3 or any(max(s) < 40 for s in before.values())  # really interrupted

    rc = run_sweep("stage1", sweep_args(tmp_path, name, "--profile", "quick", "--resume"))
    assert rc == 0
    _, manifest, runs = child_runs(tmp_path, name)
    assert len(runs) == 3  # no duplicate child runs
    assert sorted(r.data.tags["variant"] for r in runs) == ["baseline", "mask_prior", "ot_first"]
    counts = _step_counts(db)
    for r in runs:
        assert r.info.status == "FINISHED"
        assert sorted(counts[r.info.run_id]) == list(range(1, 41))  # every step exactly once
    rows = json.loads((tmp_path / "runs" / name / "summary" / JSON_NAME).read_text())
    assert [row["status"] for row in rows] == ["finished"] * 3 and all(row["steps"] == 40 for row in rows)


def test_a_sweep_that_fails_itself_marks_its_runs_failed_and_resumes(tmp_path, ray_address, monkeypatch, capsys):
    """An error of the sweep itself (here Tune's own result check raising, as it once did for a
    searcher's metric) ends the open MLflow runs as FAILED, not RUNNING, says how to continue,
    and --resume then finishes every trial."""
    from ray.tune.execution.tune_controller import TuneController

    seen = []

    def broken(self, result):
        seen.append(result)
        if len(seen) == 3:
            raise ValueError("the result check failed")

    monkeypatch.setattr(TuneController, "_validate_result_metrics", broken)
    args = sweep_args(tmp_path, "fails", "--profile", "smoke", "--variants", "baseline,ot_first", "--set", "steps=4")
    with pytest.raises(Exception, match="the result check failed"):
        run_sweep("stage1", args)
    err = capsys.readouterr().err
    assert "error: the sweep failed (ValueError: the result check failed); its MLflow runs are marked FAILED." in err
    assert "continue with: " in err and "--name fails" in err and err.rstrip().endswith("--resume")
    client, manifest, runs = child_runs(tmp_path, "fails")
    assert client.get_run(manifest["parent_run_id"]).info.status == "FAILED"
    assert runs and all(r.info.status == "FAILED" for r in runs)  # none left RUNNING
    assert all(r.data.tags["error"] == "the sweep failed: ValueError: the result check failed" for r in runs)

    monkeypatch.undo()
    assert run_sweep("stage1", ["--name", "fails", "--storage-path", str(tmp_path / "runs"), "--resume", "--quiet"]) == 0
    client, manifest, runs = child_runs(tmp_path, "fails")
    assert client.get_run(manifest["parent_run_id"]).info.status == "FINISHED"
    assert sorted(r.data.tags["variant"] for r in runs) == ["baseline", "ot_first"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "loss")) == [1, 2, 3, 4]
