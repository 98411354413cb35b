"""One driver per sweep: a lease with a heartbeat, kept in the sweep's storage.

A running driver holds ``.<name>.driver-lease.json`` beside the sweep's folder
(:func:`lease_location`; usable before that folder exists). The lease is a small JSON record
(holder ``host:pid``, the process's start time, a random ``uid``, when it was acquired and last
renewed, the holder's TTL); a daemon thread renews it every TTL/4. A second driver is refused
with :class:`LeaseHeld` (one sentence naming the holder) while the lease is fresh, and takes
it over once it is stale: not renewed for longer than the holder's TTL, or, on the same host,
held by a process that no longer exists (the pid is checked with its start time, so a recycled
pid does not count as alive). A holder whose lease was taken over while it stalled finds out
at its next renewal and calls ``on_lost`` once.

How each storage makes this safe:

- a local (or network-mounted) folder: a new lease is hard-linked into place from a fully
  written temporary file (atomic, fails if a lease exists; ``O_CREAT|O_EXCL`` where the
  filesystem has no hard links); takeover, renewal and release are compare-and-swaps on the
  lease's exact bytes, serialized by an ``O_EXCL`` guard file named after those bytes, and
  replace the lease with ``os.replace`` (never absent meanwhile): of several drivers racing
  for a stale lease exactly one wins (:class:`_Local`);
- S3 (``s3://``): conditional writes: create with ``If-None-Match: *``, take over and renew
  with ``If-Match: <ETag we read or last wrote>``, delete with ``If-Match`` too;
- any other pyarrow filesystem (``gs://`` ...): write, read back and compare, which is
  best effort only, not atomic: two drivers starting within the same moment can both win.

Times in the record are wall-clock ``time.time()``, since drivers on other hosts read them:
the hosts' clocks must agree to much less than the TTL (``PACT_RAY_LEASE_TTL_S``, default 60 s).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from pact_ray.tune.lease_stores import open_lease_store, parse_record, record_uid
from pact_ray.tune.storage import join

log = logging.getLogger(__name__)

TTL_ENV = "PACT_RAY_LEASE_TTL_S"


class LeaseHeld(Exception):
    """Another driver holds the sweep's lease (one-sentence message naming it)."""

    def __init__(self, message: str, holder: str = "", renewed_s_ago: float | None = None, expires_in_s: float | None = None):
        super().__init__(message)
        self.holder = holder
        self.renewed_s_ago = renewed_s_ago
        self.expires_in_s = expires_in_s


def lease_location(storage: str, name: str) -> str:
    """Where the lease of sweep ``name`` in ``storage`` (a folder or URI) lives: beside the
    sweep's folder, so that it can be taken before that folder exists."""
    return join(storage, f".{name}.driver-lease.json")


def default_ttl() -> float:
    return float(os.environ.get(TTL_ENV, "60"))


# ------------------------------------------------------------------ this process

def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc; None if unknown."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # after "pid (comm)": field 3 onwards
    return fields[0], fields[19]


def _pidns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


_HOST = socket.gethostname()
_BOOT = _read_text("/proc/sys/kernel/random/boot_id")
_PIDNS = _pidns()


def _pid_alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` of this machine exists and is the one started at ``start``."""
    stat = _proc_stat(pid)
    if stat is not None:
        state, started = stat
        return state not in ("Z", "X") and (start is None or started == start)
    if os.path.isdir("/proc/self"):  # Linux, and no /proc/<pid>: gone
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_machine(rec: dict[str, Any]) -> bool:
    """Whether the holder's pid can be checked here: same host name, same boot, same pid
    namespace (containers sharing a host name, or a reboot, fall back to the TTL alone)."""
    return (rec.get("host") == _HOST and _BOOT is not None and rec.get("boot") == _BOOT
            and _PIDNS is not None and rec.get("pidns") == _PIDNS)


# ------------------------------------------------------------------ backends
# Each keeps one lease object. ``token`` is what a conditional change is checked against:
# the file's bytes (local, other filesystems) or the object's ETag (S3).

def _judge(data: bytes, modified: float, ttl: float) -> tuple[bool, str, float, float]:
    """(stale, holder, seconds since renewed, seconds left) of a lease read from storage.
    The holder's own TTL counts; an unreadable lease is judged by its modification time."""
    rec = parse_record(data)
    now = time.time()
    if rec is None:
        age = now - modified
        return age > ttl, "an unknown driver (its lease file is unreadable)", age, ttl - age
    holder = str(rec.get("holder") or f"{rec.get('host')}:{rec.get('pid')}")
    try:
        holder_ttl = float(rec.get("ttl") or ttl)
        age = now - float(rec.get("renewed", 0.0))
    except (TypeError, ValueError):
        return True, holder, float("inf"), 0.0
    if _same_machine(rec):
        try:
            alive = _pid_alive(int(rec["pid"]), rec.get("pid_start"))
        except (KeyError, TypeError, ValueError):
            alive = True
        if not alive:
            return True, holder, age, 0.0
    return age > holder_ttl, holder, age, holder_ttl - age


# ------------------------------------------------------------------ the lease

class Lease:
    """The lease of one sweep, held by this process until :meth:`release`."""

    def __init__(self, location: str, name: str, backend: Any, ttl: float, on_lost: Callable[[], None] | None):
        self.location, self.name, self.ttl = location, name, ttl
        self.holder = f"{_HOST}:{os.getpid()}"
        self.uid = uuid.uuid4().hex
        self.acquired = time.time()
        self._backend = backend
        self._on_lost = on_lost
        self._token: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._released = False
        self.lost = False
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        stat = _proc_stat(os.getpid())
        rec = {"holder": self.holder, "host": _HOST, "pid": os.getpid(), "pid_start": stat[1] if stat else None,
               "boot": _BOOT, "pidns": _PIDNS, "uid": self.uid, "ttl": self.ttl,
               "acquired": self.acquired, "renewed": time.time()}
        return json.dumps(rec, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def acquire(cls, storage: str, name: str, *, ttl_s: float | None = None, wait_s: float = 0.0,
                on_lost: Callable[[], None] | None = None) -> "Lease":
        """Take the lease of sweep ``name`` in ``storage``, or raise :class:`LeaseHeld` while
        another holder's lease is fresh (after polling up to ``wait_s`` seconds for it to be
        released or to go stale). Starts the heartbeat; ``on_lost`` is called once, from the
        heartbeat thread, should the lease be found taken over by another driver."""
        ttl = default_ttl() if ttl_s is None else float(ttl_s)
        if not ttl > 0:
            raise ValueError(f"lease TTL must be positive, not {ttl}")
        location = lease_location(storage, name)
        lease = cls(location, name, open_lease_store(location, ttl), ttl, on_lost)
        deadline = time.monotonic() + max(0.0, wait_s)
        delay, failed_tries = 0.1, 0
        while True:
            token = lease._backend.create(lease._record())
            if token is not None:
                return lease._start(token)
            data, current, modified = lease._backend.read()
            if data is None:
                failed_tries += 1
                if failed_tries < 20:
                    continue  # released in between: try again
                raise LeaseHeld(f"sweep {name!r}: its lease at {location} could not be taken (it keeps "
                                f"appearing and vanishing); try again")
            stale, holder, age, left = _judge(data, modified, ttl)
            if stale:
                token = lease._backend.takeover(current, lease._record())
                if token is not None:
                    log.info("took over the stale lease of sweep %r from %s", name, holder)
                    return lease._start(token)
                failed_tries += 1  # another driver won, or the lease changed: look again
                if failed_tries < 20:
                    continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LeaseHeld(f"sweep {name!r} is being run by {holder} (lease renewed {max(age, 0):.0f} s ago, "
                                f"expires in {max(left, 0):.0f} s); wait for it to finish or stop it first",
                                holder, age, left)
            time.sleep(min(delay, remaining))
            delay = min(1.0, delay * 2)

    def _start(self, token: Any) -> "Lease":
        self._token = token
        self._thread = threading.Thread(target=self._heartbeat, name=f"pact-ray-lease-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                still_ours = self._renew_once()
            except Exception as e:  # noqa: BLE001 - storage unreachable: try again next beat
                log.warning("could not renew the lease of sweep %r: %s", self.name, e)
                continue
            if not still_ours:
                break

    def _renew_once(self) -> bool:
        """Renew; False (after calling on_lost once) when the lease is no longer ours."""
        with self._lock:
            if self._stop.is_set():
                return False
            token = self._backend.renew(self.uid, self._token, self._record())
            if token is not None:
                self._token = token
                return True
            # Not renewed: look whose it is.
            data, current, _ = self._backend.read()
            if data is not None and record_uid(data) == self.uid:
                self._token = current  # still ours (e.g. a concurrent conditional write): next beat
                return True
            self.lost = True
            self._stop.set()
        log.warning("sweep %r: this driver's lease was taken over by %s", self.name,
                    (parse_record(data) or {}).get("holder", "nobody") if data is not None else "nobody")
        if self._on_lost is not None:
            try:
                self._on_lost()
            except Exception:  # noqa: BLE001
                log.exception("on_lost callback failed")
        return False

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours; idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._lock:
            if self._released:
                return
            self._released = True
            if not self.lost and self._token is not None:
                try:
                    self._backend.delete(self.uid, self._token)
                except Exception as e:  # noqa: BLE001 - a stale lease is taken over anyway
                    log.warning("could not delete the lease of sweep %r: %s", self.name, e)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
