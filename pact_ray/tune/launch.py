"""Ray and Tune: connect to (or start) Ray, build the Tuner of a plan (a new sweep, or one
restored from its storage), in the shape of Ray Tune's own examples, and stop the Ray this
process started. Ray's private internals are used only through :mod:`pact_ray.tune.fast_start`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any

from pact_ray.errors import first_line
from pact_ray.metrics import names as M
from pact_ray.tune import fast_start
from pact_ray.tune.manifest import MANIFEST
from pact_ray.tune.plan import (
    SweepError,
    SweepPlan,
    asha_rungs,
    num_samples,
    optuna_storage_url,
    verdict_metric,
)
from pact_ray.tune.storage import open_storage


def make_tuner(plan: SweepPlan, callbacks: list, resume: bool, client=None, parent_id: str | None = None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pact_ray.tune.state import repair, restorable
    from pact_ray.tune.trainables import trainable_of

    kind, args = plan.kind, plan.args
    trainable = tune.with_resources(trainable_of(kind), {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    if resume:
        exp_dir = plan.local_dir
        for note in repair(exp_dir) if exp_dir is not None else []:
            print(f"Ray's experiment state: {note}")
        if exp_dir is None or restorable(exp_dir):
            if exp_dir is None and not tune.Tuner.can_restore(plan.store.path, storage_filesystem=plan.store.ray_filesystem):
                raise SweepError(f"sweep {plan.name!r} at {plan.exp_dir} has no Ray state to resume")
            tuner = tune.Tuner.restore(plan.store.path, storage_filesystem=plan.store.ray_filesystem, trainable=trainable,
                                       resume_unfinished=True, resume_errored=True)
            if not fast_start.set_restored_callbacks(tuner, callbacks, verbose=1 if args.verbose else 0):
                print("This resume logs through the first command's callbacks (Ray's public restore keeps them).")
            return tuner
        # Killed before Ray wrote a readable state: start the trials again, under the same parent run.
        print("Ray's experiment state cannot be read back (the sweep stopped while starting, or its disk filled); "
              "its trials start again.")
        _restart(plan, client, parent_id)
    space, searcher = param_space(plan)
    steps = max(cfg.steps for _, cfg in plan.configs)
    # ASHA compares trials on the metric the searchers judge them by (the held-out verdict
    # metric), at its rungs, where every trial validates (make_plan adds them to eval_steps).
    grace, factor, _ = asha_rungs(steps)
    metric = verdict_metric(plan)
    scheduler = ASHAScheduler(metric=metric, mode=M.metric_mode(metric), time_attr="training_iteration", max_t=steps,
                              grace_period=grace, reduction_factor=factor) if args.scheduler == "asha" else None
    tune_config = tune.TuneConfig(
        search_alg=searcher, scheduler=scheduler,
        num_samples=num_samples(plan),
        max_concurrent_trials=args.max_concurrent or None,
        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        # Every trial asks for the same resources: reusing the worker process saves each
        # trial the seconds of a fresh interpreter importing torch.
        reuse_actors=True,
    )
    root = open_storage(plan.storage)
    run_config = tune.RunConfig(
        name=plan.name, storage_path=root.path, storage_filesystem=root.ray_filesystem, callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=args.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=3),
        verbose=1 if args.verbose else 0,  # Ray's own per-trial boxes only when asked for
    )
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)


def _restart(plan: SweepPlan, client, parent_id: str | None) -> None:
    """Clear a sweep whose start-up was cut short, keeping its manifest; its trials' MLflow
    runs (if the start got that far) are deleted, so none is left twice."""
    from pact_ray.tracking.tags import SWEEP_TAG
    from pact_ray.tune.state import reset

    reset(plan.local_dir, keep=(MANIFEST,))
    if client is not None and parent_id:
        from pact_ray.report.summary import search_all

        experiment_id = client.get_run(parent_id).info.experiment_id
        for run in search_all(client, [experiment_id], f"tags.`{SWEEP_TAG}` = '{parent_id}'"):
            client.delete_run(run.info.run_id)


def param_space(plan: SweepPlan) -> tuple[dict[str, Any], Any]:
    """(Tune param_space, search algorithm or None)."""
    from ray import tune

    args = plan.args
    variants = list(dict.fromkeys(tc["variant"] for tc in plan.trial_configs))
    seeds = list(dict.fromkeys(tc["seed"] for tc in plan.trial_configs))
    if args.until_conclusive:
        from pact_ray.tune.adaptive import AdaptiveSeedSearcher

        metric = verdict_metric(plan)
        return dict(plan.base), AdaptiveSeedSearcher(plan.base, variants, seeds, args.until_conclusive, metric=metric,
                                                     mode=M.metric_mode(metric), margin=plan.design.margin)
    if args.search == "grid":
        return {**plan.base, "variant": tune.grid_search(variants), "seed": tune.grid_search(seeds)}, None
    tc = plan.trial_configs[0]
    variant = plan.kind.variants[tc["variant"]]
    space = {**plan.base, "variant": tc["variant"], "seed": tc["seed"]}
    for key in variant.knobs:
        if key in plan.base:
            continue  # fixed by --set
        knob = plan.kind.knobs[key]
        if knob.integer:
            space[key] = tune.randint(int(knob.low), int(knob.high) + 1)
        else:
            space[key] = tune.loguniform(knob.low, knob.high) if knob.log else tune.uniform(knob.low, knob.high)
    from pact_ray.tune.optuna import linked_optuna_search

    metric = verdict_metric(plan)
    defaults = {k: v for k, v in plan.configs[0][1].flat().items() if k in variant.knobs and k not in plan.base}
    return space, linked_optuna_search(metric, M.metric_mode(metric), args.optuna_seed, optuna_storage_url(plan), plan.name,
                                       steps=plan.configs[0][1].steps, verbose=args.verbose, defaults=defaults)


def _trial_name(trial) -> str:
    cfg = trial.config
    return f"{cfg.get('variant', 'trial')}_s{cfg.get('seed', 0)}_{trial.trial_id}"


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_local_ray_on_loopback(address: str | None) -> None:
    """A local Ray (``address`` None or "local") listens on loopback only. Ray 2.60 binds its
    GCS, raylet and workers to every interface on Linux, whatever ``--node-ip-address`` says
    (it resolves 127.0.0.1 to the machine's address); with clusters switched off through
    Ray's own ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its default on macOS and Windows),
    the node's address is the loopback one and every process binds there. Ray reads the
    variable when it is imported, so this runs before the driver imports Ray, and its
    processes inherit it; in a process that has imported Ray already (a sweep run from Python)
    it would change nothing there and only reach later children, so it is left alone. A user
    who wants the local instance reachable sets the variable to 1."""
    import sys

    if address in (None, "local") and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")


def init_ray(address: str | None, verbose: bool = False) -> bool:
    """Connect to ``address`` or start a local Ray instance; False when one was already up.
    Workers' output reaches the terminal only with ``verbose``; Ray's own log lines only
    from warnings up."""
    import ray

    if not verbose:
        # Ray's newer output engine prints its configuration box and paths whatever the
        # verbosity; the older one prints nothing at verbosity 0. The progress lines are ours.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if ray.is_initialized():
        return False
    if address in (None, "local"):
        # A local Ray reachable from this machine only (keep_local_ray_on_loopback) needs no
        # token; a cluster is joined with whatever authentication it has (RAY_AUTH_MODE=token
        # and RAY_AUTH_TOKEN where it is on: docs/sweeps.md).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=verbose, configure_logging=True,
                              logging_level=logging.INFO if verbose else logging.WARNING)
    # "local": always a private instance. Without it ray.init() joins whatever local cluster
    # /tmp/ray/ray_current_cluster names (another sweep's, which may end under this one).
    with _daemons_in_a_group_of_their_own(address in (None, "local")):
        ray.init(address=address or "local", **kw)
    if not verbose:
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
        # Ray logs every failed trial with its traceback and ends with "Trials did not complete":
        # the progress lines name each failure in one line with its error file, and the summary
        # lists the errors, so these stay for --verbose.
        for name in ("ray.tune.execution.tune_controller", "ray.tune.tune", "ray.train._internal.syncer"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        # "Experiment state snapshotting has been triggered multiple times..." (a hint to raise
        # num_to_keep or the sync period) fires for short steps that checkpoint often; its errors stay.
        logging.getLogger("ray.tune.execution.experiment_state").setLevel(logging.ERROR)
    return True


@contextlib.contextmanager
def _daemons_in_a_group_of_their_own(local: bool):
    """A local Ray's processes (GCS, raylet, agents) must outlive a SIGTERM sent to the
    driver's process group (``kill -TERM -PGID``, a shell's job control, a batch system's
    preemption): the driver then stops the trials at their next step, which needs that Ray.
    (Ray already blocks SIGINT in them, and its workers make process groups of their own.)

    Where the driver is not its group's leader (run by make, a script or a batch system), it
    starts them in a new group and goes back to its own: they are out of reach of the group's
    signals. A group leader (a shell's foreground job) cannot leave its group; it starts them
    with SIGTERM blocked, which they inherit, so that their own stop takes Ray's SIGKILL a
    second later (ray.shutdown waits 1 s on each). Either way Ray still stops them with the
    driver: ray.shutdown, or the kernel when the driver dies."""
    import signal

    original = os.getpgrp()
    moved = blocked = False
    if local:
        if original != os.getpid():
            with contextlib.suppress(OSError):
                os.setpgid(0, 0)
                moved = True
        if not moved:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            blocked = True
    try:
        yield
    finally:
        if moved:
            with contextlib.suppress(OSError):
                os.setpgid(0, original)
        if blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def stop_ray() -> None:
    """``ray.shutdown()`` of the Ray this process started or joined."""
    import ray

    ray.shutdown()


def connect_ray(address: str | None, verbose: bool = False) -> bool:
    """:func:`init_ray`, failing in one sentence (not retrying for minutes) when ``address``
    does not answer."""
    if address and address not in ("auto", "local"):
        host, _, port = address.split("://")[-1].rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S):
                pass
        except (OSError, ValueError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise SweepError(f"--address {address}: no Ray cluster answers there ({reason}); start it (ray start --head) "
                             "or fix the address") from None
    try:
        return init_ray(address, verbose)
    except ConnectionError as e:
        raise SweepError(f"--address {address}: {first_line(e)}") from None


CONNECT_TIMEOUT_S = 5.0


def check_resources(plan: SweepPlan) -> None:
    """A trial's CPUs and GPUs must fit on one node of the cluster, or Tune would wait forever."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    args = plan.args
    for key, asked, flag in (("CPU", args.cpus_per_trial, "--cpus-per-trial"), ("GPU", args.gpus_per_trial, "--gpus-per-trial")):
        most = max((n.get(key, 0.0) for n in nodes), default=0.0)
        if asked > most:
            where = "this machine" if not args.address else "any node of the cluster"
            raise SweepError(f"{flag} {asked:g} asks for more {key}s than {where} has ({most:g}); no trial could ever start")


def result_loggers() -> list:
    """The result files Ray Tune writes in each trial's folder: ``result.json`` and
    ``params.json`` (``--resume`` replays them into MLflow) and ``progress.csv`` (Ray's
    ``Result.metrics_dataframe``), but not the TensorBoard event files Tune adds by default:
    MLflow is where runs are compared, and tensorboardX imports torch into the driver (1.2 s
    of every sweep's start-up, before the first trial) and writes every result once more.
    ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0`` brings Tune's default loggers back."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    return [JsonLoggerCallback(), CSVLoggerCallback()]


@contextlib.contextmanager
def searcher_metric_at_evaluations(searched: bool):
    """Tune checks that every result holds its searcher's metric; ours (Optuna's objective, the
    adaptive seeds' verdicts) is the held-out metric, which only evaluation steps report. The
    check stays on for sweeps without a searcher; a searcher here reads the metric where it is
    (LinkedOptunaSearch, AdaptiveSeedSearcher), and Optuna records a trial that ends without it
    (stopped early by ASHA between evaluations) as pruned, not as a value."""
    if not searched:
        yield
        return
    before = os.environ.get(STRICT_METRIC_ENV)
    os.environ[STRICT_METRIC_ENV] = "1"  # read by Tune's controller at every result, in this process
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(STRICT_METRIC_ENV, None)
        else:
            os.environ[STRICT_METRIC_ENV] = before


STRICT_METRIC_ENV = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
