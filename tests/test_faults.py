"""Sweeps that survive: failing trials, corrupted checkpoints, a tracking server that goes away."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from ray import tune

from pact_ray.report.summary import JSON_NAME
from pact_ray.runs.stage1 import Stage1RunConfig
from pact_ray.tracking.server import start_server
from pact_ray.tracking.tags import SWEEP_TAG
from pact_ray.training.checkpoints import read_checkpoint, write_checkpoint
from pact_ray.training.stage1 import Stage1Trainer
from pact_ray.tune.manifest import MANIFEST
from pact_ray.tune.sweep import run_sweep
from pact_ray.tune.trial import restore


def _runs(uri: str, storage: Path, name: str):
    manifest = json.loads((storage / name / MANIFEST).read_text())
    client = MlflowClient(uri)
    return client, client.search_runs([manifest["experiment_id"]], filter_string=f"tags.`{SWEEP_TAG}` = '{manifest['parent_run_id']}'")


def _steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


@pytest.mark.slow
def test_failing_trials_retry_from_checkpoint_or_error_out(tmp_path, ray_address, capsys):
    """ot_first fails once at a random step and resumes from its checkpoint; mask_prior fails every
    time and ends errored, with its error in the summary; baseline is untouched."""
    fail_step = random.Random().randint(3, 9)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--model", "tiny", "--profile", "quick", "--seeds", "0", "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri,
              "--quiet", "--set", "steps=12", "--set", "checkpoint_every=2", "--set", f"fail_at_step={fail_step}",
              "--max-failures", "2"]
    rc = run_sweep("stage1", common + ["--name", "once", "--variants", "baseline,ot_first", "--set", "fail_variants=ot_first"])
    assert rc == 0, capsys.readouterr().err
    client, runs = _runs(uri, tmp_path / "runs", "once")
    by_variant = {r.data.tags["variant"]: r for r in runs}
    assert set(by_variant) == {"baseline", "ot_first"}
    for r in runs:
        assert r.info.status == "FINISHED" and _steps(client, r.info.run_id) == list(range(1, 13))
    assert f"injected fault at step {fail_step}" in by_variant["ot_first"].data.tags["retried_after"]
    for r in runs:  # the fault injection is the test's, not a setting of the run: never logged; no empty tags
        assert not [k for k in r.data.params if k.startswith("fail_")] and "lr" in r.data.params
        assert "error" not in r.data.tags and all(v != "" for v in r.data.tags.values())

    rc = run_sweep("stage1", common + ["--name", "always", "--variants", "baseline,mask_prior",
                                       "--set", "fail_variants=mask_prior", "--set", "fail_mode=always"])
    assert rc == 1  # the sweep reports that a trial errored
    out = capsys.readouterr().out
    client, runs = _runs(uri, tmp_path / "runs", "always")
    by_variant = {r.data.tags["variant"]: r for r in runs}
    assert by_variant["baseline"].info.status == "FINISHED"
    assert by_variant["mask_prior"].info.status == "FAILED"
    rows = {row["variant"]: row for row in json.loads((tmp_path / "runs" / "always" / "summary" / JSON_NAME).read_text())}
    assert rows["baseline"]["status"] == "finished" and rows["baseline"]["steps"] == 12
    assert rows["mask_prior"]["status"] == "errored"
    assert f"injected fault at step {fail_step}" in rows["mask_prior"]["error"]
    assert "errored: " in out and "mask prior" in out


def _trainer(tmp_path: Path) -> Stage1Trainer:
    return Stage1Trainer(Stage1RunConfig.for_variant("ot_first", "quick", "tiny", 0, steps=6))


def test_corrupted_or_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    trainer = _trainer(tmp_path)
    trial = tmp_path / "trial"
    states = {}
    for i in range(3):
        trainer.train_step()
        folder = trial / f"checkpoint_{i:06d}"
        folder.mkdir(parents=True)
        write_checkpoint(folder, trainer.state_dict())
        states[i] = trainer.step
    # Newest: truncated; the one before: a flipped byte (checksum); the oldest is good.
    newest = trial / "checkpoint_000002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    middle = trial / "checkpoint_000001" / "state.pt"
    data = bytearray(middle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    middle.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        read_checkpoint(trial / "checkpoint_000001", "stage1")

    fresh = _trainer(tmp_path)
    note = restore(fresh, tune.Checkpoint.from_directory(str(trial / "checkpoint_000002")), "stage1")
    assert fresh.step == states[0] and fresh.resumed
    # The note the driver shows (progress line, MLflow tag) names the checkpoint used and both failures.
    assert note.startswith(f"fell back to checkpoint checkpoint_000000 (step {states[0]}) after: ")
    assert note.count(";") == 1 and "corrupted" in note
    ref = read_checkpoint(trial / "checkpoint_000000", "stage1")["model"]
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, ref[k])
    # A resumed trainer continues with exactly the uninterrupted run's next step.
    again = _trainer(tmp_path)
    assert restore(again, tune.Checkpoint.from_directory(str(trial / "checkpoint_000000")), "stage1") is None
    assert again.train_step()["loss"] == fresh.train_step()["loss"]


def test_a_checkpoint_is_saved_without_torchs_record_crc_and_still_verified(tmp_path, monkeypatch):
    """The sha256 in meta.json guards the file, so torch's per-record CRC32 (most of a save's
    cost) is skipped for the save only: the records carry none, the setting is restored,
    also when the save fails, and a flipped byte inside a tensor record is still refused."""
    import zipfile

    trainer = _trainer(tmp_path)
    write_checkpoint(tmp_path, trainer.state_dict())
    records = zipfile.ZipFile(tmp_path / "state.pt").infolist()
    assert records and all(r.CRC == 0 for r in records)
    assert torch.serialization.get_crc32_options() is True
    state = read_checkpoint(tmp_path, "stage1")
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(state["model"][k], v)

    largest = max((r for r in records if "/data/" in r.filename), key=lambda r: r.file_size)
    data = bytearray((tmp_path / "state.pt").read_bytes())
    data[largest.header_offset + 200] ^= 0x01  # inside the record's data, past its header
    (tmp_path / "state.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        read_checkpoint(tmp_path, "stage1")

    def failing_save(*args, **kwargs):
        assert torch.serialization.get_crc32_options() is False
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path, trainer.state_dict())
    assert torch.serialization.get_crc32_options() is True


def test_no_readable_checkpoint_is_an_error(tmp_path):
    folder = tmp_path / "checkpoint_000000"
    folder.mkdir()
    (folder / "state.pt").write_bytes(b"junk")
    with pytest.raises(RuntimeError, match="no readable checkpoint"):
        restore(_trainer(tmp_path), tune.Checkpoint.from_directory(str(folder)), "stage1")


def test_checkpoint_of_another_kind_is_refused(tmp_path):
    trainer = _trainer(tmp_path)
    state = trainer.state_dict()
    state["kind"] = "world_model"
    write_checkpoint(tmp_path, state)
    with pytest.raises(ValueError, match="'world_model' checkpoint, not 'stage1'"):
        read_checkpoint(tmp_path, "stage1")


def _loss_rows(db: Path) -> list[tuple[str, int, int]]:
    with sqlite3.connect(db) as con:
        return con.execute("select run_uuid, step, timestamp from metrics where key = 'loss'").fetchall()


@pytest.mark.slow
def test_tracking_server_down_for_30_s_mid_sweep(tmp_path, ray_address):
    """The server stops mid-sweep and comes back 30 s later on the same port: training goes on,
    and the metrics of that window reach the server once it is back, each step once."""
    store = tmp_path / "tracking"
    server = start_server(store)
    port = int(server.uri.rsplit(":", 1)[1])
    db = store / "mlflow.db"
    window: dict[str, float] = {}

    def outage():
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if any(step >= 5 for _, step, _ in _loss_rows(db)):
                    break
            except sqlite3.Error:
                pass
            time.sleep(0.2)
        window["down"] = time.time() * 1000
        server.stop()
        time.sleep(30)
        window["up"] = time.time() * 1000
        window["server"] = start_server(store, port=port)

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        rc = run_sweep("stage1", ["--model", "tiny", "--profile", "quick", "--seeds", "0", "--variants", "baseline", "--name", "outage",
                                  "--storage-path", str(tmp_path / "runs"), "--tracking-uri", server.uri, "--quiet",
                                  "--set", "steps=400", "--set", "checkpoint_every=100"])
        thread.join(timeout=120)
        assert rc == 0
        rows = _loss_rows(db)
        assert sorted(step for _, step, _ in rows) == list(range(1, 401))  # every step, once
        during = [s for _, s, ts in rows if window["down"] < ts < window["up"]]
        assert during, "no step was trained while the server was down"
    finally:
        if "server" in window:
            window["server"].stop()
        server.stop()


@pytest.mark.slow
def test_worker_node_removed_mid_sweep(tmp_path):
    """Two 1-CPU worker nodes run a trial each; one node is removed mid-sweep: its trial moves
    to the surviving node, resumes from its checkpoint and finishes, every step logged once."""
    import os
    import subprocess
    import sys

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    total_steps = 40  # the node goes once both trials are past step 10: 30 steps and more still to train on it
    db = tmp_path / "mlflow.db"
    script = Path(__file__).resolve().parents[1] / "sweeps" / "stage1_router.py"
    cmd = [sys.executable, str(script), "--address", cluster.address, "--model", "tiny", "--profile", "quick", "--seeds", "0",
           "--variants", "baseline,ot_first", "--name", "nodes", "--storage-path", str(tmp_path / "runs"),
           "--tracking-uri", f"sqlite:///{db}", "--quiet", "--max-failures", "3",
           "--set", f"steps={total_steps}", "--set", "checkpoint_every=5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ), start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                steps: dict[str, int] = {}
                for run, step, _ in _loss_rows(db):
                    steps[run] = max(step, steps.get(run, 0))
                if len(steps) == 2 and min(steps.values()) >= 10:
                    break
            except sqlite3.Error:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.3)
        else:
            pytest.fail("the trials never got going on the two worker nodes")
        cluster.remove_node(workers[1])
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err.decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    client, runs = _runs(f"sqlite:///{db}", tmp_path / "runs", "nodes")
    assert len(runs) == 2
    for r in runs:
        assert r.info.status == "FINISHED"
        assert _steps(client, r.info.run_id) == list(range(1, total_steps + 1))
    assert any("retried_after" in r.data.tags for r in runs)  # one trial really lost its node
