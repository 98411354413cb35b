"""The sweep command shared by every sweep script (``sweeps/*.py`` are thin wrappers).

One invocation = one Ray Tune experiment in ``<storage-path>/<name>`` and one MLflow parent
run in the experiment ``pact-ray/<script>``; each trial is a nested child run. ``--resume``
restores the Ray experiment and continues the same parent and child runs.

The order matters: the plan is made and checked (:mod:`pact_ray.tune.plan`), Ray starts
while the driver prepares its store (:mod:`pact_ray.tune.prepare`), Ray's resources are
checked, and only then is the sweep created; Tune fits (:mod:`pact_ray.tune.launch`) and the
summary follows (:mod:`pact_ray.tune.finish`).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pact_ray.cli import user_errors
from pact_ray.errors import first_line
from pact_ray.kinds import RunKind, get_kind
from pact_ray.tune import launch, prepare
from pact_ray.tune.finish import (
    EXIT_DISK_FULL,
    EXIT_INTERRUPTED,
    EXIT_UNSENT,
    finish,
    flush_tracking,
    replay_results,
    root_cause,
    storage_full,
)
from pact_ray.tune.flags import build_parser
from pact_ray.tune.storage import open_storage
from pact_ray.tune.plan import (
    AUTO,
    SweepError,
    SweepPlan,
    check_cluster_paths,
    check_writable,
    make_plan,
    optuna_storage_url,
    original_args,
    read_manifest,
    resume_command,
    safe_name,
    searched,
    storage_path,
    validate_inputs,
)

__all__ = ["EXIT_DISK_FULL", "EXIT_INTERRUPTED", "EXIT_UNSENT", "SweepError", "run_sweep", "sweep_command"]


def sweep_command(kind: RunKind | str, argv: list[str] | None, description: str) -> int:
    """A sweep script's ``main``: :func:`run_sweep`; run as a command (``argv`` None, the
    process is the script's own), the process then exits at once (:func:`pact_ray.cli.exit_now`)."""
    code = run_sweep(kind, argv, description)
    if argv is None:
        from pact_ray.cli import exit_now

        exit_now(code)
    return code


def run_sweep(kind: RunKind | str, argv: list[str] | None = None, description: str = "") -> int:
    """Entry point of every sweep script. Returns the process exit status."""
    kind = get_kind(kind) if isinstance(kind, str) else kind
    head, _, examples = (description or kind.script).strip().partition("\n\n")
    parser = build_parser(kind, head, examples)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    launch.keep_local_ray_on_loopback(args.address)  # before anything imports Ray
    return user_errors(lambda: _start(kind, parser, args))


class _StorageFull(Exception):
    """The storage filled up during the sweep; carries the one sentence to end with. It is
    printed by :func:`_start` after the lease is released, so that nothing (the lease's
    heartbeat failing to write on the same full disk) is printed after it."""


def _start(kind: RunKind, parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        return _start_leased(kind, parser, args)
    except _StorageFull as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DISK_FULL


def _start_leased(kind: RunKind, parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """One driver per sweep: where the sweep's storage exists, its lease is taken before the
    sweep's state is read (so that a second driver, ``--resume auto`` or not, is refused
    before it looks); otherwise the sweep is new, and its lease is taken where its folder is
    made, after every check (nothing is created before them)."""
    lease = None
    try:
        storage = storage_path(args.storage_path)
        if args.name:
            check_writable(storage)  # one sentence for a store that does not answer, before anything reads it
        if args.name and open_storage(storage).exists():
            lease = _lease(storage, safe_name(args.name), wait=args.resume == AUTO)
        resolved = original_args(parser, args) if args.resume else args
        if isinstance(resolved, str):  # --resume auto of a sweep that has finished
            print(resolved)
            return 0
        return _run(kind, resolved, lease)
    finally:
        if lease is not None:
            lease.release()


def _lease(storage: str, name: str, wait: bool):
    """The sweep's driver lease (pact_ray.tune.lease), or a SweepError naming its holder. A
    ``--resume auto`` waits for a lease that may belong to a driver killed on another machine
    to go stale; a driver that loses its lease stops its sweep as after a SIGTERM."""
    import os
    import signal

    from pact_ray.tune.lease import Lease, LeaseHeld, default_ttl

    check_writable(storage)
    try:
        return Lease.acquire(storage, name, wait_s=default_ttl() + 10 if wait else 0.0,
                             on_lost=lambda: os.kill(os.getpid(), signal.SIGTERM))
    except LeaseHeld as e:
        raise SweepError(str(e)) from None


def _run(kind: RunKind, args: argparse.Namespace, lease=None) -> int:
    """Check everything, connect Ray and check the resources asked for, then (and only then)
    create the sweep: its folder with the manifest atomically, the MLflow parent run."""
    plan = make_plan(kind, args)
    check_writable(plan.storage)
    check_writable(str(plan.summary_dir), "--summary-dir")
    own: list = []  # the lease this driver takes as it creates the sweep (none was taken before)
    try:
        return _run_planned(plan, args, lambda: lease or own.append(_lease(plan.storage, plan.name, wait=False)))
    finally:
        for taken in own:
            taken.release()


def _run_planned(plan: SweepPlan, args: argparse.Namespace, hold_lease) -> int:
    import ray

    from pact_ray.tracking.store import env_fast_fail

    kind = plan.kind
    manifest = read_manifest(plan) if args.resume else None
    if manifest is not None:
        if args.tracking_uri and args.tracking_uri != manifest["tracking_uri"]:
            raise SweepError(f"sweep {plan.name!r} logs to {manifest['tracking_uri']}; resume it with that --tracking-uri or without the flag")
        plan.tracking_uri = manifest["tracking_uri"]
        if manifest.get("kind") != kind.name:
            raise SweepError(f"sweep {plan.name!r} is a {manifest.get('kind')!r} sweep, not {kind.name!r}")
    elif plan.store.exists():
        raise SweepError(f"sweep {plan.name!r} already exists at {plan.exp_dir}; pass --resume to continue it or choose another --name")
    validate_inputs(plan)
    env_fast_fail()
    store = prepare.prepare_while_ray_starts(plan)
    with store.undone_on_error():
        started_ray = launch.connect_ray(args.address, verbose=args.verbose)
    parent_id = None
    client = None
    try:
        with store.undone_on_error():
            launch.check_resources(plan)
        check_cluster_paths(plan)
        store.wait()  # first: MLflow and torch are imported there
        with store.undone_on_error():
            datasets = prepare.describe_datasets(plan)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(plan.tracking_uri)
        hold_lease()
        experiment_id, parent_id = prepare.open_sweep(plan, client, manifest)
        return _train_and_report(plan, client, experiment_id, parent_id, datasets, started_ray)
    except KeyboardInterrupt:  # a second Ctrl-C, or one during start-up
        if client is not None and parent_id is not None:
            client.set_terminated(parent_id, status="KILLED")
        print(f"\nInterrupted. Continue with: {resume_command(plan)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if started_ray and ray.is_initialized():
            launch.stop_ray()  # nothing of Ray's is printed after the summary


def _callbacks(plan: SweepPlan, experiment_id: str, parent_id: str, datasets: dict[str, Any]):
    """(every Tune callback of the sweep, its MLflow callback, its interrupt handler)."""
    from pact_ray.tracking.callback import MlflowSweepCallback
    from pact_ray.tracking.store import git_commit
    from pact_ray.tune.interrupt import DriverInterrupts, RetryOnlyFailures
    from pact_ray.tune.progress import ProgressLines
    from pact_ray.tune.state import StateBackup

    args = plan.args
    optuna_url = optuna_storage_url(plan) if args.search == "optuna" else None
    mlflow_callback = MlflowSweepCallback(plan.tracking_uri, experiment_id, parent_id, plan.kind.name, plan.name, git_commit(),
                                          datasets=datasets, optuna_storage=optuna_url)
    interrupts = DriverInterrupts(plan.name)
    callbacks: list = [mlflow_callback, RetryOnlyFailures(interrupts, args.max_failures), *launch.result_loggers()]
    if plan.local_dir is not None:
        callbacks.append(StateBackup(str(plan.local_dir)))
    if not args.quiet:
        planned = None if args.until_conclusive else args.num_samples if args.search == "optuna" else len(plan.trial_configs)
        callbacks.append(ProgressLines({tc["variant"]: cfg.steps for tc, (_, cfg) in zip(plan.trial_configs, plan.configs)},
                                       numbered=args.search == "optuna", planned=planned))
    return callbacks, mlflow_callback, interrupts


def _train_and_report(plan: SweepPlan, client, experiment_id: str, parent_id: str, datasets: dict[str, Any],
                      started_ray: bool) -> int:
    from pact_ray.tracking.writer import shared_writer

    args = plan.args
    shared_writer(plan.tracking_uri)
    callbacks, mlflow_callback, interrupts = _callbacks(plan, experiment_id, parent_id, datasets)
    t0 = time.time()
    tuner = launch.make_tuner(plan, callbacks, args.resume, client, parent_id)
    if args.resume:  # what the tracking store missed last time (absent, or the driver died first)
        if plan.local_dir is not None:
            replay_results(plan.local_dir, mlflow_callback)
        else:  # an object store: its copy of Ray's result files, read from a temporary folder
            with tempfile.TemporaryDirectory(prefix="pact-ray-replay-") as d:
                plan.store.fetch_results(Path(d))
                replay_results(Path(d), mlflow_callback)
    try:
        with interrupts, launch.searcher_metric_at_evaluations(searched(args)):
            results = tuner.fit()
    except Exception as e:
        if not storage_full(plan, e):
            # The sweep itself failed (a bug, or Ray's own error), not one of its trials: end its
            # open MLflow runs as FAILED rather than leave them RUNNING, and say how to go on.
            cause = root_cause(e)
            mlflow_callback.abandon(f"the sweep failed: {cause}")
            with contextlib.suppress(Exception):  # a store that is away must not hide the error
                client.set_terminated(parent_id, status="FAILED")
            print(f"error: the sweep failed ({cause[:300]}); its MLflow runs are marked FAILED. "
                  f"Once the cause is fixed, continue with: {resume_command(plan)}", file=sys.stderr)
            raise
        client.set_terminated(parent_id, status="KILLED")
        free = f"{shutil.disk_usage(plan.storage).free / 2**20:.1f} MiB free" if plan.local_dir else "full"
        raise _StorageFull(f"the storage {plan.storage} is full ({free}; {first_line(e)}). Free some space, then run: "
                           f"{resume_command(plan)}") from None
    finally:
        unsent = flush_tracking(plan)
    return finish(plan, client, experiment_id, parent_id, results, interrupts.signal, unsent,
                  launch.stop_ray if started_ray else None, t0)
