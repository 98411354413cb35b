"""A real MLflow tracking server for the sweeps, on loopback by default.

    .venv/bin/python -m pact_ray.tracking.server --port 5000 --store ./tracking
    # -> serving http://127.0.0.1:5000 (backend sqlite:////abs/tracking/mlflow.db, artifacts /abs/tracking/artifacts)
    .venv/bin/python sweeps/stage1_router.py --tracking-uri http://127.0.0.1:5000

It runs ``mlflow server`` with a SQLite backend and served artifacts (a folder, or an object
store with ``--artifacts-destination s3://bucket/mlartifacts``: the server writes there with
its own credentials, ``AWS_*`` and ``MLFLOW_S3_ENDPOINT_URL`` for an S3-compatible server, so
clients need none), waits until ``/health`` answers, and stops it and its worker processes on
Ctrl-C or SIGTERM. The server binds 127.0.0.1 unless ``--host`` names another address *and*
``--allow-remote`` is given: a tracking server accepts writes from anyone who can reach it.
Its flags are checked, and its port found free, before anything is created. MLflow's job
runner (GenAI jobs, which sweeps do not use) stays off unless
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true`` is in the environment.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

JOB_EXECUTION_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


class ServerError(RuntimeError):
    pass


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (or the port cannot be bound)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class TrackingServer:
    """A running ``mlflow server`` child process."""

    process: subprocess.Popen
    uri: str
    backend_store_uri: str
    artifacts: str  # a folder or an object-store URI
    log_path: Path

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is not None:
            return
        # mlflow server starts worker processes: signal the whole process group.
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def __enter__(self) -> "TrackingServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_healthy(uri: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(f"mlflow server exited with status {process.returncode} before answering")
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise ServerError(f"mlflow server at {uri} did not answer within {timeout:.0f} s")


# Why by hand: MLflow's server runs its workers as child processes and offers no way to tie
# them to the process that started it. The reaper leads the server's process group; on SIGTERM
# (a stop) it stops the whole group, and it stops it too once its parent is gone (it checks
# every second). Not Linux's PR_SET_PDEATHSIG: that fires when the *thread* that started the
# child ends, which stopped a server started from a short-lived thread.
_REAPER = r"""
import os, signal, subprocess, sys, time
parent, command = int(sys.argv[1]), sys.argv[2:]
stopping, server = [], None

def stop(signum=None, frame=None):
    if stopping:
        return
    stopping.append(True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if server is None:  # stopped before the server started
        sys.exit(0)
    os.killpg(0, signal.SIGTERM)  # the server and its workers (this process ignores it now)
    deadline = time.monotonic() + 15
    while server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(0, signal.SIGKILL) if server.poll() is None else None

signal.signal(signal.SIGTERM, stop)
server = subprocess.Popen(command)
while server.poll() is None:
    if os.getppid() != parent and not stopping:
        stop()
    time.sleep(1)
sys.exit(0 if stopping else (server.returncode if server.returncode >= 0 else 128 - server.returncode))
"""


def start_server(store: str | os.PathLike, port: int | None = None, host: str = "127.0.0.1",
                 allow_remote: bool = False, timeout: float = 60.0, artifacts: str | None = None) -> TrackingServer:
    """Start ``mlflow server`` with ``<store>/mlflow.db`` and ``artifacts`` (an object-store URI
    such as ``s3://bucket/mlartifacts``; default the folder ``<store>/artifacts``); returns once it answers."""
    if not is_loopback(host) and not allow_remote:
        raise ServerError(f"refusing to bind {host}: pass --allow-remote to serve beyond this machine")
    if port is not None and not 1 <= port <= 65535:
        raise ServerError(f"--port must be in 1..65535, got {port}")
    if port is not None and port_in_use(host, port):
        raise ServerError(f"port {port} on {host} is in use: stop what serves there or pick another --port")
    root = Path(store).resolve()
    if root.exists() and not root.is_dir():
        raise ServerError(f"--store {root} is a file, not a folder")
    root.mkdir(parents=True, exist_ok=True)
    if artifacts is None or "://" not in artifacts:
        folder = root / "artifacts" if artifacts is None else Path(artifacts).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        artifacts = str(folder)
    port = port or free_port(host if is_loopback(host) else "127.0.0.1")
    backend = f"sqlite:///{root / 'mlflow.db'}"
    log_path = root / f"server-{port}.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--backend-store-uri", backend, "--artifacts-destination", artifacts, "--workers", "1"]
    # Since MLflow 3.5 `mlflow server` also starts a job runner for its GenAI jobs (prompt
    # optimisation, judges, trace roll-ups), which sweeps never submit: 8 more Python processes
    # and about 1.8 GB of memory on top of the server's 0.5 GB, and a slower start (measured with
    # MLflow 3.17). Off unless the environment turns it on (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true).
    env = {**os.environ}
    env.setdefault(JOB_EXECUTION_ENV, "false")
    log = open(log_path, "ab")
    # The server runs under a small reaper (_REAPER) that leads a session of its own, so that a
    # Ctrl-C at the terminal reaches the wrapper only, and that watches this process: when it
    # dies, however it dies (a SIGKILL too), the reaper stops the server and its workers.
    parent = os.getpid()
    proc = subprocess.Popen([sys.executable, "-c", _REAPER, str(parent), *cmd], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)
    log.close()
    uri = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    server = TrackingServer(proc, uri, backend, artifacts, log_path)
    try:
        wait_healthy(uri, timeout, proc)
    except BaseException:  # not healthy, or a Ctrl-C while it starts: nothing is left running
        server.stop()
        raise
    return server


def main(argv: list[str] | None = None) -> int:
    from pact_ray.cli import OneLineParser

    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--store", default="tracking", help="folder for mlflow.db and artifacts/")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless --allow-remote)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    p.add_argument("--artifacts-destination", default=None, metavar="URI",
                   help="where the artifacts go: an object store (s3://bucket/mlartifacts, gs://...; credentials from "
                        "the environment) or a folder (default: <store>/artifacts)")
    args = p.parse_args(argv)
    try:
        server = start_server(args.store, args.port, args.host, args.allow_remote, artifacts=args.artifacts_destination)
    except (ServerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def _terminate(signum, frame):  # SIGTERM: stop like Ctrl-C, with the server's workers
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        # Inside the try: a Ctrl-C that comes as soon as the first line shows (a script that
        # waits for it, say) stops the server too, rather than leave it running on its own.
        print(f"serving {server.uri} (backend {server.backend_store_uri}, artifacts {server.artifacts}); Ctrl-C stops it", flush=True)
        print(f"sweeps: --tracking-uri {server.uri}", flush=True)
        while server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C (or a SIGINT that `timeout` or a terminal sends twice) must not cut
        # the stop short with a traceback: the server's processes are being stopped already.
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            server.stop()
        finally:
            signal.signal(signal.SIGINT, interrupt)
            signal.signal(signal.SIGTERM, previous)
    return 0 if server.process.returncode in (0, -signal.SIGTERM, None) else 1


if __name__ == "__main__":
    sys.exit(main())
