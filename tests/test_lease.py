"""One driver per sweep: the lease of pact_ray.tune.lease, on a local folder and on a real
S3-compatible server (moto's server mode on loopback, as in tests/test_object_store.py).
No Ray, no sweep: a few seconds in all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from s3_server import BUCKET, moto_server

from pact_ray.tune.lease import Lease, LeaseHeld, _judge, lease_location
from pact_ray.tune.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]
ME = f"{socket.gethostname()}:{os.getpid()}"


@pytest.fixture(scope="module")
def s3_port(tmp_path_factory):
    """moto's S3 server (tests/s3_server.py)."""
    with moto_server(tmp_path_factory.mktemp("moto")) as (port, _client):
        yield port


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> str:
    """A sweep storage location that does not exist yet: a local folder, or a prefix in the bucket."""
    if request.param == "local":
        return str(tmp_path / "runs")
    port = request.getfixturevalue("s3_port")
    return f"s3://{BUCKET}/{uuid.uuid4().hex}/runs?endpoint_override=127.0.0.1:{port}&scheme=http"


def name() -> str:
    return f"sweep-{uuid.uuid4().hex[:8]}"


def read_lease(storage: str, sweep: str) -> dict | None:
    where = open_storage(lease_location(storage, sweep))
    try:
        with where.fs.open_input_stream(where.path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None


def write_lease(storage: str, sweep: str, **fields) -> None:
    """A lease file as another driver left it."""
    where = open_storage(lease_location(storage, sweep))
    if where.is_local:
        os.makedirs(os.path.dirname(where.path), exist_ok=True)
    rec = {"holder": "elsewhere:4242", "host": "elsewhere", "pid": 4242, "pid_start": "1", "uid": uuid.uuid4().hex,
           "ttl": 1.0, "acquired": time.time() - 100, "renewed": time.time() - 100, **fields}
    with where.fs.open_output_stream(where.path) as f:
        f.write(json.dumps(rec).encode())


def test_second_driver_refused_naming_holder_then_free_after_release(storage):
    sweep = name()
    with Lease.acquire(storage, sweep, ttl_s=30) as first:
        assert first.holder == ME
        assert read_lease(storage, sweep)["uid"] == first.uid
        with pytest.raises(LeaseHeld) as e:
            Lease.acquire(storage, sweep)
        msg = str(e.value)
        assert "\n" not in msg and msg.count(". ") == 0, msg
        assert msg.startswith(f"sweep {sweep!r} is being run by {ME} (lease renewed "), msg
        assert "wait for it to finish or stop it first" in msg
        assert e.value.holder == ME and 0 < e.value.expires_in_s <= 30
    assert read_lease(storage, sweep) is None
    first.release()  # idempotent
    second = Lease.acquire(storage, sweep)
    assert second.uid != first.uid
    second.release()
    assert read_lease(storage, sweep) is None


def test_stalled_holder_is_taken_over_and_told(storage):
    """The holder stops renewing (as if stopped for longer than its TTL): the next driver takes
    over, and the old holder's next renewal finds the lease is not its own and calls on_lost."""
    sweep = name()
    lost = threading.Event()
    calls = []
    old = Lease.acquire(storage, sweep, ttl_s=1.0, on_lost=lambda: (calls.append(1), lost.set()))
    gate = threading.Event()
    renew = old._backend.renew

    def stalled(*args):
        gate.wait()
        return renew(*args)

    old._backend.renew = stalled
    time.sleep(1.4)
    new = Lease.acquire(storage, sweep)  # default TTL; the holder's own TTL of 1 s counts
    gate.set()
    assert lost.wait(10), "the old holder was not told"
    time.sleep(0.6)  # no second call, no more renewals
    assert calls == [1] and old.lost
    old.release()  # must not delete the new holder's lease
    assert read_lease(storage, sweep)["uid"] == new.uid
    with pytest.raises(LeaseHeld):
        Lease.acquire(storage, sweep)
    new.release()


def test_lease_of_another_host_not_renewed_is_taken_over(storage):
    sweep = name()
    write_lease(storage, sweep)
    with Lease.acquire(storage, sweep) as lease:
        assert read_lease(storage, sweep)["uid"] == lease.uid
    write_lease(storage, sweep, renewed=time.time(), ttl=600)  # fresh: another host's pid is never checked
    with pytest.raises(LeaseHeld, match="elsewhere:4242"):
        Lease.acquire(storage, sweep)


def test_same_host_recycled_pid_is_stale_at_once(storage):
    """A fresh lease naming this very pid, but a different process start time: not alive."""
    sweep = name()
    here = json.loads(_record_of_this_process())
    write_lease(storage, sweep, **{**here, "pid_start": "1", "renewed": time.time(), "ttl": 600, "uid": "x"})
    with Lease.acquire(storage, sweep) as lease:
        assert read_lease(storage, sweep)["uid"] == lease.uid


def _record_of_this_process() -> bytes:
    probe = Lease("unused", "unused", None, 60.0, None)
    return probe._record()


HOLD = """
import sys, time
from pact_ray.tune.lease import Lease
lease = Lease.acquire(sys.argv[1], sys.argv[2], ttl_s=600)
print(lease.holder, flush=True)
time.sleep(600)
"""


def test_same_host_dead_pid_is_taken_over_at_once(storage):
    sweep = name()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, storage, sweep], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        holder = proc.stdout.readline().strip()
        assert holder == f"{socket.gethostname()}:{proc.pid}"
        with pytest.raises(LeaseHeld, match=f"run by {holder} "):
            Lease.acquire(storage, sweep)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    start = time.monotonic()
    with Lease.acquire(storage, sweep):  # the holder's TTL is 600 s: taken over for its dead pid
        assert time.monotonic() - start < 5


@pytest.mark.parametrize("racers", [4])
def test_racing_for_a_stale_lease_exactly_one_wins(storage, racers):
    for _ in range(4):
        sweep = name()
        write_lease(storage, sweep)
        barrier = threading.Barrier(racers)
        won, refused, errors = [], [], []

        def race():
            barrier.wait()
            try:
                won.append(Lease.acquire(storage, sweep))
            except LeaseHeld as e:
                refused.append(e)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=race) for _ in range(racers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert len(won) == 1 and len(refused) == racers - 1, (won, refused)
        assert read_lease(storage, sweep)["uid"] == won[0].uid
        won[0].release()


def test_wait_for_a_lease_released_soon(storage):
    sweep = name()
    first = Lease.acquire(storage, sweep)
    threading.Timer(0.5, first.release).start()
    start = time.monotonic()
    with Lease.acquire(storage, sweep, wait_s=10) as second:
        waited = time.monotonic() - start
        assert 0.4 < waited < 5, waited
        assert read_lease(storage, sweep)["uid"] == second.uid
    with Lease.acquire(storage, sweep) as third:
        with pytest.raises(LeaseHeld):
            Lease.acquire(storage, sweep, wait_s=0.3)
        assert third


def test_unreadable_lease_is_judged_by_its_age():
    assert _judge(b"{half", time.time() - 5, 60)[0] is False
    assert _judge(b"{half", time.time() - 61, 60)[0] is True


def test_other_filesystems_get_a_best_effort_lease(monkeypatch):
    """gs:// and the like go through pyarrow (not atomic): here pyarrow's in-memory filesystem."""
    import pyarrow.fs as pafs

    import pact_ray.tune.lease_stores as lease_stores
    from pact_ray.tune.storage import Storage

    fs = pafs.FileSystem.from_uri("mock:///")[0]
    monkeypatch.setattr(lease_stores, "open_storage", lambda location: Storage(location, fs, location.split("://", 1)[1]))
    with Lease.acquire("gs://bucket/runs", "x", ttl_s=1.0) as first:
        assert type(first._backend).__name__ == "_Filesystem"
        with pytest.raises(LeaseHeld, match=f"run by {ME} "):
            Lease.acquire("gs://bucket/runs", "x")
        time.sleep(1.2)  # renewed meanwhile: still held
        with pytest.raises(LeaseHeld):
            Lease.acquire("gs://bucket/runs", "x")
    with Lease.acquire("gs://bucket/runs", "x"):
        pass
