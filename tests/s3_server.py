"""moto's S3-compatible server for the tests that need an object store: in its own process on
a free loopback port, with one bucket, and its credentials in the environment meanwhile (the
processes a test starts inherit them)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

BUCKET = "pact-ray-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def moto_server(log_dir: Path, env: dict[str, str] | None = None) -> Iterator[tuple[int, Any]]:
    """(port, a boto3 client of the server) with ``BUCKET`` made; ``env`` (given the port) is
    set too while it runs."""
    import boto3

    from pact_ray.tracking.server import free_port

    port = free_port()
    log = open(log_dir / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**CREDENTIALS, **(env or {})}.items():
            mp.setenv(k, v.format(port=port))
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        try:
            deadline = time.time() + 60
            while True:  # the server answers once it has imported and bound its port
                assert proc.poll() is None, "moto server exited"
                try:
                    client.create_bucket(Bucket=BUCKET)
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    if time.time() > deadline:
                        raise
                    time.sleep(0.25)
            yield port, client
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
            log.close()
