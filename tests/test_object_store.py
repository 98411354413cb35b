"""Sweeps on an object store, on a Ray cluster whose worker nodes see only the store.

A real S3-compatible server (moto's server mode, a separate process on loopback) holds Ray's
storage, the sweep's manifest and summary, and the MLflow server's artifacts. The Ray
cluster is a head node with no CPUs and two worker nodes started with ``ray start`` in their
own mount namespace, where an empty tmpfs hides this session's temporary folders: the
drivers' working folders, the test data and any local storage path are invisible to them.
Where the machine cannot make mount namespaces the workers are plain nodes, and the test
that needs hidden folders is skipped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from s3_server import BUCKET, CREDENTIALS, moto_server

from pact_ray.tracking.server import free_port, start_server
from pact_ray.tracking.tags import RESUME_NOTE_TAG, SWEEP_TAG

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "stage1_router.py"


@dataclass
class S3:
    """The moto server: its endpoint, and a boto3 client for the test's own look-ups."""

    port: int
    client: object

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def uri(self, prefix: str) -> str:
        """The pyarrow URI a user passes as --storage-path for this S3-compatible server."""
        return f"s3://{BUCKET}/{prefix}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def keys(self, prefix: str) -> list[str]:
        return list(self.listing(prefix))

    def listing(self, prefix: str) -> dict[str, tuple[int, str]]:
        """Each key under ``prefix`` with its size and ETag."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return {o["Key"]: (o["Size"], o["ETag"]) for page in pages for o in page.get("Contents", [])}

    def wait_until_still(self, prefix: str, quiet: float = 3.0, timeout: float = 120.0) -> None:
        """Return once nothing under ``prefix`` has been added or changed for ``quiet`` seconds."""
        deadline = time.time() + timeout
        last, since = self.listing(prefix), time.time()
        while time.time() - since < quiet:
            assert time.time() < deadline, f"{prefix} is still being written to"
            time.sleep(0.25)
            now = self.listing(prefix)
            if now != last:
                last, since = now, time.time()

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=BUCKET, Key=key, Body=data)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server (tests/s3_server.py), with MLflow's S3 endpoint in the environment too."""
    with moto_server(tmp_path_factory.mktemp("moto"), {"MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:{port}"}) as (port, client):
        yield S3(port, client)


@pytest.fixture(scope="module")
def tracking(s3, tmp_path_factory):
    """A real MLflow server whose artifact store is the bucket."""
    server = start_server(tmp_path_factory.mktemp("tracking"), artifacts=f"s3://{BUCKET}/mlartifacts")
    yield server
    server.stop()


def _free_ports(n: int) -> list[str]:
    """``n`` distinct free loopback ports (all bound at once, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [str(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _can_hide_folders() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@dataclass
class RayCluster:
    address: str
    hidden: list[str]  # folders the worker nodes cannot see (empty where they can)
    head: object  # ray.cluster_utils.Cluster: its GCS tables

    def wait_until_no_actor_lives(self, timeout: float = 120.0) -> None:
        """Return once the GCS has no live actor: after a driver's death its trial actors on the
        worker nodes go on training (and uploading checkpoints) until Ray kills them."""
        deadline = time.time() + timeout
        while self.head.global_state.actor_table(None, actor_state_name="ALIVE"):
            assert time.time() < deadline, "the killed driver's actors were never reaped"
            time.sleep(0.25)


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """A Ray head with no CPUs and two 1-CPU worker nodes that see neither the drivers' folders
    nor this session's temporary files: only the bucket (through the network)."""
    from ray._common.utils import reset_ray_address
    from ray.cluster_utils import Cluster

    head = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    hide = str(tmp_path_factory.getbasetemp())
    hidden = [hide] if _can_hide_folders() else []
    ray_cli = str(Path(sys.executable).with_name("ray"))
    logs = tmp_path_factory.mktemp("nodes")
    workers: list[subprocess.Popen] = []
    all_ports = _free_ports(12)
    try:
        for i in range(2):
            # Two nodes on one machine: each gets its own ports (Ray's defaults would collide).
            ports = all_ports[6 * i : 6 * i + 6]
            start = [ray_cli, "start", "--address", head.address, "--num-cpus", "1", "--object-store-memory", str(100 << 20),
                     "--disable-usage-stats", "--block", "--node-manager-port", ports[0], "--object-manager-port", ports[1],
                     "--runtime-env-agent-port", ports[2], "--dashboard-agent-grpc-port", ports[3],
                     "--dashboard-agent-listen-port", ports[4], "--metrics-export-port", ports[5]]
            if hidden:  # a private mount namespace: an empty tmpfs over the session's temporary folders
                start = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', hide, *start]
            workers.append(subprocess.Popen(start, stdout=open(logs / f"node{i}.log", "wb"), stderr=subprocess.STDOUT,
                                            env=dict(os.environ, RAY_AUTH_MODE="disabled"), start_new_session=True))
            # One node at a time: nodes starting together on one machine race for the same socket file names.
            deadline = time.time() + 120
            while sum(n["Alive"] for n in head.global_state.node_table()) < 2 + i:
                assert workers[-1].poll() is None, (logs / f"node{i}.log").read_text()[-2000:]
                assert time.time() < deadline, f"worker node {i} never joined"
                time.sleep(0.5)
        # The head and `ray start` leave this cluster's address in /tmp/ray for a bare ray.init()
        # to join; the drivers here pass --address, and other processes must not join it.
        reset_ray_address()
        yield RayCluster(head.address, hidden, head)
    finally:
        for w in workers:  # the node's raylet, agents and workers are all in its process group
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
            w.wait(30)
        head.shutdown()


def _sweep(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=cwd, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            start_new_session=True, **kw)


# ----------------------------------------------------------------------- no Ray

def _cli_args(tmp_path: Path, storage: str) -> list[str]:
    return ["--model", "tiny", "--profile", "smoke", "--name", "x", "--storage-path", storage,
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


def test_unknown_storage_scheme_is_one_sentence(tmp_path, capsys):
    from pact_ray.tune.sweep import run_sweep

    assert run_sweep("stage1", _cli_args(tmp_path, "foo://bucket/runs")) == 2
    assert capsys.readouterr().err == ("error: storage 'foo://bucket/runs' cannot be opened: "
                                       "Unrecognized filesystem type in URI: foo://bucket/runs\n")
    assert os.listdir(tmp_path) == []  # nothing created, not even the tracking database


@pytest.mark.slow  # the S3 client retries a refused connection for a few seconds
def test_object_store_that_does_not_answer_is_one_sentence(tmp_path, capsys):
    from pact_ray.tune.sweep import run_sweep

    uri = f"s3://bucket/runs?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in CREDENTIALS.items():
            mp.setenv(k, v)
        assert run_sweep("stage1", _cli_args(tmp_path, uri)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: storage {uri} does not answer (") and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_missing_bucket_is_refused_before_anything_is_created(s3, tmp_path, capsys):
    from pact_ray.tune.sweep import run_sweep

    uri = s3.uri("runs").replace(BUCKET, "no-such-bucket")
    assert run_sweep("stage1", _cli_args(tmp_path, uri)) == 2
    assert capsys.readouterr().err == f"error: storage {uri}: bucket 'no-such-bucket' does not exist (create it first)\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_resume_reads_rays_result_files_from_the_bucket(s3, tmp_path):
    """What a resume replays to MLflow (steps a killed driver never sent) comes from the
    bucket's copy of Ray's files: the experiment state and each trial's params.json and
    result.json, byte for byte, and nothing else (no checkpoint is downloaded)."""
    from pact_ray.tune.storage import open_storage

    files = {"replay/experiment_state-2026-11-30_01-00-00.json": b'{"trial_data": []}',
             "replay/a_s0_00000/params.json": b'{"variant": "a"}',
             "replay/a_s0_00000/result.json": b'{"step": 1}\n{"step": 2}\n',
             "replay/a_s0_00000/checkpoint_000000/state.pt": b"weights",
             "replay/a_s0_00000/events.out.tfevents": b"x",
             "replay/basic-variant-state-2026.json": b"pickle"}
    for key, data in files.items():
        s3.put(key, data)
    open_storage(s3.uri("replay")).fetch_results(tmp_path)
    got = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert got == {k.removeprefix("replay/"): v for k, v in files.items()
                   if k.endswith(("params.json", "result.json")) or "experiment_state-" in k}


def test_corrupted_newest_checkpoint_in_the_bucket_falls_back_to_the_previous_one(s3, tmp_path):
    """Three checkpoints in the bucket, the newest truncated: the trial body lists its siblings
    through pyarrow's S3 filesystem and resumes from the previous one, bit for bit."""
    import torch
    from ray import tune

    from pact_ray.runs.stage1 import Stage1RunConfig
    from pact_ray.training.checkpoints import STATE_FILE, read_checkpoint, write_checkpoint
    from pact_ray.training.stage1 import Stage1Trainer
    from pact_ray.tune.storage import open_storage
    from pact_ray.tune.trial import restore

    def trainer():
        return Stage1Trainer(Stage1RunConfig.for_variant("ot_first", "quick", "tiny", 0, steps=6))

    trial = open_storage(s3.uri("fallback/trial"))
    run = trainer()
    for i in range(3):
        run.train_step()
        local = tmp_path / f"checkpoint_{i:06d}"
        local.mkdir()
        write_checkpoint(local, run.state_dict())
        trial.child(local.name).put_folder(local)
    newest = f"fallback/trial/checkpoint_000002/{STATE_FILE}"
    s3.put(newest, s3.get(newest)[:100])

    fresh = trainer()
    restore(fresh, tune.Checkpoint(trial.child("checkpoint_000002").path, filesystem=trial.fs), "stage1")
    assert fresh.step == 2 and fresh.resumed
    ref = read_checkpoint(tmp_path / "checkpoint_000001", "stage1")["model"]
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, ref[k])


# --------------------------------------------------------------- the cluster

def _saved_checkpoints(s3: S3, exp: str) -> dict[str, int]:
    """Per unfinished trial (its folder), the index of the newest checkpoint that the newest
    experiment state in the bucket names: the checkpoint a resumed sweep hands that trial."""
    states = sorted(k for k in s3.keys(f"{exp}/experiment_state-") if k.endswith(".json"))
    if not states:
        return {}
    out = {}
    for trial_json, run_json in json.loads(s3.get(states[-1]))["trial_data"]:
        trial = json.loads(trial_json)
        if trial["status"] == "TERMINATED":
            continue
        # Ray keeps its checkpoint manager as a hex-encoded pickle; the folder names are plain text in it.
        pickled = bytes.fromhex(json.loads(run_json)["checkpoint_manager"]["value"])
        found = [int(i) for i in re.findall(rb"checkpoint_(\d{6})", pickled)]
        if found:
            out[trial["relative_logdir"]] = max(found)
    return out


def _trial_runs(tracking_uri: str, manifest: dict):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return client, client.search_runs([manifest["experiment_id"]], filter_string=f"tags.`{SWEEP_TAG}` = '{manifest['parent_run_id']}'")


@pytest.mark.slow
def test_local_storage_on_a_cluster_whose_nodes_cannot_see_it_is_refused(cluster, tracking, tmp_path):
    if not cluster.hidden:
        pytest.skip("this machine cannot make mount namespaces: the worker nodes see every folder")
    from mlflow.tracking import MlflowClient

    proc = _sweep(["--address", cluster.address, "--model", "tiny", "--profile", "smoke", "--variants", "baseline",
                   "--name", "refused", "--storage-path", str(tmp_path / "runs"), "--tracking-uri", tracking.uri, "--quiet"],
                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err.decode()[-3000:]
    lines = [ln for ln in err.decode().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and re.fullmatch(
        rf"error: node \S+ \(\w+\) of the Ray cluster does not see the storage folder {re.escape(str(tmp_path / 'runs'))}: "
        r"on a cluster of several nodes it must be a shared folder mounted at the same path on every node, "
        r"or an object-store URI \(s3://\.\.\., gs://\.\.\.\)", lines[0]), lines
    assert os.listdir(tmp_path) == []  # no storage folder, no probe file left behind
    assert MlflowClient(tracking.uri).search_runs([e.experiment_id for e in MlflowClient(tracking.uri).search_experiments()],
                                                  filter_string="attributes.run_name = 'refused'") == []


@pytest.mark.slow
def test_sigkilled_driver_resumes_from_another_folder_with_only_the_store(s3, tracking, cluster, tmp_path):
    """A sweep on the bucket, its trials on worker nodes that see only the bucket. The driver is
    SIGKILLed once Ray's saved state names a second checkpoint of a running trial; that
    checkpoint (and any newer one) is then corrupted in the bucket. A driver started in another,
    empty folder with only --name, --storage-path and --resume finishes the sweep: the trial
    falls back to its previous checkpoint, every step is logged once, no run is duplicated, and
    the summary lands in the bucket and in the parent run, whose artifacts are in the bucket."""
    name, steps = "moved", 60
    storage = s3.uri("runs")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    proc = _sweep(["--address", cluster.address, "--model", "tiny", "--profile", "quick", "--seeds", "0", "--variants", "baseline,ot_first",
                   "--name", name, "--storage-path", storage, "--tracking-uri", tracking.uri, "--quiet",
                   "--set", f"steps={steps}", "--set", "checkpoint_every=5"],
                  cwd=first, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    exp = f"runs/{name}"
    try:
        deadline = time.time() + 300
        while not any(i >= 1 for i in _saved_checkpoints(s3, exp).values()):
            assert proc.poll() is None, "the sweep ended before it could be interrupted: " + proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "Ray's state never named a second checkpoint of a running trial"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Until Ray reaps them, the trials still write checkpoints: one listed now may be half-uploaded
    # (its meta.json there, its state.pt not yet), and one corrupted now may be followed by another.
    # The GCS may mark them dead before their processes have stopped, so also wait for the bucket to go still.
    cluster.wait_until_no_actor_lives()
    s3.wait_until_still(f"{exp}/")
    saved = {t: i for t, i in _saved_checkpoints(s3, exp).items() if i >= 1}
    trial, index = sorted(saved.items())[0]
    # A folder the kill cut short (no state.pt) is already unusable; the others get a flipped byte.
    corrupted = sorted({k.rsplit("/", 1)[0] for k in s3.keys(f"{exp}/{trial}/checkpoint_")
                        if k.endswith("/state.pt") and int(re.search(r"checkpoint_(\d{6})", k).group(1)) >= index})
    assert f"{exp}/{trial}/checkpoint_{index:06d}" in corrupted  # the one Ray's state names was whole
    for folder in corrupted:  # a flipped byte in the middle: the checksum in meta.json no longer holds
        data = bytearray(s3.get(f"{folder}/state.pt"))
        data[len(data) // 2] ^= 0xFF
        s3.put(f"{folder}/state.pt", bytes(data))
    assert f"{exp}/{trial}/checkpoint_{index - 1:06d}/state.pt" in s3.keys(f"{exp}/{trial}/")

    resumed = _sweep(["--address", cluster.address, "--name", name, "--storage-path", storage, "--resume"], cwd=second,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = resumed.communicate(timeout=400)[0].decode()
    assert resumed.returncode == 0, out[-4000:]
    assert "fell back to checkpoint" in out  # the trial body's note, from a worker node, on the driver's progress lines
    assert os.listdir(first) == [] and os.listdir(second) == []  # neither driver kept anything locally

    manifest = json.loads(s3.get(f"{exp}/pact_ray_sweep.json"))
    assert manifest["tracking_uri"] == tracking.uri
    client, runs = _trial_runs(tracking.uri, manifest)
    assert sorted(r.data.tags["variant"] for r in runs) == ["baseline", "ot_first"]  # no duplicate runs
    for r in runs:
        assert r.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "loss")) == list(range(1, steps + 1))
    assert client.get_run(manifest["parent_run_id"]).info.status == "FINISHED"
    noted = [r for r in runs if r.data.tags.get(RESUME_NOTE_TAG, "").startswith("fell back to checkpoint")]
    assert len(noted) == 1 and noted[0].data.tags["pact_ray.trial_id"] in trial  # only the trial whose checkpoints were spoiled

    rows = json.loads(s3.get(f"{exp}/summary/ablation_summary.json"))
    assert sorted(r["variant"] for r in rows) == ["baseline", "ot_first"]
    assert all(r["status"] == "finished" and r["steps"] == steps for r in rows)
    page = s3.get(f"{exp}/summary/index.html").decode()
    assert "<html" in page.lower()
    logged = {a.path for a in client.list_artifacts(manifest["parent_run_id"], "summary")}
    assert {"summary/index.html", "summary/ablation_summary.json", "summary/ablation_summary.csv"} <= logged
    assert any(k.endswith(f"{manifest['parent_run_id']}/artifacts/summary/index.html") for k in s3.keys("mlartifacts/"))
    assert f"Summary:      {s3.uri(f'runs/{name}/summary/index.html')}" in out


@pytest.mark.slow
def test_optuna_study_is_kept_on_the_object_store(s3, tracking, cluster, tmp_path):
    """An Optuna sweep on the bucket has no SQLite study file: the study is in Ray's searcher
    state in the sweep folder in the bucket (what --resume restores), and nothing is local."""
    import pickle

    proc = _sweep(["--address", cluster.address, "--model", "tiny", "--profile", "smoke", "--search", "optuna",
                   "--variant", "rgb_edge", "--num-samples", "2", "--set", "router.iterations=20", "--name", "study",
                   "--storage-path", s3.uri("runs"), "--tracking-uri", tracking.uri, "--quiet"],
                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert os.listdir(tmp_path) == []
    keys = s3.keys("runs/study/")
    assert not any(k.endswith("optuna.db") for k in keys)
    [state] = [k for k in keys if re.fullmatch(r"runs/study/searcher-state-[^/]+\.pkl", k)]
    study = pickle.loads(s3.get(state))["_ot_study"]  # Ray's OptunaSearch pickles its attributes, the study among them
    assert len(study.trials) == 2 and len({t.params["router.eps"] for t in study.trials}) == 2
    _, runs = _trial_runs(tracking.uri, json.loads(s3.get("runs/study/pact_ray_sweep.json")))
    assert sorted(float(r.data.params["router.eps"]) for r in runs) == pytest.approx(sorted(t.params["router.eps"] for t in study.trials))
