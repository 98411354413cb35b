"""One process, one thread writes to MLflow.

The sweep driver owns a single :class:`MlflowWriter`; Tune callbacks only enqueue. The
writer thread applies the operations in order, so the default SQLite store never sees
concurrent writers, trials never wait on tracking, and a tracking server that goes away
for a while only delays the writes: failed operations are retried with backoff until the
server answers again (nothing is dropped while the writer is open).

Runs are addressed through :class:`RunRef` handles that the thread resolves (find or
create) before their first use; a found run remembers the last step it holds, and metric
rows at or below it are skipped, so a resumed sweep never writes a step twice.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pact_ray.errors import first_line
from pact_ray.tracking.store import env_fast_fail
from pact_ray.tracking.tags import STEP_TAG

log = logging.getLogger(__name__)

STEP_METRIC = "loss"  # every reported row has it: its history tells the last step a run holds
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch
MAX_PARAM_LEN = 6000
MAX_ROWS_PER_BATCH = 50  # reported rows coalesced into one write
_STOP = ("stop",)


@dataclass
class RunRef:
    """A run the writer finds or creates on first use (by ``key_tags``)."""

    experiment_id: str
    name: str
    key_tags: dict[str, str]
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None
    run_id: str | None = None
    last_step: int = -1
    resolved: threading.Event = field(default_factory=threading.Event)


def _str(v: Any) -> str:
    return "" if v is None else str(v)[:MAX_PARAM_LEN]


class MlflowWriter:
    """Background MLflow writer; see the module docstring."""

    def __init__(self, tracking_uri: str, retry_max_s: float = 5.0):
        self.tracking_uri = tracking_uri
        self.retry_max_s = retry_max_s
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self.failures = 0  # operations that had to be retried at least once
        self.dropped = 0  # operations given up (a failure that retrying cannot mend)
        self.given_up = 0  # operations given up because the writer closed before the store answered
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="pact-ray-mlflow-writer", daemon=True)
        self._client = MlflowClient(tracking_uri)
        self._thread.start()

    # ----------------------------------------------------------- public API
    def run(self, ref: RunRef) -> RunRef:
        """Find or create ``ref``'s run (asynchronously); returns ``ref``."""
        self._put(("resolve", ref))
        return ref

    def log_metrics(self, ref: RunRef, step: int, metrics: dict[str, float], timestamp_ms: int | None = None) -> None:
        ts = timestamp_ms or int(time.time() * 1000)
        self._put(("metrics", ref, int(step), {k: float(v) for k, v in metrics.items()}, ts))

    def set_tags(self, ref: RunRef, tags: dict[str, Any]) -> None:
        """Set ``tags`` on the run; an empty value (or None) removes the tag where the run has
        it (a run carries no empty tags: the UI would show them as settings)."""
        self._put(("tags", ref, {k: _str(v) for k, v in tags.items()}))

    def terminate(self, ref: RunRef, status: str) -> None:
        self._put(("status", ref, status))

    def call(self, ref: RunRef, fn: Callable[[MlflowClient, str], None]) -> None:
        """Run ``fn(client, run_id)`` in the writer thread (artifacts and the like)."""
        self._put(("call", ref, fn))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        done = threading.Event()
        self._put(("barrier", done))
        return done.wait(timeout)

    def close(self, timeout: float | None = 300.0) -> bool:
        """Flush and stop the thread. Returns False when writes were still pending at the
        timeout; those are given up (the thread stops retrying) and counted in :meth:`pending`."""
        if self._closed:
            return True
        ok = self.flush(timeout)
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout=5)
        return ok

    def pending(self) -> int:
        """Writes not applied yet (the one being retried included)."""
        return self._queue.qsize() + (1 if self._busy else 0) + self.given_up

    # -------------------------------------------------------------- thread
    def _put(self, op: tuple) -> None:
        if self._closed:
            raise RuntimeError("the MLflow writer is closed")
        self._queue.put(op)

    def _run(self) -> None:
        pending = None
        while True:
            op = pending if pending is not None else self._queue.get()
            pending = None
            if op is _STOP:
                return
            self._busy = True
            if op[0] != "metrics":
                self._retry(lambda: self._apply(op))
                self._busy = False
                continue
            # Coalesce consecutive metric rows of one run into one log_batch.
            batch = [op]
            while len(batch) < MAX_ROWS_PER_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is not _STOP and nxt[0] == "metrics" and nxt[1] is op[1]:
                    batch.append(nxt)
                else:
                    pending = nxt
                    break
            self._retry(lambda: self._apply_metrics(batch))
            self._busy = False

    def _retry(self, fn: Callable[[], None]) -> None:
        """Apply ``fn`` until it succeeds while the failure is the tracking store being away
        (retried with backoff, without bound while the writer is open); a failure no retry can
        mend (a rejected value, a bug) is retried ``PERMANENT_ATTEMPTS`` times, then logged and
        dropped, so one bad write never stalls the sweep."""
        delay = 0.25
        attempts = 0
        while True:
            try:
                fn()
                return
            except Exception as e:  # noqa: BLE001 - a tracking failure is never fatal to the sweep
                attempts += 1
                if self._closed:  # the sweep stopped waiting: leave it to --resume's replay
                    self.given_up += 1
                    return
                transient = is_transient(e)
                if attempts == 1:
                    self.failures += 1
                    log.warning("MLflow write failed (%s); %s", first_line(e, 200),
                                "retrying until the tracking store answers" if transient else "retrying it twice")
                if not transient and attempts >= PERMANENT_ATTEMPTS:
                    self.dropped += 1
                    log.error("MLflow write dropped after %d attempts: %s", attempts, first_line(e, 300))
                    return
                time.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)

    def _resolve(self, ref: RunRef) -> None:
        if ref.run_id is not None:
            return
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in ref.key_tags.items())
        found = self._client.search_runs([ref.experiment_id], filter_string=flt, max_results=2)
        if found:
            run = found[0]
            ref.run_id = run.info.run_id
            history = self._client.get_metric_history(ref.run_id, STEP_METRIC)
            ref.last_step = max((m.step for m in history), default=-1)
            if run.info.status != "RUNNING":
                self._client.update_run(ref.run_id, status="RUNNING")
        else:
            tags = {**ref.tags, **ref.key_tags, MLFLOW_RUN_NAME: ref.name}
            if ref.parent_run_id:
                tags[MLFLOW_PARENT_RUN_ID] = ref.parent_run_id
            run = self._client.create_run(ref.experiment_id, run_name=ref.name,
                                          tags={k: _str(v) for k, v in tags.items() if _str(v) != ""})
            ref.run_id = run.info.run_id
            if ref.params:
                params = [Param(k, _str(v)) for k, v in ref.params.items()]
                for i in range(0, len(params), 100):
                    self._client.log_batch(ref.run_id, params=params[i : i + 100])
        ref.resolved.set()

    def _apply(self, op: tuple) -> None:
        kind = op[0]
        if kind == "barrier":
            op[1].set()
            return
        ref = op[1]
        self._resolve(ref)
        if kind == "resolve":
            return
        if kind == "tags":
            kept = [RunTag(k, v) for k, v in op[2].items() if v != ""]
            if kept:
                self._client.log_batch(ref.run_id, tags=kept)
            for key in (k for k, v in op[2].items() if v == ""):
                self._delete_tag(ref.run_id, key)
        elif kind == "status":
            self._client.set_terminated(ref.run_id, status=op[2])
        elif kind == "call":
            op[2](self._client, ref.run_id)

    def _delete_tag(self, run_id: str, key: str) -> None:
        """Remove a tag where the run has it (a run that never had it is left as it is)."""
        try:
            self._client.delete_tag(run_id, key)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise

    def _apply_metrics(self, batch: list[tuple]) -> None:
        ref = batch[0][1]
        self._resolve(ref)
        rows: list[Metric] = []
        top = ref.last_step
        for _, _, step, metrics, ts in batch:
            if step <= ref.last_step:
                continue  # already in the store (a resumed trial re-reports steps after its checkpoint)
            rows.extend(Metric(k, v, ts, step) for k, v in metrics.items())
            top = max(top, step)
        for i in range(0, len(rows), MAX_BATCH):
            last = i + MAX_BATCH >= len(rows)
            # The step count travels as a tag in the same request: a "step" metric would be
            # the first axis MLflow's chart views offer, and it is not a result.
            tags = [RunTag(STEP_TAG, str(top))] if last else []
            self._client.log_batch(ref.run_id, metrics=rows[i : i + MAX_BATCH], tags=tags)
        ref.last_step = top


PERMANENT_ATTEMPTS = 3
# MLflow error codes that mean "try again later": the server or its database is busy or away.
TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"})
TRANSIENT_TEXT = ("API request to", "Connection", "connection", "Max retries", "timed out", "database is locked")


def is_transient(error: BaseException) -> bool:
    """Whether a failed write may succeed later: the network or the store is away or busy
    (connection errors, timeouts, HTTP 5xx, SQLite's "database is locked"), as opposed to a
    write the store rejects or a bug."""
    if isinstance(error, (OSError, TimeoutError)):  # requests' errors derive from OSError
        return True
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code in TRANSIENT_CODES or any(t in str(error) for t in TRANSIENT_TEXT)
    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover - SQLAlchemy ships with MLflow
        return False
    return isinstance(error, OperationalError)


_SHARED: dict[str, MlflowWriter] = {}


def shared_writer(tracking_uri: str) -> MlflowWriter:
    """The process's one writer for ``tracking_uri`` (created on first use)."""
    w = _SHARED.get(tracking_uri)
    if w is None or w._closed:
        env_fast_fail()
        w = _SHARED[tracking_uri] = MlflowWriter(tracking_uri)
    return w


_CLOSED: dict[str, MlflowWriter] = {}  # the last closed writer of each store (its unsent count)


def close_shared(tracking_uri: str, timeout: float | None = 300.0, keep_open: bool = False) -> bool:
    """Flush (``keep_open``: only flush) and close the shared writer of ``tracking_uri``;
    False if writes were still pending at the timeout."""
    w = _SHARED.get(tracking_uri)
    if w is None:
        return True
    if keep_open:
        return w.flush(timeout)
    _SHARED.pop(tracking_uri)
    _CLOSED[tracking_uri] = w
    return w.close(timeout)


def pending_writes(tracking_uri: str, closed: bool = False) -> int:
    """Writes the (``closed``: last closed) shared writer of ``tracking_uri`` has not applied."""
    w = (_CLOSED if closed else _SHARED).get(tracking_uri)
    return 0 if w is None else w.pending()


def status_name(ok: bool) -> str:
    return RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
