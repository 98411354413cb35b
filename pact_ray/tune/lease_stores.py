"""Where a driver lease lives, one class per kind of storage (see :mod:`pact_ray.tune.lease`
for the protocol each one keeps): a local or network-mounted folder (:class:`_Local`), S3
with conditional writes (:class:`_S3`), any other pyarrow filesystem, best effort
(:class:`_Filesystem`); and the lease record's parsing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pact_ray.tune.storage import open_storage

log = logging.getLogger("pact_ray.tune.lease")


class _Local:
    """A lease file in a local or network-mounted folder.

    Every change to an existing lease (takeover, renewal, release) is a compare-and-swap
    against the exact bytes last read or written, made safe by a guard file: whoever creates
    ``<lease>.cas-<hash of those bytes>`` (``O_CREAT|O_EXCL``: one racer succeeds) checks that
    the lease still holds those bytes and only then replaces (``os.replace``, so the lease is
    never absent) or removes it, then removes the guard. Two racers for the same stale lease
    need the same guard, so exactly one wins; a renewal and a takeover of the same version
    exclude each other the same way. A guard left by a process that died inside this
    millisecond window is skipped once older than the TTL (the next generation is used)."""

    def __init__(self, path: str, ttl: float):
        self.path, self.ttl = path, ttl

    def _aside(self, tag: str) -> str:
        return f"{self.path}.{tag}-{uuid.uuid4().hex}"

    def _write_temp(self, data: bytes) -> str:
        tmp = self._aside("tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def create(self, data: bytes) -> bytes | None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self._write_temp(data)
        try:
            os.link(tmp, self.path)  # atomic, fails if a lease exists, never shows half a lease
        except FileExistsError:
            return None
        except OSError:  # a filesystem without hard links
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return data

    def read(self) -> tuple[bytes | None, Any, float]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                modified = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None, None, 0.0
        return data, data, modified

    def _guard(self, expected: bytes) -> str | None:
        """The guard of the lease version ``expected``, now ours; None while another holds it."""
        digest = hashlib.sha256(expected).hexdigest()[:32]
        for generation in range(100):
            guard = f"{self.path}.cas-{digest}-{generation}"
            try:
                os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return guard
            except FileExistsError:
                try:
                    age = time.time() - os.stat(guard).st_mtime
                except FileNotFoundError:
                    return None  # its holder just finished: the version is likely gone
                if age <= self.ttl:
                    return None
        return None

    def _swap(self, expected: bytes, new: bytes | None) -> bool:
        """Replace (or, with ``new`` None, remove) the lease if it still holds ``expected``."""
        guard = self._guard(expected)
        if guard is None:
            return False
        try:
            current, _, _ = self.read()
            if current != expected:
                return False
            if new is None:
                os.unlink(self.path)
            else:
                os.replace(self._write_temp(new), self.path)
            return True
        finally:
            with contextlib.suppress(OSError):
                os.unlink(guard)

    def takeover(self, token: bytes, data: bytes) -> bytes | None:
        return data if self._swap(token, data) else None

    def renew(self, uid: str, token: bytes, data: bytes) -> bytes | None:
        return data if self._swap(token, data) else None

    def delete(self, uid: str, token: bytes) -> None:
        self._swap(token, None)


class _S3:
    def __init__(self, uri: str):
        import boto3
        from botocore.config import Config

        parts = urlsplit(uri)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.bucket, self.key = parts.netloc, parts.path.lstrip("/")
        endpoint = query.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        region = query.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        config = Config(connect_timeout=5, read_timeout=15, retries={"max_attempts": 3, "mode": "standard"},
                        s3={"addressing_style": "path"} if endpoint else None)
        keys = {}
        if query.get("access_key") and query.get("secret_key"):
            keys = {"aws_access_key_id": query["access_key"], "aws_secret_access_key": query["secret_key"]}
        # A session of its own: boto3's default session is not safe to share between threads.
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config, **keys)

    @staticmethod
    def _code(e: Exception) -> tuple[str, int]:
        response = getattr(e, "response", None) or {}
        return (str(response.get("Error", {}).get("Code", "")),
                int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0))

    def _lost_race(self, e: Exception) -> bool:
        """A failed precondition, a concurrent conditional write (409), or the object gone."""
        code, status = self._code(e)
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (404, 409, 412)

    def _put(self, data: bytes, **condition: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data,
                                          ContentType="application/json", **condition)["ETag"]
        except ClientError as e:
            if self._lost_race(e):
                return None
            raise

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def read(self) -> tuple[bytes | None, Any, float]:
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if self._code(e)[0] == "NoSuchKey" or self._code(e)[1] == 404:
                return None, None, 0.0
            raise
        return got["Body"].read(), got["ETag"], got["LastModified"].timestamp()

    def takeover(self, token: str, data: bytes) -> str | None:
        return self._put(data, IfMatch=token)

    def renew(self, uid: str, token: str, data: bytes) -> str | None:
        return self._put(data, IfMatch=token)

    def delete(self, uid: str, token: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=token)
        except ClientError as e:
            if self._lost_race(e):
                return  # not ours any more
            if self._code(e)[0] not in ("NotImplemented", "InvalidArgument"):
                raise
            # A server without conditional deletes: read, compare, delete (not atomic).
            _, current, _ = self.read()
            if current == token:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)


class _Filesystem:
    """Any other pyarrow filesystem: best effort, NOT atomic (write, read back, compare)."""

    def __init__(self, location: str):
        import pyarrow.fs as pafs

        self.pafs = pafs
        storage = open_storage(location)
        self.fs, self.path = storage.fs, storage.path

    def _write(self, data: bytes) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def read(self) -> tuple[bytes | None, Any, float]:
        info = self.fs.get_file_info(self.path)
        if info.type != self.pafs.FileType.File:
            return None, None, 0.0
        try:
            with self.fs.open_input_stream(self.path) as f:
                data = f.read()
        except FileNotFoundError:
            return None, None, 0.0
        modified = info.mtime.timestamp() if info.mtime is not None else 0.0
        return data, data, modified

    def _write_and_check(self, data: bytes) -> bytes | None:
        self._write(data)
        time.sleep(0.2)  # let a racing writer's write land, then see whose is there
        current, _, _ = self.read()
        return data if current == data else None

    def create(self, data: bytes) -> bytes | None:
        if self.read()[0] is not None:
            return None
        with contextlib.suppress(OSError):  # object stores have no folders; others may need it
            self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        return self._write_and_check(data)

    def takeover(self, token: bytes, data: bytes) -> bytes | None:
        if self.read()[0] != token:
            return None
        return self._write_and_check(data)

    def renew(self, uid: str, token: bytes, data: bytes) -> bytes | None:
        current, _, _ = self.read()
        if current is None or record_uid(current) != uid:
            return None
        self._write(data)
        return data

    def delete(self, uid: str, token: bytes) -> None:
        current, _, _ = self.read()
        if current is not None and record_uid(current) == uid:
            self.fs.delete_file(self.path)


def open_lease_store(location: str, ttl: float) -> Any:
    storage = open_storage(location)
    if storage.is_local:
        return _Local(storage.path, ttl)
    if urlsplit(location).scheme == "s3":
        return _S3(location)
    return _Filesystem(location)


# ------------------------------------------------------------------ records

def parse_record(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        rec = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def record_uid(data: bytes) -> str | None:
    rec = parse_record(data)
    return None if rec is None else rec.get("uid")
