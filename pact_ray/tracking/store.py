"""Tracking-store addresses: defaults, validation (one clear sentence when unusable), experiments."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing MLflow takes 1.2 s: checking a URI must not wait for it
    from mlflow.tracking import MlflowClient


class TrackingError(ValueError):
    """A tracking URI that cannot be used (one-sentence message)."""


def default_tracking_uri(cwd: str | os.PathLike | None = None) -> str:
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):])


def check_tracking_uri(uri: str, timeout: float = 5.0) -> str:
    """Return ``uri`` if it can be used: an absolute ``sqlite:///`` file that can be opened, or an
    ``http(s)://`` MLflow server that answers. Raises :class:`TrackingError` otherwise."""
    if uri.startswith("sqlite:///"):
        path = sqlite_path(uri)
        if not path.is_absolute():
            raise TrackingError(f"tracking URI {uri} must name an absolute path (sqlite:////abs/path/mlflow.db)")
        if path.exists() and not path.is_file():
            raise TrackingError(f"tracking URI {uri} names {path}, which is not a file")
        if not path.parent.is_dir():
            raise TrackingError(f"tracking URI {uri}: folder {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise TrackingError(f"tracking URI {uri}: {path} is not writable")
        if path.exists():
            # Read-write (never create): a process killed in the middle of a write leaves a hot
            # journal, which SQLite rolls back on the first read. A read-only connection cannot,
            # and would call the store "not an SQLite database" (attempt to write a readonly
            # database), so a sweep killed while writing could never be resumed.
            try:
                con = sqlite3.connect(f"file:{path}?mode=rw", uri=True)
                try:
                    con.execute("select name from sqlite_master limit 1").fetchall()
                finally:
                    con.close()
            except sqlite3.DatabaseError as e:
                raise TrackingError(f"tracking URI {uri}: {path} is not an SQLite database ({e})") from None
        return uri
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                if r.status != 200:
                    raise TrackingError(f"tracking server {uri} answered {r.status} on /health")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(f"tracking server {uri} does not answer ({reason})") from None
        return uri
    raise TrackingError(f"tracking URI {uri!r} is neither an absolute sqlite:/// file nor an http(s):// server")


def env_fast_fail() -> None:
    """Make the MLflow HTTP client fail fast (the writer does its own retrying) and keep it
    from printing a "View run" link for every run it ends (the sweep prints where to look)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def store_files(uri: str) -> list[Path]:
    """The files :func:`prepare_store` creates for a SQLite store: the database and the lock
    file beside it (none for a server)."""
    if not uri.startswith("sqlite:///"):
        return []
    path = sqlite_path(uri)
    return [path, path.with_name(path.name + ".lock")]


def prepare_store(uri: str, announce: bool = False) -> None:
    """Create (or migrate) a SQLite store's schema once, under an exclusive file lock beside
    the database: MLflow's first-time schema creation is not safe against another process
    doing the same at the same moment (two sweeps started together on a new file). A new
    store's schema is made whole before the file appears (:func:`_create_store`). A server
    store needs nothing. MLflow's INFO lines about it ("Creating initial MLflow database
    tables...") are shown only when ``announce`` (a sweep's --verbose): otherwise they would
    stand above the sweep's own progress lines on every first run."""
    if not uri.startswith("sqlite:///"):
        return
    import fcntl
    import logging

    path, lock_path = store_files(uri)
    messages = logging.getLogger("mlflow.store.db.utils")
    level = messages.level
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not announce:
                messages.setLevel(max(level, logging.WARNING))
            _create_store(path)
        finally:
            messages.setLevel(level)
            fcntl.flock(lock, fcntl.LOCK_UN)


CREATING = ".creating-"  # infix of a new store's file while its schema is made


def _create_store(path: Path) -> None:
    """Open the SQLite store at ``path`` once with MLflow, which creates its schema if the file
    is new. A new schema is about 50 migrations, not one transaction, so a process killed
    among them would leave a file no MLflow can open again ("duplicate column name", "table
    ... already exists"). A new store is therefore made in a file beside it and linked into
    place when whole: a kill leaves no store or a whole one, and the stray file is removed by
    the next start (the caller holds the store's lock). The new file starts as a copy of this
    machine's schema template (:func:`schema_template`) where there is one."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    artifacts = str(path.parent / "mlartifacts")  # explicit, so the file's own name matters nowhere
    if path.exists():
        SqlAlchemyStore(f"sqlite:///{path}", default_artifact_root=artifacts).engine.dispose()
        return
    for stray in path.parent.glob(f".{path.name}{CREATING}*"):
        stray.unlink(missing_ok=True)
    copied = path.with_name(f".{path.name}{CREATING}{os.getpid()}")
    # A file of its own for the migrations: MLflow keeps the engine of a URI it opened (that of
    # a template it refused, too) and would reuse its connection to the removed file.
    migrated = path.with_name(f".{path.name}{CREATING}{os.getpid()}-migrated")
    staging = copied
    try:
        if not _open_from_template(copied, artifacts):
            staging = migrated
            SqlAlchemyStore(f"sqlite:///{staging}", default_artifact_root=artifacts).engine.dispose()
            _save_template(staging)
        try:
            os.link(staging, path)  # unlike a rename, never replaces a store made meanwhile outside this lock
        except FileExistsError:
            pass  # that store stands; ours is dropped
        except OSError:  # a filesystem without hard links
            os.rename(staging, path)
    finally:
        for leftover in (copied, migrated):
            leftover.unlink(missing_ok=True)
            leftover.with_name(leftover.name + "-journal").unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash of the machine
    finally:
        os.close(directory)


# A new store's schema is MLflow's ~50 alembic migrations: 0.9-1.5 s of CPU on 2 cores, paid by
# every sweep (and test) that starts a new SQLite store, while Ray starts beside it. MLflow has
# no faster way to make an empty store, so the first store made on a machine leaves a template:
# its file once the migrations ran, with the rows MLflow's store adds on opening (the Default
# experiment, whose artifact location and times belong to that store) removed. A new store is
# then a copy of the template that MLflow opens as usual: it checks the schema's revision
# against its own migrations (an older template, say after an MLflow upgrade, is refused and
# the store is made by the migrations instead) and adds its Default experiment.
# tests/test_sweep_startup.py checks that both ways give the same store.
SCHEMA_TEMPLATE_ENV = "PACT_RAY_SCHEMA_CACHE"
_STORE_OWN_ROWS = ("experiment_tags", "experiments")  # rows MLflow's store adds when it opens an empty schema


def schema_template() -> Path:
    """Where this machine keeps the empty schema of the installed MLflow:
    ``$PACT_RAY_SCHEMA_CACHE`` or ``~/.cache/pact_ray/mlflow_schema``, one file per MLflow version."""
    import mlflow

    root = Path(os.environ.get(SCHEMA_TEMPLATE_ENV) or Path.home() / ".cache" / "pact_ray" / "mlflow_schema")
    return root / f"mlflow-{mlflow.__version__}.db"


def _open_from_template(staging: Path, artifacts: str) -> bool:
    """Make ``staging`` a copy of the schema template and open it with MLflow; False (nothing
    left at ``staging``) where there is no usable template."""
    import shutil

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    try:
        shutil.copyfile(schema_template(), staging)
    except OSError:
        return False
    try:
        SqlAlchemyStore(f"sqlite:///{staging}", default_artifact_root=artifacts).engine.dispose()
        return True
    except Exception:  # noqa: BLE001 - a template MLflow refuses (an older schema, a damaged file) is not used
        staging.unlink(missing_ok=True)
        return False


def _save_template(store: Path) -> None:
    """Keep a copy of the freshly migrated ``store``, less the rows its opening added, as the
    template (replaced in one rename, so a reader never sees half of one). Best effort: a
    cache that cannot be written only means the next store runs the migrations too."""
    target = schema_template()
    part = target.with_name(f".{target.name}.{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(store)) as source, closing(sqlite3.connect(part)) as copy:
            source.backup(copy)
            with copy:  # one transaction
                for table in _STORE_OWN_ROWS:
                    copy.execute(f'DELETE FROM "{table}"')
        os.replace(part, target)
    except (OSError, sqlite3.Error):
        part.unlink(missing_ok=True)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live beside the database (``<db folder>/mlartifacts/<experiment>``),
    not in whatever folder the command ran from; a server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (sqlite_path(uri).parent / "mlartifacts" / experiment.replace("/", "_")).as_uri()
    return None


# The MLflow UI opens an experiment of this kind on its training runs, not on the GenAI
# traces overview it shows for experiments of unknown kind.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def ensure_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name),
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """The commit of the code that runs (empty outside a git checkout)."""
    here = Path(cwd) if cwd else Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def sweep_filter(sweep: str) -> str:
    """The MLflow search filter of a sweep's runs: its parent and every trial carry its name."""
    from pact_ray.tracking.tags import SWEEP_NAME_TAG

    return f"tags.{SWEEP_NAME_TAG} = '{sweep}'"


def runs_page(experiment_id: str, sweep: str | None = None) -> str:
    """The UI's route to an experiment's runs table, filtered to one sweep's runs when given.
    MLflow's UI (3.x) keeps its runs search in the route's query (``searchFilter``, decoded
    with URLSearchParams), so the link opens with the filter applied and shown in its box."""
    from urllib.parse import urlencode

    query = f"?{urlencode({'searchFilter': sweep_filter(sweep)})}" if sweep else ""
    return f"/#/experiments/{experiment_id}/runs{query}"


def run_page(experiment_id: str, run_id: str) -> str:
    """The UI's route to one run."""
    return f"/#/experiments/{experiment_id}/runs/{run_id}"


UI_HOST, UI_PORT = "127.0.0.1", 5000


def ui_base(uri: str, port: int = UI_PORT) -> str:
    """Where the UI of ``uri`` answers: the `mlflow ui` that :func:`ui_command` starts for a
    SQLite store (on ``port``), the server itself otherwise."""
    return f"http://{UI_HOST}:{port}" if uri.startswith("sqlite:///") else uri.rstrip("/")


def ui_command(uri: str, experiment_id: str | None = None, sweep: str | None = None, port: int | None = None) -> str:
    """How to open the MLflow UI on ``uri`` (at the experiment's runs table when given,
    filtered to the runs of ``sweep``). For a SQLite store: the command that serves it, with
    the virtualenv's ``mlflow`` by absolute path (it runs as printed without the venv on
    PATH), on ``port`` or the first free port from 5000; it turns off the job runner that
    `mlflow ui` otherwise starts for MLflow's GenAI jobs (8 more processes, 1.8 GB; see
    pact_ray.tracking.server)."""
    from pact_ray.cli import free_port, shell_join, venv_executable

    page = runs_page(experiment_id, sweep) if experiment_id else ""
    if uri.startswith("sqlite:///"):
        port = free_port(UI_PORT, UI_HOST) if port is None else port
        command = shell_join([venv_executable("mlflow"), "ui", "--host", UI_HOST, "--port", str(port), "--backend-store-uri", uri])
        return f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false {command}, then open {ui_base(uri, port)}{page}"
    return f"open {ui_base(uri)}{page} in a browser"
