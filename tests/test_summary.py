"""Summary rows from MLflow and from Ray's result folders, and the two analysis CLIs
(summarize, compare) with their bad input. Stores are written directly (no Ray)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from example_store import TrialSpec, example_specs, log_example, log_sweep
from mlflow.tracking import MlflowClient

from analysis.compare import main as compare
from analysis.summarize import main as summarize
from pact_ray.metrics import names as M
from pact_ray.report.ablation import collect_results
from pact_ray.report.summary import ALL_COLUMNS, COLUMNS, CSV_NAME, JSON_NAME, collect, collect_rows, fetch_curves, sort_rows
from pact_ray.tune.manifest import MANIFEST


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, list[TrialSpec]]:
    """The example sweeps (every case the report handles) in a SQLite store."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    uri = f"sqlite:///{path}"
    return uri, log_example(uri)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> str:
    """A store with its tables and no experiment of ours."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('empty') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def run_cli(main, args: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = main(args)
    except SystemExit as e:  # argparse
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.strip()


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


def logged_from(row: dict, params: dict[str, str], spec: TrialSpec) -> bool:
    return ((row["kind"], row["profile"], row["variant"], row["seed"]) == (spec.kind, spec.profile, spec.variant, spec.seed)
            and all(params.get(k) == str(v) for k, v in spec.overrides.items()))


def match_rows(data, specs: list[TrialSpec]) -> list[tuple[dict, TrialSpec]]:
    """Pair each summary row with the one spec it was logged from."""
    pairs = []
    for row in data.rows:
        candidates = [s for s in specs if logged_from(row, data.params[row["run_id"]], s)]
        assert len(candidates) == 1, row
        pairs.append((row, candidates[0]))
    return pairs


# ------------------------------------------------------------------- MLflow rows

def test_rows_hold_every_run_with_status_error_and_final_values(store):
    uri, specs = store
    data = collect(uri)
    assert len(data.rows) == len(specs)
    assert all(list(r) == ALL_COLUMNS for r in data.rows)
    assert data.rows == sort_rows(data.rows)
    for row, spec in match_rows(data, specs):
        losses = spec.history[M.LOSS]
        assert row["status"] == spec.status
        assert row["error"] == (spec.error or None)
        assert row["steps"] == len(losses)
        # MLflow stores metric values as float64: what was logged comes back exactly.
        assert row["loss"] == losses[-1]
        for metric in (M.GATE, M.EDGE_DELTA, M.VIRTUAL_MASS, M.ART_L2, M.MASK_PARTS, M.EMPTY):
            expected = spec.history.get(metric)
            assert row[metric] == (expected[-1] if expected else None), metric
        assert data.curves[row["run_id"]] == [(i + 1, v) for i, v in enumerate(losses)]
        assert row["run_id"].startswith(row["experiment"] + "/")
        if spec.phase:  # logged without the registry (a kind this version may not know)
            assert (row["phase"], row["note"]) == (spec.phase, spec.note)
        else:
            assert row["phase"] and row["note"]
    assert {r["status"] for r in data.rows} == {"finished", "errored", "running"}


def test_csv_and_json_leave_values_that_do_not_apply_empty(store, tmp_path, capsys):
    uri, specs = store
    rc, out, _ = run_cli(summarize, ["--tracking-uri", uri, "--out", str(tmp_path / "out")], capsys)
    assert rc == 0 and f"{len(specs)} runs" in out
    with open(tmp_path / "out" / CSV_NAME, newline="") as f:
        table = list(csv.DictReader(f))
    rows = json.loads((tmp_path / "out" / JSON_NAME).read_text())
    assert list(table[0]) == ALL_COLUMNS and list(rows[0])[: len(COLUMNS)] == COLUMNS
    assert len(table) == len(rows) == len(specs)
    for line, row in zip(table, rows):
        assert line["run_id"] == row["run_id"]
        for column in COLUMNS:
            assert (line[column] == "") == (row[column] is None), column
    baseline = next(r for r in rows if r["variant"] == "baseline" and r["kind"] == "stage1")
    assert baseline["gate"] is None and baseline["art_l2"] is None


def test_experiment_filter(store):
    uri, specs = store
    stage1 = collect_rows(uri, ["pact-ray/stage1_router"])
    assert len(stage1) == sum(s.kind == "stage1" for s in specs) and {r["kind"] for r in stage1} == {"stage1"}


def test_client_and_bulk_writers_give_the_same_summary(tmp_path):
    """The benchmark's bulk writer stores exactly what the client (the callback's path) does."""
    specs = [s for s in example_specs() if s.seed == 0 and (s.status != "finished" or s.variant in ("mask_prior", "spatial_diag"))]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def logged(bulk: bool) -> list[tuple]:
        experiment = f"pact-ray/bulk-{bulk}"
        log_sweep(uri, specs, experiment=experiment, bulk=bulk)
        data = collect(uri, [experiment])
        return [({k: v for k, v in r.items() if k not in ("run_id", "mlflow_run_id", "experiment")},
                 data.params[r["run_id"]], data.curves[r["run_id"]]) for r in data.rows]
    assert logged(bulk=False) == logged(bulk=True)


def test_history_methods_agree(store):
    uri, _ = store
    data = collect(uri, curves=False)
    ids = {r["run_id"]: r["mlflow_run_id"] for r in data.rows}
    assert fetch_curves(uri, ids, method="bulk") == fetch_curves(uri, ids, method="threads")
    with pytest.raises(ValueError, match="history method"):
        fetch_curves(uri, ids, method="nope")


# ------------------------------------------------------------- Ray result folders

def write_trial(exp: Path, name: str, config: dict, results: list[dict], error: str = "", torn: bool = False) -> None:
    folder = exp / name
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(config))
    lines = [json.dumps({**r, "config": config}) for r in results]
    (folder / "result.json").write_text("\n".join(lines) + ("\n{\"step\": 9, \"lo" if torn else "\n"))
    if error:
        (folder / "error.txt").write_text(f"Traceback (most recent call last):\n  File \"x.py\", line 1\n{error}\n")


def ray_results(losses: list[float], trial_id: str, gate: float | None = None) -> list[dict]:
    out = []
    for i, loss in enumerate(losses):
        item = {"step": i + 1, "loss": loss, "trial_id": trial_id, "time_total_s": 0.5 * (i + 1), "training_iteration": i + 1}
        if gate is not None:
            item["gate"] = gate
        out.append(item)
    return out


def test_results_folders_without_ray_state(tmp_path):
    """Status from the folders alone: error.txt -> errored, configured steps reached -> finished, else running."""
    exp = tmp_path / "runs" / "sweep-a"
    exp.mkdir(parents=True)
    (exp / MANIFEST).write_text(json.dumps({"kind": "stage1", "name": "sweep-a"}))
    base = {"profile": "smoke", "model": "tiny"}
    write_trial(exp, "baseline_s0_aaaaa_00000", {**base, "variant": "baseline", "seed": 0}, ray_results([1.25], "aaaaa_00000"))
    write_trial(exp, "ot_first_s0_aaaaa_00001", {**base, "variant": "ot_first", "seed": 0}, [], error="RuntimeError: boom at step 1")
    write_trial(exp, "mask_prior_s0_aaaaa_00002", {**base, "profile": "quick", "variant": "mask_prior", "seed": 0},
                ray_results([2.0, 1.5], "aaaaa_00002", gate=-0.5), torn=True)
    (tmp_path / "runs" / "not-a-sweep").mkdir()
    data = collect_results(tmp_path / "runs")  # the storage path: every sweep folder in it
    rows = {r["variant"]: r for r in data.rows}
    assert [r["status"] for r in (rows["baseline"], rows["ot_first"], rows["mask_prior"])] == ["finished", "errored", "running"]
    assert rows["ot_first"]["error"] == "RuntimeError: boom at step 1"
    assert rows["baseline"]["run_id"] == "pact-ray/stage1_router/aaaaa_00000" and rows["baseline"]["loss"] == 1.25
    assert rows["baseline"]["phase"] == "baseline" and rows["mask_prior"]["phase"] == "matrix"
    assert rows["mask_prior"]["steps"] == 2 and rows["mask_prior"]["gate"] == -0.5 and rows["mask_prior"]["wall_s"] == 1.0
    assert data.curves[rows["mask_prior"]["run_id"]] == [(1, 2.0), (2, 1.5)]  # the torn line is skipped
    assert data.params[rows["mask_prior"]["run_id"]]["router.mask_prior"] == "True"
    assert collect_results(exp).rows == data.rows  # the sweep folder itself


def test_results_status_from_ray_experiment_state(tmp_path):
    exp = tmp_path / "sweep-b"
    exp.mkdir()
    (exp / MANIFEST).write_text(json.dumps({"kind": "stage1"}))
    config = {"profile": "smoke", "model": "tiny", "variant": "baseline"}
    states = []
    for i, status in enumerate(("TERMINATED", "ERROR", "PENDING")):
        name = f"baseline_s{i}_bbbbb_0000{i}"
        write_trial(exp, name, {**config, "seed": i}, ray_results([1.0], f"bbbbb_0000{i}"), error="ValueError: x" if status == "ERROR" else "")
        states.append([json.dumps({"trial_id": f"bbbbb_0000{i}", "status": status, "relative_logdir": name}), "{}"])
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": states}))
    assert [(r["seed"], r["status"]) for r in collect_results(exp).rows] == [(0, "finished"), (1, "errored"), (2, "running")]


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("args,fragment", [
    (["--tracking-uri", "sqlite:///{tmp}/missing.db"], "does not exist"),
    (["--tracking-uri", "sqlite:///relative.db"], "absolute path"),
    (["--tracking-uri", "{store}", "--experiment", "pact-ray/nope"], "experiment 'pact-ray/nope' does not exist"),
    (["--tracking-uri", "{empty}"], "holds no ablation experiment"),
    (["--results", "{tmp}/missing"], "is not a folder"),
    (["--results", "{tmp}"], "holds no pact-ray sweep"),
    (["--results", "{tmp}", "--experiment", "x"], "does not apply to --results"),
    (["--results", "{tmp}", "--tracking-uri", "{store}"], "not allowed with argument"),
    (["--bogus"], "unrecognized arguments"),
])
def test_summarize_rejects_bad_input_without_writing(store, empty_store, tmp_path, capsys, args, fragment):
    args = [a.format(tmp=tmp_path, store=store[0], empty=empty_store) for a in args]
    rc, _, err = run_cli(summarize, [*args, "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(rc, err, fragment)
    assert not (tmp_path / "out").exists()


def test_summarize_rejects_a_broken_manifest_and_a_file_as_out(tmp_path, capsys):
    (tmp_path / MANIFEST).write_text("{not json")
    rc, _, err = run_cli(summarize, ["--results", str(tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(rc, err, "is not valid JSON")
    (tmp_path / "file").write_text("x")
    rc, _, err = run_cli(summarize, ["--results", str(tmp_path), "--out", str(tmp_path / "file")], capsys)
    assert_one_line_error(rc, err, "is a file")
    assert not (tmp_path / "out").exists() and (tmp_path / "file").read_text() == "x"


# --------------------------------------------------------------------- compare

def test_compare_shows_params_and_metric_deltas(store, capsys):
    uri, specs = store
    rows = collect_rows(uri)
    a = next(r for r in rows if r["variant"] == "baseline" and r["profile"] == "quick" and r["seed"] == 0)
    b = next(r for r in rows if r["variant"] == "mask_prior" and r["seed"] == 0)
    rc, out, _ = run_cli(compare, [a["run_id"], b["mlflow_run_id"], "--tracking-uri", uri], capsys)
    assert rc == 0
    assert a["run"] in out and b["run"] in out and a["run_id"] in out
    assert "* variant" in out and "* router.mask_prior" in out and "  seed" not in out  # only differing params by default
    loss_line = next(line.split() for line in out.splitlines() if line.strip().startswith("loss "))
    delta = b["loss"] - a["loss"]
    # Printed with 6 significant digits (%+.6g): half a unit of the 6th digit.
    assert abs(float(loss_line[3]) - delta) <= 0.5 * 10 ** (math.floor(math.log10(abs(delta))) - 5)
    assert loss_line[4] == f"{100 * delta / abs(a['loss']):+.3g}%"
    rc, out, _ = run_cli(compare, [a["run_id"], b["run_id"], "--tracking-uri", uri, "--all-params"], capsys)
    assert rc == 0 and "  seed" in out


@pytest.mark.parametrize("ref", ["pact-ray/stage1_router/nope_00000", "0" * 32, "no-slash", "pact-ray/nope/x", "pact-ray/stage1_router/x'y"])
def test_compare_unknown_run_is_one_sentence(store, capsys, ref):
    uri, _ = store
    known = collect_rows(uri)[0]["run_id"]
    rc, out, err = run_cli(compare, [known, ref, "--tracking-uri", uri], capsys)
    assert_one_line_error(rc, err, f"no run {ref!r}")
    assert out == ""
