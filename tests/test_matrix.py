"""The OT matrix (sweeps/ot_matrix.py): Stage1 and Stage2 trials in one Ray experiment,
one MLflow parent run and one summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pact_ray.data.objects.synthetic import PRESETS, generate_dataset
from pact_ray.kinds import MATRIX_CELLS, RUN_KINDS, resolve_kind
from pact_ray.runs.stage1 import Stage1RunConfig
from pact_ray.runs.stage2 import Stage2RunConfig
from pact_ray.tune.sweep import run_sweep

MATRIX = RUN_KINDS["matrix"]


def args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["--model", "tiny", "--profile", "smoke", "--name", name, "--storage-path", str(tmp_path / "runs"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet", *extra]


def test_cells_are_the_seed_matrix():
    assert list(MATRIX_CELLS) == [
        "stage1_baseline", "stage1_ot_first", "stage1_mask_prior", "stage1_rgb_edge", "stage1_virtual_patch",
        "stage1_first_third_edge", "stage2_baseline", "stage2_spatial_diag", "stage2_spatial_adapter",
    ]
    assert MATRIX.experiment == "pact-ray/ot_matrix" and set(MATRIX.profiles) == set(RUN_KINDS["stage2"].profiles)
    kind, own = resolve_kind("matrix", {"variant": "stage2_spatial_adapter", "profile": "quick", "model": "tiny", "seed": 1})
    assert kind.name == "stage2" and own == {"variant": "spatial_adapter", "profile": "quick", "model": "tiny", "seed": 1}
    assert resolve_kind("stage1", {"variant": "ot_first"}) == (RUN_KINDS["stage1"], {"variant": "ot_first"})
    # A cell trains with its own kind's config and profile: quick is 3 steps for first-third, 5 for Stage2.
    cfg = MATRIX.config({"variant": "stage1_first_third_edge", "profile": "quick", "model": "tiny"})
    assert isinstance(cfg, Stage1RunConfig) and cfg.steps == 3 and cfg.router is not None
    cfg = MATRIX.config({"variant": "stage2_spatial_diag", "profile": "quick", "model": "tiny"})
    assert isinstance(cfg, Stage2RunConfig) and cfg.steps == 5 and cfg.phase == "matrix"


def test_keys_scoped_to_one_kind():
    tc = {"profile": "official-full", "model": "tiny", "seed": 0, "lr": 3e-4, "stage1.init_checkpoint": "/w/s1.safetensors",
          "stage1.router.eps": 0.2, "stage2.init_checkpoint": "/w/s2.pt", "stage2.max_tokens": 16}
    s1 = MATRIX.config({**tc, "variant": "stage1_ot_first"})
    s2 = MATRIX.config({**tc, "variant": "stage2_spatial_adapter"})
    assert (s1.init_checkpoint, s1.router.eps, s1.lr) == ("/w/s1.safetensors", 0.2, 3e-4)
    assert (s2.init_checkpoint, s2.max_tokens, s2.lr) == ("/w/s2.pt", 16, 3e-4)


@pytest.mark.parametrize("extra,fragment", [
    (["--variants", "stage1_baseline,baseline"], "unknown variant 'baseline'"),
    (["--variants", "stage2_spatial_diag", "--set", "router.eps=0.1"], "unknown stage2 config key 'router.eps'"),
    (["--profile", "official-full", "--variants", "stage2_spatial_adapter"], "needs the Stage2 weights"),
])
def test_bad_matrix_input_is_one_sentence(tmp_path, capsys, extra, fragment):
    try:
        rc = run_sweep("matrix", args(tmp_path, "bad", *extra))
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert not (tmp_path / "runs" / "bad").exists() and not (tmp_path / "mlflow.db").exists()


def test_matrix_data_is_checked_for_every_kind(tmp_path, capsys):
    """One --data folder serves both kinds: a Stage1-only folder fails the Stage2 cells' check."""
    data = tmp_path / "plain"
    generate_dataset(data, 2, seed=0, **PRESETS["tiny"])
    rc = run_sweep("matrix", args(tmp_path, "bad", "--variants", "stage1_baseline,stage2_spatial_diag", "--data", str(data)))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "has no voxel sets" in err and "\n" not in err
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.slow
def test_matrix_smoke_sweep_and_resume(tmp_path, ray_address, capsys):
    from mlflow.tracking import MlflowClient

    from pact_ray.report.summary import JSON_NAME
    from pact_ray.tracking.tags import ROLE_TAG, SWEEP_TAG
    from pact_ray.tune.manifest import MANIFEST

    cells = ["stage1_baseline", "stage1_ot_first", "stage2_spatial_adapter"]
    rc = run_sweep("matrix", args(tmp_path, "m", "--variants", ",".join(cells)))
    out = capsys.readouterr().out
    assert rc == 0, out
    manifest = json.loads((tmp_path / "runs" / "m" / MANIFEST).read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_experiment(manifest["experiment_id"]).name == "pact-ray/ot_matrix"
    parents = client.search_runs([manifest["experiment_id"]], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'")
    assert [p.info.run_id for p in parents] == [manifest["parent_run_id"]]  # one parent run
    runs = client.search_runs([manifest["experiment_id"]], filter_string=f"tags.`{SWEEP_TAG}` = '{manifest['parent_run_id']}'")
    tagged = sorted((r.data.tags["kind"], r.data.tags["variant"]) for r in runs)
    assert tagged == [("stage1", "baseline"), ("stage1", "ot_first"), ("stage2", "spatial_adapter")]
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == manifest["parent_run_id"]
        assert r.data.params["variant"] == r.data.tags["variant"]
    rows = json.loads((tmp_path / "runs" / "m" / "summary" / JSON_NAME).read_text())
    assert [row["run"] for row in rows] == ["Smoke Stage1 baseline · seed 0", "Smoke Stage1 OT first · seed 0",
                                            "Smoke Stage2 spatial adapter · seed 0"]
    for row in rows:
        assert row["status"] == "finished" and row["loss"] is not None
        stage2 = row["kind"] == "stage2"
        assert all((row[c] is not None) == stage2 for c in ("art_l2", "mask_parts", "empty"))
        assert (row["gate"] is not None) == (row["variant"] == "ot_first")
    # A smoke run and no Stage2 baseline cell: no verdict, no "best", and the output says why.
    assert "Best" not in out and "Stage1: intervals only, no verdicts: the smoke profile" in out
    assert "spatial adapter" in out and "no baseline" in out
    assert "No Stage2 baseline ran in this sweep: its Stage2 variants are not compared with one." in out
    assert "No Stage2 variant beats the baseline" not in out  # not "one seed per side": there is no baseline side

    # --resume of the finished matrix: the same experiment, parent and child runs, nothing trained twice.
    rc = run_sweep("matrix", args(tmp_path, "m", "--resume"))
    assert rc == 0
    again = client.search_runs([manifest["experiment_id"]], filter_string=f"tags.`{SWEEP_TAG}` = '{manifest['parent_run_id']}'")
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in runs)
    assert all(len(client.get_metric_history(r.info.run_id, "loss")) == 1 for r in again)


@pytest.mark.slow
def test_matrix_gives_stage2_verdicts_against_its_baseline_cell(tmp_path, ray_address, capsys):
    """The matrix's Stage2 baseline cell: its Stage2 variants get verdicts on Stage2's primary
    metric (the articulation error), spatial_diag reads "identical" (it only logs diagnostics)
    and leaves the family; the flags the output suggests are ones ot_matrix.py accepts."""
    cells = ["stage2_baseline", "stage2_spatial_diag", "stage2_spatial_adapter"]
    rc = run_sweep("matrix", ["--model", "tiny", "--profile", "stability", "--name", "s2", "--storage-path",
                              str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet",
                              "--variants", ",".join(cells), "--seeds", "0,1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    route = {e["variant"]: e for e in json.loads((tmp_path / "runs" / "s2" / "summary" / "route_status.json").read_text())}
    assert set(route) == {"spatial_diag", "spatial_adapter"} and all(e["metric"] == "val_art_l2" for e in route.values())
    assert route["spatial_diag"]["verdict_corrected"] == "identical" and route["spatial_diag"]["delta"] == 0
    assert route["spatial_adapter"]["verdict_corrected"] not in ("no baseline", "no verdict")
    assert route["spatial_adapter"]["corrected_ci_low"] is not None and route["spatial_adapter"]["margin"] > 0
    assert "No Stage2 baseline ran" not in out and "val_art_type_acc" in out
    assert "--until-conclusive" not in out  # ot_matrix.py has no such flag
