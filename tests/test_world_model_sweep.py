"""A real world-model sweep through Ray Tune and the SQLite MLflow store (tiny preset,
smoke profile), then the evaluation report of one of its runs, checked in a headless
browser's screenshot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html import unescape

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pact_ray.metrics import names as M
from pact_ray.report.world_model import ACTION_COLOURS, ARTIFACT_PATH
from pact_ray.tracking.tags import STEP_TAG, SWEEP_TAG, TRIAL_TAG
from pact_ray.tune.manifest import MANIFEST
from pact_ray.tune.sweep import run_sweep

pytestmark = pytest.mark.slow

SPEC_METRICS = [M.VAL_MSE, M.VAL_MSE_VISUAL, M.SSIM, M.PSNR, M.VAL_MSE_MOTOR_STRIP, M.VAL_MSE_STATIC, M.VAL_MSE_DYNAMIC,
                M.MOTOR_POSITION_MAE_MEAN, M.MOTOR_VELOCITY_MAE_MEAN, M.MOTOR_DIRECTION_ACCURACY, M.MOTOR_CONSISTENCY_ERROR,
                M.ACTION_DISCRIMINATION_SCORE, M.MOTOR_DISCRIMINATION_SCORE]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1400,3000"]


def _browser() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _near(img: np.ndarray, hex_colour: str, tol: int = 40) -> int:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img.astype(int) - rgb).max(axis=-1) < tol).sum())


def test_world_model_sweep_and_its_evaluation_report(tmp_path, ray_address, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "runs"
    rc = run_sweep("world_model", ["--profile", "smoke", "--model", "tiny", "--variants", "mae,gpt", "--name", "wm",
                                   "--storage-path", str(storage), "--tracking-uri", uri, "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    # Its own summary: validation metrics, MAE vs GPT on val_mse, the report commands; no OT page, no "best" from losses.
    assert "Best" not in out and "Route status" not in out and "MAE vs GPT (tiny): mae - gpt val_mse" in out
    assert "analysis/eval_report.py --run" in out
    summary = storage / "wm" / "summary"
    assert (summary / "wm_summary.csv").is_file() and not (summary / "route_status.json").exists()
    rows = json.loads((summary / "wm_summary.json").read_text())
    assert sorted(r["variant"] for r in rows) == ["gpt", "mae"] and all(r[M.VAL_MSE] is not None for r in rows)
    assert "MAE vs GPT" in (summary / "index.html").read_text()
    client = MlflowClient(uri)
    manifest = json.loads((storage / "wm" / MANIFEST).read_text())
    assert manifest["kind"] == "world_model" and client.get_experiment(manifest["experiment_id"]).name == "pact-ray/mae_world_model"
    runs = {r.data.tags["variant"]: r for r in client.search_runs([manifest["experiment_id"]],
                                                                   filter_string=f"tags.`{SWEEP_TAG}` = '{manifest['parent_run_id']}'")}
    assert sorted(runs) == ["gpt", "mae"]
    for variant, r in runs.items():
        assert r.info.status == "FINISHED" and r.data.tags["phase"] == {"mae": "iter3", "gpt": "iter2"}[variant]
        assert r.data.params["model_type"] == variant and r.data.params["model"] == "tiny"
        metrics = r.data.metrics
        assert set(SPEC_METRICS) <= set(metrics) and metrics[M.VAL_SAMPLES] == 8
        assert M.STEP not in metrics and r.data.tags[STEP_TAG] == "1"  # the step is a tag, not a metric
        assert {f"motor_position_mae_per_joint.J{j}" for j in range(6)} <= set(metrics)
        assert any(k.startswith("val_mse_action_") for k in metrics) and any(k.startswith("motor_position_mae_action_") for k in metrics)
        assert metrics[M.BEST_VAL_MSE] == metrics[M.VAL_MSE] and (M.TF_FR_GAP in metrics) == (variant == "gpt")

    # The GPT run's checkpoint as an exported artifact (what --profile full does); the MAE's
    # is found in its Ray trial folder.
    gpt_ckpt = sorted((storage / "wm").glob(f"*_{runs['gpt'].data.tags[TRIAL_TAG]}/checkpoint_*"))[-1]
    client.log_artifacts(runs["gpt"].info.run_id, str(gpt_ckpt), "checkpoint")
    notes = tmp_path / "notes.txt"
    notes.write_text("ITERATION 3: Switch to MAE model\n- no autoregressive generation")
    report = tmp_path / "report"
    from analysis.eval_report import main

    # From another folder, with the run id and the tracking URI alone: the run recorded its checkpoint.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(elsewhere)
    torch.set_num_threads(1)  # as the trial ran (one CPU): the very same kernels as at training time
    try:
        rc = main(["--run", runs["mae"].info.run_id, "--compare", runs["gpt"].info.run_id, "--tracking-uri", uri,
                   "--notes", str(notes), "--out", str(report)])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    assert rc == 0, capsys.readouterr().err
    html = (report / "report.html").read_text()
    md = (report / "report.md").read_text()
    for text in (unescape(html), md):
        assert "Evaluation Report: " in text and "ITERATION 3: Switch to MAE model" in text
        assert all(m in text for m in SPEC_METRICS + [M.MOTOR_POSITION_MAE_PER_JOINT])
        assert "Comparison with" in text and "Recommendations" in text and "Error heatmap (jet colormap)" in text
        assert "the same 8 of the" in text and "val_mse matches the run's at that step" in text  # what it scored, and why
    mae_trial = f"_{runs['mae'].data.tags[TRIAL_TAG]}/checkpoint_"
    assert mae_trial in html.split("<h2>")[0]  # the header names the MAE's checkpoint in its trial folder
    images = sorted(p.name for p in (report / "images").iterdir())
    assert images == sorted([f"counterfactual_{i}.png" for i in range(4)] + [f"error_heatmap_{i}.png" for i in range(4)])
    record = json.loads((report / "metrics.json").read_text())
    assert record["run_id"] == runs["mae"].info.run_id and record["previous"][M.TF_FR_GAP] is not None
    # The same samples, weights, batches and threads as at training time: the same val_mse, exactly.
    assert record["metrics"][M.VAL_MSE] == runs["mae"].data.metrics[M.VAL_MSE]
    logged = {a.path for a in client.list_artifacts(runs["mae"].info.run_id, ARTIFACT_PATH)}
    assert {f"{ARTIFACT_PATH}/report.html", f"{ARTIFACT_PATH}/report.md", f"{ARTIFACT_PATH}/images"} <= logged

    browser = _browser()
    if browser is None:
        pytest.skip("no chromium to check the page with (apt-get install -y chromium)")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chrome'}", f"--screenshot={shot}",
                    (report / "report.html").as_uri()], check=True, capture_output=True, timeout=90)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (3000, 1400, 3)
    assert (img.min(axis=-1) < 200).mean() > 0.05  # text, tables and figures, not a blank page
    for colour in ACTION_COLOURS:  # the grids' STAY / MOVE+ / MOVE- rows and labels were drawn
        assert _near(img, colour) > 200, colour
    assert _near(img, "#00007f", tol=60) > 100  # the jet colormap's low end: the error heatmaps loaded


# --search optuna over the world model's own knobs (no router prefix), through the shared
# harness: tests/test_printed_commands.py runs that very sweep (mae, two samples) and checks it,
# with the dashboard command it prints.
