"""What the driver prepares before the trials start: the modules and the MLflow store it
needs, made ready in a thread while Ray starts; the sweep's folder and manifest, created in one
rename; the MLflow parent run; the data sets, described for MLflow.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pact_ray.kinds import RunKind
from pact_ray.tune import fast_start
from pact_ray.tune.manifest import write_manifest
from pact_ray.tune.plan import SweepError, SweepPlan, first_of_each_kind
from pact_ray.tune.storage import open_storage


def import_driver_modules(kinds: tuple[RunKind, ...] = ()) -> None:
    """The modules the driver needs once Ray is up (MLflow's store, the report: matplotlib,
    scipy; Ray Tune and the sweep's callbacks: 0.5 s; the training modules of ``kinds``, with
    torch, only where a synthetic data set is still to be generated: 1.2 s), none of which
    ``ray.init`` imports once :data:`pact_ray.tune.fast_start.IMPORTED_BY_BOTH` are. The driver
    reads every config before, without torch (pact_ray.runs), so that Ray starts a second
    sooner; with its data cached it never imports torch (the trials do)."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    from ray import tune  # noqa: F401

    for kind in kinds:
        kind.training()
    import pact_ray.report.ablation  # noqa: F401
    import pact_ray.report.summary  # noqa: F401
    import pact_ray.report.sweep_summary  # noqa: F401
    import pact_ray.tracking.callback  # noqa: F401
    import pact_ray.tracking.sweep_run  # noqa: F401
    import pact_ray.tracking.writer  # noqa: F401
    import pact_ray.tune.finish  # noqa: F401
    import pact_ray.tune.interrupt  # noqa: F401
    import pact_ray.tune.progress  # noqa: F401
    import pact_ray.tune.state  # noqa: F401
    import pact_ray.tune.trainables  # noqa: F401


class StorePreparation:
    """What the driver prepares in one thread while Ray starts (2.5-4 s spent mostly waiting on
    the processes it spawns, which leaves a core free): it imports what the driver needs once
    Ray is up (torch and the trainers, MLflow's store, the report and Ray Tune: 3 s) and,
    where the sweep starts its own Ray and the trials fit this machine, creates a new SQLite
    store (a copy of the schema template, or 1.5 s of alembic the first time); otherwise the
    store is made in place, after Ray's resource check, by ``wait``.

    Two threads importing the same package at once can see a module half made where its
    modules import each other in cycles (MLflow's do). So MLflow itself, and the few modules
    of Ray's that both sides import, are imported before the thread starts, and the thread
    imports no module that Ray's start-up imports (checked by tests/test_sweep_startup.py)."""

    def __init__(self, plan: SweepPlan, early: bool):
        import threading

        import mlflow.tracking  # noqa: F401 - here, before the thread: see the class docstring

        fast_start.import_shared_modules()

        from pact_ray.tracking.store import store_files

        self.uri = plan.tracking_uri
        # The trainers (and torch) only for the data sets the driver must generate (describe_datasets).
        self.kinds = tuple(kind for kind, cfg in first_of_each_kind(plan) if cfg.data_folder() is None)
        self.announce = bool(plan.args.verbose)
        self.early = early
        self._new = [p for p in store_files(self.uri) if not p.exists()] if early else []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._prepare, name="pact-ray-preparation", daemon=True)
        self._thread.start()

    def _prepare(self) -> None:
        with contextlib.suppress(Exception):  # an import failing here fails again, with its message, where it is needed
            import_driver_modules(self.kinds)
        if self.early:
            from pact_ray.tracking.store import prepare_store

            try:
                prepare_store(self.uri, self.announce)
            except BaseException as e:  # noqa: BLE001 - raised by wait(), in the driver's thread
                self._error = e

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if not self.early:
            from pact_ray.tracking.store import prepare_store

            prepare_store(self.uri, self.announce)

    def undo(self) -> None:
        """Remove what an early preparation created: the sweep is refused after all."""
        self._thread.join()
        for path in self._new:
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def undone_on_error(self):
        """Undo the preparation when the block fails (Ray does not start, or refuses the sweep)."""
        try:
            yield
        except BaseException:
            self.undo()
            raise


def prepare_while_ray_starts(plan: SweepPlan) -> StorePreparation:
    import ray

    args = plan.args
    starts_ray = args.address in (None, "local") and not ray.is_initialized()
    # The authoritative check is check_resources, on Ray's own view of the machine; this one
    # only decides whether the store may be created before it (undone if Ray disagrees).
    fits = args.cpus_per_trial <= len(os.sched_getaffinity(0)) and args.gpus_per_trial == 0
    return StorePreparation(plan, early=starts_ray and fits)


def open_sweep(plan: SweepPlan, client, manifest: dict[str, Any] | None) -> tuple[str, str]:
    """(experiment id, parent run id) of the sweep: a new one's folder and manifest appear in
    one rename (so a half-made sweep never exists), then its parent run; a resumed one gets
    the parent run its start-up may not have made yet."""
    from pact_ray.tracking.store import ensure_experiment, git_commit
    from pact_ray.tracking.sweep_run import create_parent

    kind, args = plan.kind, plan.args
    if manifest is None:
        manifest = {"kind": kind.name, "name": plan.name, "tracking_uri": plan.tracking_uri, "experiment_id": None,
                    "parent_run_id": None, "argv": list(getattr(args, "argv", sys.argv[1:])), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "summary_dir": str(plan.summary_dir), "uid": uuid.uuid4().hex}
        if plan.local_dir is not None:
            create_sweep_folder(plan.local_dir, manifest)
        else:  # an object store: one PUT of the manifest is atomic by itself
            plan.store.create()
            write_manifest(plan.store, manifest)
    if manifest.get("parent_run_id"):
        client.update_run(manifest["parent_run_id"], status="RUNNING")
        return manifest["experiment_id"], manifest["parent_run_id"]
    experiment_id = ensure_experiment(client, kind.experiment)
    uid = manifest.get("uid")
    if uid:  # a start killed between creating the parent run and recording its id: adopt that run
        from pact_ray.report.summary import search_all
        from pact_ray.tracking.tags import SWEEP_UID_TAG

        made = sorted(search_all(client, [experiment_id], f"tags.`{SWEEP_UID_TAG}` = '{uid}'"), key=lambda r: r.info.start_time)
        for extra in made[1:]:
            client.delete_run(extra.info.run_id)
        if made:
            parent_id = made[0].info.run_id
            client.update_run(parent_id, status="RUNNING")
            write_manifest(plan.store, {**manifest, "experiment_id": experiment_id, "parent_run_id": parent_id})
            return experiment_id, parent_id
    parent_id = create_parent(
        client, experiment_id, plan.name, uid=uid,
        tags={"kind": kind.name, "profile": args.profile, "model": args.model, "search": args.search, "git_commit": git_commit()},
        params={"profile": args.profile, "model": args.model, "search": args.search, "variants": args.variants,
                "seeds": args.seeds, "until_conclusive": args.until_conclusive, "cpus_per_trial": args.cpus_per_trial,
                "gpus_per_trial": args.gpus_per_trial},
    )
    write_manifest(plan.store, {**manifest, "experiment_id": experiment_id, "parent_run_id": parent_id})
    return experiment_id, parent_id


def create_sweep_folder(exp_dir: Path, manifest: dict[str, Any]) -> None:
    """Make ``exp_dir`` holding ``manifest`` in one rename of a folder prepared beside it."""
    try:
        exp_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{exp_dir.name}.starting-", dir=exp_dir.parent))
    except OSError as e:
        raise SweepError(f"cannot create the sweep folder in {exp_dir.parent} ({e.strerror})") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; a sweep folder is an ordinary one
        write_manifest(open_storage(str(staging)), manifest)
        os.rename(staging, exp_dir)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if exp_dir.exists():
            raise SweepError(f"sweep {exp_dir.name!r} already exists at {exp_dir}; pass --resume to continue it or choose another --name") from None
        raise SweepError(f"cannot create the sweep folder {exp_dir} ({e.strerror})") from None


def describe_datasets(plan: SweepPlan) -> dict[str, Any]:
    """Each run kind's data set as an MLflow dataset input. Synthetic data is generated (once,
    here in the driver, before any trial starts) where the cache does not hold it yet; data
    that is there is described without torch (``RunConfig.data_folder``)."""
    from pact_ray.tracking.datasets import describe_dataset

    return {kind.name: describe_dataset(cfg.data_folder() or kind.dataset(cfg).folder) for kind, cfg in first_of_each_kind(plan)}
