"""The sweep harness shared by every sweep script (``sweeps/*.py`` are thin wrappers).

One invocation = one Ray Tune experiment in ``<storage-path>/<name>`` and one MLflow parent
run in the experiment ``pact-ray/<script>``; each trial is a nested child run. ``--resume``
restores the Ray experiment and continues the same parent and child runs.

Everything a user can get wrong is checked before Ray starts, and reported as one sentence
with exit status 2; nothing is created before the checks pass.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pact_ray.cli import user_errors
from pact_ray.errors import ConfigError, first_line
from pact_ray.metrics import names as M
from pact_ray.runs.config import RunConfig
from pact_ray.runs.kinds import WORLD_MODEL, RunKind, get_kind, resolve_kind
from pact_ray.runs.registry import parse_variants
from pact_ray.tune.flags import build_parser, parse_overrides, parse_seeds, verdict_metrics
from pact_ray.tune.manifest import MANIFEST, load_manifest, write_manifest
from pact_ray.tune.storage import Storage, check_visible_on_every_node, is_uri, join, open_storage, staged_folder
from pact_ray.verdicts import Design, Margin


class SweepError(ValueError):
    """A sweep that cannot start or resume (one-sentence message)."""


# ------------------------------------------------------------------- the plan

@dataclass
class SweepPlan:
    kind: RunKind
    args: argparse.Namespace
    name: str
    storage: str  # absolute path or URI
    exp_dir: str
    tracking_uri: str
    summary_dir: str  # absolute path or URI
    base: dict[str, Any]  # fixed trial-config entries
    trial_configs: list[dict[str, Any]]  # grid points (or one Optuna template)
    configs: list[tuple[RunKind, RunConfig]]  # each grid point's own kind and config, built once
    design: Design = Design()  # when and how verdicts are taken (--margin, --until-conclusive)
    metrics: dict[str, str] = dataclasses.field(default_factory=dict)  # kind -> its --metric (empty: the primaries)

    @property
    def local_dir(self) -> Path | None:
        """The sweep's folder when the storage is a local path (None for an object store)."""
        return None if is_uri(self.exp_dir) else Path(self.exp_dir)

    @functools.cached_property
    def store(self) -> Storage:
        """The sweep's folder on its storage (a local or shared folder, or an object store)."""
        return open_storage(self.exp_dir)


def _storage_path(arg: str | None) -> str:
    """An absolute folder or a URI pyarrow opens (s3://, gs://); anything else is a StorageError."""
    return str(Path.cwd().resolve() / "runs") if arg is None else open_storage(arg).uri


def _check_writable(folder: str, what: str = "storage path") -> None:
    """The folder (or the nearest ancestor that exists) must be a directory this process can
    write in: tried with a temporary file that is removed at once (permission bits do not
    tell for root or for a read-only mount). Nothing stays behind."""
    if is_uri(folder):
        open_storage(folder).check_writable()  # the store answers and holds the bucket
        return
    path = Path(folder)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SweepError(f"{what} {folder} cannot be created: {probe} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise SweepError(f"{what} {folder} is not writable ({probe}: {e.strerror})") from None


MAX_NAME = 100  # characters of a sweep name: a folder name, a run name, an Optuna study name


def _safe_name(name: str) -> str:
    if len(name) > MAX_NAME:
        raise SweepError(f"--name is {len(name)} characters long; keep it to {MAX_NAME}")
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise SweepError(f"--name {name!r} must be a plain folder name (no '/', not starting with '.')")
    if not all(c.isalnum() or c in "-_.+=" for c in name):
        raise SweepError(f"--name {name!r} may only use letters, digits and - _ . + =")
    return name


def make_plan(kind: RunKind, args: argparse.Namespace) -> SweepPlan:
    from pact_ray.tracking.store import check_tracking_uri, default_tracking_uri

    storage = _storage_path(args.storage_path)
    name = _safe_name(args.name or f"{kind.script}-{args.profile}-{time.strftime('%Y%m%d-%H%M%S')}")
    exp_dir = join(storage, name)
    overrides = parse_overrides(args.overrides)
    base: dict[str, Any] = {"profile": args.profile, "model": args.model, **overrides}
    if args.data:
        base["data"] = str(Path(args.data).resolve())
    if args.checkpoint:
        base["init_checkpoint"] = str(Path(args.checkpoint).resolve())

    if args.seeds is None:  # the profile's seeds, written into args so that MLflow and --resume see them
        args.seeds = ",".join(str(s) for s in range(kind.profiles[args.profile].seeds))
    seeds = parse_seeds(args.seeds)
    if args.search == "optuna":
        if not args.variant:
            raise ConfigError("--search optuna needs --variant NAME (the variant whose knobs are tuned)")
        variants = parse_variants(args.variant, kind.variants)
        if len(variants) != 1:
            raise ConfigError("--search optuna tunes one variant; pass a single --variant")
        if not kind.variants[variants[0]].knobs:
            raise ConfigError(f"variant {variants[0]!r} has no continuous knobs to tune")
    else:
        variants = parse_variants(args.variants, kind.variants)
    if args.until_conclusive:
        _check_adaptive(kind, args, variants, seeds)
    design = Design(margin=Margin.parse(args.margin), max_seeds=args.until_conclusive or None,
                    first_look=max(2, len(seeds)))
    trial_configs, configs = _grid(kind, base, variants, seeds)
    if args.scheduler == "asha":  # every trial validates at ASHA's rungs, where ASHA compares them
        rungs = asha_rungs(max(cfg.steps for _, cfg in configs))[2]
        own = sorted(set(rungs).union(*(cfg.extra_eval_steps() for _, cfg in configs)))
        base["eval_steps"] = ",".join(map(str, own))
        trial_configs, configs = _grid(kind, base, variants, seeds)

    tracking_uri = args.tracking_uri or default_tracking_uri()
    check_tracking_uri(tracking_uri)
    summary_dir = join(exp_dir, "summary") if not args.summary_dir else open_storage(
        args.summary_dir if is_uri(args.summary_dir) else str(Path(args.summary_dir).resolve())).uri
    return SweepPlan(kind, args, name, storage, exp_dir, tracking_uri, summary_dir, base, trial_configs, configs, design,
                     verdict_metrics(kind, args.metric))


def _grid(kind: RunKind, base: dict[str, Any], variants: list[str], seeds: list[int]) -> tuple[list[dict], list[tuple[RunKind, RunConfig]]]:
    """The trial configs of variants x seeds, and each one's kind and run config (built here,
    so that every config error surfaces before anything starts)."""
    trial_configs = [{**base, "variant": v, "seed": s} for v in variants for s in seeds]
    configs = []
    for tc in trial_configs:
        own_kind, own = resolve_kind(kind, tc)
        configs.append((own_kind, own_kind.config(own)))
    return trial_configs, configs


def _check_adaptive(kind: RunKind, args: argparse.Namespace, variants: list[str], seeds: list[int]) -> None:
    from pact_ray.runs.kinds import MatrixKind
    from pact_ray.tune.adaptive import BASELINE

    if args.search != "grid":
        raise ConfigError("--until-conclusive adds seeds to a grid of variants; it does not combine with --search optuna")
    if isinstance(kind, MatrixKind) or BASELINE not in kind.variants:
        raise ConfigError(f"--until-conclusive compares variants with a baseline; the {kind.script} sweep has none "
                          "(use stage1_router.py or stage2_spatial.py)")
    if BASELINE not in variants or len(variants) < 2:
        raise ConfigError("--until-conclusive compares variants with the baseline: --variants must name baseline and at least one other")
    profile = kind.profiles.get(args.profile)
    if profile is not None and not profile.verdicts:
        raise ConfigError(f"--until-conclusive adds seeds until the verdicts are conclusive, but the {args.profile} profile is not "
                          "meant for conclusions (it gets no verdicts); use --profile quick or longer")
    if args.until_conclusive < max(2, len(seeds)):
        raise ConfigError(f"--until-conclusive {args.until_conclusive} must be at least 2 (a paired interval needs 2 seeds) "
                          f"and at least the {len(seeds)} seed(s) of --seeds")


def validate_inputs(plan: SweepPlan) -> None:
    """Data folder and official checkpoint are read and checked in the driver, before Ray starts
    (once for each run kind of the sweep: the matrix holds Stage1 and Stage2 trials)."""
    for kind, cfg in _first_of_each_kind(plan):
        if cfg.data:
            kind.dataset(cfg).validate_all()
        if getattr(cfg, "init", "scratch") == "official":
            from pact_ray.models.checkpoint import load_core_weights

            model = kind.build_model(cfg)
            load_core_weights(model, cfg.init_checkpoint, model.core_state_dict_keys(), what=f"the {kind.title} '{cfg.model}' preset")


def _first_of_each_kind(plan: SweepPlan) -> list[tuple[RunKind, RunConfig]]:
    """The first grid point of each run kind of the sweep (the matrix holds Stage1 and Stage2)."""
    first: dict[str, tuple[RunKind, RunConfig]] = {}
    for kind, cfg in plan.configs:
        first.setdefault(kind.name, (kind, cfg))
    return list(first.values())


def check_cluster_paths(plan: SweepPlan) -> None:
    """On a Ray cluster of several nodes (``--address``), every node must see the local paths
    the sweep uses: the storage folder (unless an object store), ``--data`` and ``--checkpoint``."""
    if not plan.args.address:
        return  # a local Ray instance is one node
    paths = {f"data folder {v}" if k == "data" else f"checkpoint {v}": v for k, v in plan.base.items() if k in ("data", "init_checkpoint")}
    check_visible_on_every_node(paths, storage=None if is_uri(plan.storage) else plan.storage)


def read_manifest(plan: SweepPlan) -> dict[str, Any]:
    manifest = load_manifest(plan.store)
    if manifest is None:
        raise SweepError(f"sweep {plan.name!r} has no {MANIFEST} in {plan.exp_dir}: nothing to resume")
    return manifest


# ---------------------------------------------------------------- search space

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


def verdict_metric(plan: SweepPlan) -> str:
    """The metric the sweep's decisions read (verdicts, Optuna's objective, ASHA's rungs): its
    --metric, or its kind's primary metric."""
    return plan.metrics.get(plan.kind.name, plan.kind.val_metric)


def asha_rungs(steps: int) -> tuple[int, int, list[int]]:
    """(grace period, reduction factor, the steps where ASHA compares trials) for trials of
    ``steps`` steps: Ray's AsyncHyperBand rungs, grace * factor^k below ``steps``. The trials
    validate at these steps, so that ASHA prunes on the held-out metric the study optimises."""
    grace, factor = max(1, steps // 4), 2
    rungs, step = [], grace
    while step < steps:
        rungs.append(step)
        step *= factor
    return grace, factor, rungs


def optuna_storage_url(plan: SweepPlan) -> str | None:
    """A persistent Optuna study next to the Ray results, readable by optuna-dashboard. None on an
    object store: the study then lives in memory and is kept in Ray's searcher state there."""
    if plan.local_dir is None:
        return None
    return f"sqlite:///{plan.local_dir}/optuna.db"


# ------------------------------------------------------------------------ run

def _tuner(plan: SweepPlan, callbacks: list, resume: bool, client=None, parent_id: str | None = None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pact_ray.tune.state import repair, restorable
    from pact_ray.tune.trainables import TRAINABLES

    kind, args = plan.kind, plan.args
    trainable = tune.with_resources(TRAINABLES[kind.name], {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    if resume:
        exp_dir = plan.local_dir
        for note in repair(exp_dir) if exp_dir is not None else []:
            print(f"Ray's experiment state: {note}")
        if exp_dir is None or restorable(exp_dir):
            if exp_dir is None and not tune.Tuner.can_restore(plan.store.path, storage_filesystem=plan.store.ray_filesystem):
                raise SweepError(f"sweep {plan.name!r} at {plan.exp_dir} has no Ray state to resume")
            tuner = tune.Tuner.restore(plan.store.path, storage_filesystem=plan.store.ray_filesystem, trainable=trainable,
                                       resume_unfinished=True, resume_errored=True)
            # Tuner.restore brings back the first command's RunConfig, callbacks included: a
            # sweep started with --quiet would resume silently, and its MLflow callback would be
            # an unpickled copy rather than the one this driver flushes and checks. Ray offers no
            # public setter, so this command's callbacks and verbosity go in by hand.
            internal = getattr(tuner, "_local_tuner", None)
            if internal is not None:
                internal.get_run_config().callbacks = callbacks
                internal.get_run_config().verbose = 1 if args.verbose else 0
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
        num_samples=_num_samples(plan),
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


def _num_samples(plan: SweepPlan) -> int:
    """Trials Tune may start: Optuna's budget; for adaptive seeds the most the searcher can
    ask for (it ends the search itself); one pass over the grid otherwise."""
    if plan.args.search == "optuna":
        return plan.args.num_samples
    if plan.args.until_conclusive:
        return len({tc["variant"] for tc in plan.trial_configs}) * plan.args.until_conclusive
    return 1


def _trial_name(trial) -> str:
    cfg = trial.config
    return f"{cfg.get('variant', 'trial')}_s{cfg.get('seed', 0)}_{trial.trial_id}"


def init_ray(address: str | None, verbose: bool = False, preload: list[str] | None = None) -> bool:
    """Connect to ``address`` or start a local Ray instance; False when one was already up.
    Workers' output reaches the terminal only with ``verbose``; Ray's own log lines only
    from warnings up. ``preload``: a local instance boots its idle workers (one per CPU) at
    once, each importing these modules, for trial actors that run in them
    (:func:`_worker_preload`, :func:`_trials_in_prestarted_workers`)."""
    import ray

    if not verbose:
        # Ray's newer output engine prints its configuration box and paths whatever the
        # verbosity; the older one prints nothing at verbosity 0. The progress lines are ours.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=verbose, configure_logging=True,
                              logging_level=logging.INFO if verbose else logging.WARNING)
    if address in (None, "local"):
        # Ray starts one idle worker per CPU for the first driver, booted while the sweep
        # starts. Where the trials will not run in them all (see _prestart_fits), they would
        # only take CPU from the start-up (0.5-1.4 s each, measured on 2 cores): none then.
        # A cluster keeps its own settings (and refuses a _system_config from a client).
        kw["_system_config"] = {"prestart_worker_first_driver": preload is not None, "preload_python_modules": preload or []}
        if preload is not None:
            # Without an explicit soft limit, the raylet's idle-worker culling killed the
            # prestarted workers ("idle for a long time", a second after Tune's placement groups
            # took every CPU) before the trial actors reached them, and started new ones: seen
            # in about 1 test sweep in 4, none in 8 with the limit. One idle worker per CPU.
            from ray._private.utils import get_num_cpus

            kw["_system_config"]["num_workers_soft_limit"] = int(get_num_cpus())
    # "local": always a private instance. Without it ray.init() joins whatever local cluster
    # /tmp/ray/ray_current_cluster names (another sweep's, which may end under this one).
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


def _prestart_fits(plan: SweepPlan) -> bool:
    """Whether every idle worker a local Ray prestarts (one per CPU) will host a trial actor:
    CPU trials, as many at once as there are CPUs (each actor takes one worker, whatever its
    CPUs), in a new sweep (a resume may have fewer trials left)."""
    from ray._private.utils import get_num_cpus  # how many a local Ray counts (and prestarts)

    args = plan.args
    if args.address not in (None, "local") or args.gpus_per_trial or args.resume:
        return False
    trials = _num_samples(plan) if _searched(args) else len(plan.trial_configs)
    cpus = int(get_num_cpus())
    at_once = min(trials, args.max_concurrent or trials, int(cpus / args.cpus_per_trial))
    return at_once >= cpus


def _searched(args: argparse.Namespace) -> bool:
    """Whether a searcher (Optuna, or adaptive seeds) proposes the trials, rather than the grid."""
    return args.search != "grid" or bool(args.until_conclusive)


def _worker_preload(plan: SweepPlan) -> list[str] | None:
    """What each idle worker of the sweep's own Ray imports as it boots, while the driver is
    still starting (None: no idle workers, see :func:`_prestart_fits`): the trial's body
    (torch, Ray Tune, the run kinds), the trainers of the sweep's kinds, ``torch._dynamo``
    (which torch.optim imports with the first optimizer: 1 s) and, for router variants, the OT
    kernel from numba's cache (:mod:`pact_ray.ot.preload`). A trial would pay each of these at
    its start otherwise, after Tune started it: 2.5-3.5 s of a first trial on 2 cores."""
    if not _prestart_fits(plan):
        return None
    trainers = [kind.trainer.module for kind, _ in _first_of_each_kind(plan)]
    router = any(getattr(cfg, "router", None) is not None for _, cfg in plan.configs)
    return ["pact_ray.tune.trial", *trainers, "torch._dynamo", *(["pact_ray.ot.preload"] if router else [])]


@contextlib.contextmanager
def _trials_in_prestarted_workers(prestarted: bool):
    """Tune starts every trial actor with PL_DISABLE_FORK=1 set (for PyTorch Lightning,
    ray-project/ray#28197), which gives each actor a runtime environment of its own, so Ray
    boots a new worker for it (1.5-2.5 s on 2 cores, before the first step) and leaves the idle
    workers it prestarted unused. pact-ray's trainables are not Lightning: while the sweep's own
    local Ray runs them, the variable is left out (Ray 2.60's ray.tune.execution.class_cache),
    and the trials start in the workers Ray booted during the start-up. Variables Tune copies
    from the driver's environment (AWS credentials) still give the actors their own workers."""
    if not prestarted:
        yield
        return
    from ray.tune.execution import class_cache

    saved = dict(class_cache.DEFAULT_ENV_VARS)
    class_cache.DEFAULT_ENV_VARS.clear()
    try:
        yield
    finally:
        class_cache.DEFAULT_ENV_VARS.update(saved)


def stop_ray() -> None:
    """``ray.shutdown()`` of a Ray this process started, a second sooner. Ray stops its
    processes one after another, the GCS before the autoscaler's monitor, and the monitor's
    SIGTERM handler reports its own end to that GCS, which is gone: it hangs until Ray kills it
    1 s later (Ray 2.60; measured by bench/bench_sweep.py). That monitor, of a one-node cluster
    that is going away, is killed first, as Ray itself would kill it a second later; the rest
    of Ray stops as usual. Nothing changes where this process did not start Ray (the monitor
    is then not its child)."""
    import psutil
    import ray

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                if any(part.endswith(_RAY_MONITOR) for part in child.cmdline()):
                    child.kill()
    ray.shutdown()


_RAY_MONITOR = os.path.join("autoscaler", "_private", "monitor.py")


# Flags a resume takes from its own command line; every other one is the original sweep's.
RESUME_OWN_FLAGS = ("address", "quiet", "verbose")


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
    return user_errors(lambda: _run(kind, _original_args(parser, args) if args.resume else args))


def _original_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """A resume runs the sweep its manifest records (its variants, seeds, profile, overrides),
    with this command's own --address, --quiet and --verbose."""
    if not args.name:
        raise SweepError("--resume needs the --name of the sweep to continue")
    manifest = load_manifest(open_storage(join(_storage_path(args.storage_path), _safe_name(args.name))))
    if manifest is None or "argv" not in manifest:
        return args  # make_plan and read_manifest say what is missing
    original = parser.parse_args(manifest["argv"])
    original.argv = manifest["argv"]
    original.resume, original.name, original.storage_path = True, args.name, args.storage_path
    for flag in RESUME_OWN_FLAGS:
        setattr(original, flag, getattr(args, flag))
    if args.tracking_uri and not original.tracking_uri:
        original.tracking_uri = args.tracking_uri  # checked against the manifest's store in _run
    return original


EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C
EXIT_UNSENT = 3  # trained, but some tracking writes did not reach the store
EXIT_DISK_FULL = 4  # the storage filled up; --resume finishes once there is space
FULL_BELOW_BYTES = 1 << 20
FLUSH_TIMEOUT_S = float(os.environ.get("PACT_RAY_FLUSH_TIMEOUT_S", "60"))  # waiting for an absent tracking store at the end


def resume_command(plan: SweepPlan) -> str:
    """The exact command that continues this sweep."""
    from pact_ray.tracking.sweep_run import command_line

    script = command_line().split(" --")[0]
    storage = f" --storage-path {plan.storage}" if plan.args.storage_path else ""
    return f"{script} --name {plan.name}{storage} --resume"


def _run(kind: RunKind, args: argparse.Namespace) -> int:
    """Check everything, connect Ray and check the resources asked for, then (and only then)
    create the sweep: its folder with the manifest atomically, the MLflow parent run."""
    import ray

    from pact_ray.tracking.store import env_fast_fail

    plan = make_plan(kind, args)
    _check_writable(plan.storage)
    _check_writable(str(plan.summary_dir), "--summary-dir")
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
    store = _prepare_while_ray_starts(plan)
    with store.undone_on_error():
        preload = _worker_preload(plan)
        started_ray = connect_ray(args.address, verbose=args.verbose, preload=preload)
    parent_id = None
    client = None
    try:
        with store.undone_on_error():
            check_resources(plan)
        check_cluster_paths(plan)
        store.wait()  # first: MLflow and torch are imported there
        with store.undone_on_error():
            datasets = describe_datasets(plan)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(plan.tracking_uri)
        experiment_id, parent_id = _open_sweep(plan, client, manifest)
        return _train_and_report(plan, client, experiment_id, parent_id, datasets, started_ray,
                                 prestarted=started_ray and preload is not None)
    except KeyboardInterrupt:  # a second Ctrl-C, or one during start-up
        if client is not None and parent_id is not None:
            client.set_terminated(parent_id, status="KILLED")
        print(f"\nInterrupted. Continue with: {resume_command(plan)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if started_ray and ray.is_initialized():
            stop_ray()  # nothing of Ray's is printed after the summary


def _import_driver_modules(trainers: tuple[str, ...] = ()) -> None:
    """The modules the driver needs once Ray is up (MLflow's store, the report: matplotlib,
    scipy; Ray Tune and the sweep's callbacks: 0.5 s; the ``trainers`` modules,
    with torch, only where a synthetic data set is still to be generated: 1.2 s), none of which
    ``ray.init`` imports once :data:`_IMPORTED_BY_BOTH` are. The driver reads every config
    before, without torch (pact_ray.runs), so that Ray starts a second sooner; with its data
    cached it never imports torch (the trials do)."""
    import importlib

    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    from ray import tune  # noqa: F401

    for module in trainers:
        importlib.import_module(module)
    import pact_ray.report.ablation  # noqa: F401
    import pact_ray.report.summary  # noqa: F401
    import pact_ray.tracking.callback  # noqa: F401
    import pact_ray.tracking.sweep_run  # noqa: F401
    import pact_ray.tracking.writer  # noqa: F401
    import pact_ray.tune.interrupt  # noqa: F401
    import pact_ray.tune.progress  # noqa: F401
    import pact_ray.tune.state  # noqa: F401
    import pact_ray.tune.trainables  # noqa: F401


# Modules that both ray.init and Ray Tune import (Ray 2.60; tests/test_sweep_startup.py measures
# it): imported before the preparation thread starts (3 ms), so that the two never import the same one.
_IMPORTED_BY_BOTH = ("ray._common.usage.usage_lib", "ray.dashboard")


class _StorePreparation:
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
        import importlib
        import threading

        import mlflow.tracking  # noqa: F401 - here, before the thread: see the class docstring

        for name in _IMPORTED_BY_BOTH:
            with contextlib.suppress(ImportError):  # another Ray may not have them
                importlib.import_module(name)

        from pact_ray.tracking.store import store_files

        self.uri = plan.tracking_uri
        # The trainers (and torch) only for the data sets the driver must generate (describe_datasets).
        self.trainers = tuple(kind.trainer.module for kind, cfg in _first_of_each_kind(plan) if cfg.data_folder() is None)
        self.announce = bool(plan.args.verbose)
        self.early = early
        self._new = [p for p in store_files(self.uri) if not p.exists()] if early else []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._prepare, name="pact-ray-preparation", daemon=True)
        self._thread.start()

    def _prepare(self) -> None:
        with contextlib.suppress(Exception):  # an import failing here fails again, with its message, where it is needed
            _import_driver_modules(self.trainers)
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


def _prepare_while_ray_starts(plan: SweepPlan) -> _StorePreparation:
    import ray

    args = plan.args
    starts_ray = args.address in (None, "local") and not ray.is_initialized()
    # The authoritative check is check_resources, on Ray's own view of the machine; this one
    # only decides whether the store may be created before it (undone if Ray disagrees).
    fits = args.cpus_per_trial <= len(os.sched_getaffinity(0)) and args.gpus_per_trial == 0
    return _StorePreparation(plan, early=starts_ray and fits)


def _open_sweep(plan: SweepPlan, client, manifest: dict[str, Any] | None) -> tuple[str, str]:
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


def connect_ray(address: str | None, verbose: bool = False, preload: list[str] | None = None) -> bool:
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
        return init_ray(address, verbose, preload)
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


def describe_datasets(plan: SweepPlan) -> dict[str, Any]:
    """Each run kind's data set as an MLflow dataset input. Synthetic data is generated (once,
    here in the driver, before any trial starts) where the cache does not hold it yet; data
    that is there is described without torch (``RunConfig.data_folder``)."""
    from pact_ray.tracking.datasets import describe_dataset

    return {kind.name: describe_dataset(cfg.data_folder() or kind.dataset(cfg).folder) for kind, cfg in _first_of_each_kind(plan)}


def _train_and_report(plan: SweepPlan, client, experiment_id: str, parent_id: str, datasets: dict[str, Any],
                      started_ray: bool, prestarted: bool = False) -> int:
    from pact_ray.report.ablation import write_report
    from pact_ray.report.ablation.route import print_verdicts, route_status
    from pact_ray.report.summary import collect_sweep
    from pact_ray.tracking.callback import MlflowSweepCallback
    from pact_ray.tracking.store import git_commit, ui_command
    from pact_ray.tracking.sweep_run import ablation_headline, finish_parent, verdict_table
    from pact_ray.tracking.writer import shared_writer
    from pact_ray.tune.interrupt import DriverInterrupts, RetryOnlyFailures
    from pact_ray.tune.progress import ProgressLines
    from pact_ray.tune.state import StateBackup

    kind, args = plan.kind, plan.args
    shared_writer(plan.tracking_uri)
    optuna_url = optuna_storage_url(plan) if args.search == "optuna" else None
    mlflow_callback = MlflowSweepCallback(plan.tracking_uri, experiment_id, parent_id, kind.name, plan.name, git_commit(),
                                          datasets=datasets, optuna_storage=optuna_url)
    interrupts = DriverInterrupts(plan.name)
    callbacks: list = [mlflow_callback, RetryOnlyFailures(interrupts, args.max_failures), *_result_loggers()]
    if plan.local_dir is not None:
        callbacks.append(StateBackup(str(plan.local_dir)))
    if not args.quiet:
        planned = None if args.until_conclusive else args.num_samples if args.search == "optuna" else len(plan.trial_configs)
        callbacks.append(ProgressLines({tc["variant"]: cfg.steps for tc, (_, cfg) in zip(plan.trial_configs, plan.configs)},
                                       numbered=args.search == "optuna", planned=planned))
    t0 = time.time()
    tuner = _tuner(plan, callbacks, args.resume, client, parent_id)
    if args.resume:  # what the tracking store missed last time (absent, or the driver died first)
        if plan.local_dir is not None:
            replay_results(plan.local_dir, mlflow_callback)
        else:  # an object store: its copy of Ray's result files, read from a temporary folder
            with tempfile.TemporaryDirectory(prefix="pact-ray-replay-") as d:
                plan.store.fetch_results(Path(d))
                replay_results(Path(d), mlflow_callback)
    searched = _searched(args)  # param_space's searchers
    try:
        with interrupts, _searcher_metric_at_evaluations(searched), _trials_in_prestarted_workers(prestarted):
            results = tuner.fit()
    except Exception as e:
        if not storage_full(plan, e):
            # The sweep itself failed (a bug, or Ray's own error), not one of its trials: end its
            # open MLflow runs as FAILED rather than leave them RUNNING, and say how to go on.
            cause = _root_cause(e)
            mlflow_callback.abandon(f"the sweep failed: {cause}")
            with contextlib.suppress(Exception):  # a store that is away must not hide the error
                client.set_terminated(parent_id, status="FAILED")
            print(f"error: the sweep failed ({cause[:300]}); its MLflow runs are marked FAILED. "
                  f"Once the cause is fixed, continue with: {resume_command(plan)}", file=sys.stderr)
            raise
        client.set_terminated(parent_id, status="KILLED")
        free = f"{shutil.disk_usage(plan.storage).free / 2**20:.1f} MiB free" if plan.local_dir else "full"
        print(f"error: the storage {plan.storage} is full ({free}; {first_line(e)}). Free some space, then run: "
              f"{resume_command(plan)}", file=sys.stderr)
        return EXIT_DISK_FULL
    finally:
        unsent = _flush_tracking(plan)
    interrupted = interrupts.requested
    # Stopping a local Ray takes 0.4 s of waiting on its processes (stop_ray); the summary,
    # which reads only MLflow, is written meanwhile, and nothing is printed before it is done
    # (so nothing of Ray's is printed after the summary).
    with _in_background(stop_ray if started_ray else None) as ray_stopped:
        if unsent:  # the summary reads the tracking store, which is not answering: --resume makes it
            ray_stopped()
            errored = sum(r.error is not None for r in results)
            print(f"\nSweep {plan.name}: {len(results) - errored}/{len(results)} trials ended without error, {time.time() - t0:.0f} s; "
                  f"the summary waits for the tracking store.")
            print(f"Ray results:  {plan.exp_dir}")
            print(f"{unsent} tracking write(s) did not reach {plan.tracking_uri}; Ray's result files keep them. Once the store "
                  f"answers, run: {resume_command(plan)} (nothing trains again)")
            return EXIT_UNSENT

        if kind.name == WORLD_MODEL.name:
            from pact_ray.report.world_model_sweep import (
                collect_world_model_sweep,
                print_world_model_summary,
                summary_lines,
                write_world_model_summary,
            )

            wm = collect_world_model_sweep(plan.tracking_uri, experiment_id, parent_id, storage=plan.storage, design=plan.design)
            files = write_summary(plan, client, parent_id, lambda out: write_world_model_summary(wm, out))
            ray_stopped()
            _print_header(plan, results, wm.rows, time.time() - t0)
            print_world_model_summary(wm)
            if command := optuna_dashboard_command(plan):
                print(f"Optuna study: {command}")
            description = "\n".join(summary_lines(wm)[:-2])
            headline = {"trials_finished": sum(r["status"] == "finished" for r in wm.rows),
                        "trials_errored": sum(r["status"] == "errored" for r in wm.rows),
                        **{f"val_mse.{m['variant']}": m["val_mse"].mean for m in wm.means if m["val_mse"] is not None}}
        else:
            data = collect_sweep(plan.tracking_uri, experiment_id, parent_id, metrics=plan.metrics.values())
            entries = route_status(data, plan.design, plan.metrics)
            files = write_summary(plan, client, parent_id,
                                  lambda out: write_report(data, out, plan.tracking_uri, optuna=optuna_dashboard_command(plan),
                                                           entries=entries))
            ray_stopped()
            _print_header(plan, results, data.rows, time.time() - t0)
            print_verdicts(entries)
            if args.search == "optuna":
                _print_best_knobs(plan, data, client)
            description, headline = verdict_table(entries), ablation_headline(data.rows, entries)
        status = "KILLED" if interrupted else "FINISHED"
        finish_parent(client, parent_id, description=description, metrics=headline, status=status)
        _print_footer(plan, files, ui_command(plan.tracking_uri, experiment_id))
        if interrupted:
            print(f"Interrupted: the unfinished trials saved a checkpoint. Continue with: {resume_command(plan)}")
            return EXIT_INTERRUPTED
        return 0 if results.num_errors == 0 else 1


def _result_loggers() -> list:
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
def _in_background(work: Callable[[], Any] | None):
    """Run ``work`` in a thread; yields a function that waits for it (also on leaving)."""
    import threading

    thread = threading.Thread(target=work, name="pact-ray-background", daemon=True) if work else None
    if thread:
        thread.start()

    def wait() -> None:
        if thread:
            thread.join()

    try:
        yield wait
    finally:
        wait()


def storage_full(plan: SweepPlan, error: BaseException) -> bool:
    """Whether ``error`` came from the storage filling up: ENOSPC somewhere in its chain, or a
    local storage with less than 1 MiB left (Ray then fails reading the files it truncated)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return plan.local_dir is not None and shutil.disk_usage(plan.storage).free < FULL_BELOW_BYTES


def write_summary(plan: SweepPlan, client, parent_run_id: str, write: Callable[[Path], list[Path]]) -> list[str]:
    """``write(folder)`` the summary files, put them at ``plan.summary_dir`` (a folder or an object
    store) and log them as the parent run's ``summary/`` artifacts; returns where the files
    other than the plots are."""
    from pact_ray.tracking.sweep_run import SUMMARY_ARTIFACTS

    with staged_folder(plan.summary_dir) as (folder, where):
        files = write(folder)
        for f in files:
            client.log_artifact(parent_run_id, str(f), SUMMARY_ARTIFACTS)
    return [where(f) for f in files if f.suffix != ".png"]


def _root_cause(error: BaseException) -> str:
    """"Type: first line" of the innermost exception behind ``error`` (Tune wraps what it caught
    in a TuneError whose text starts with a traceback)."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        error = inner
        seen.add(id(error))
    return f"{type(error).__name__}: {first_line(error)}"


@contextlib.contextmanager
def _searcher_metric_at_evaluations(searched: bool):
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


def _flush_tracking(plan: SweepPlan) -> int:
    """Send what the writer still holds, waiting at most FLUSH_TIMEOUT_S; returns the writes left unsent."""
    from pact_ray.tracking.writer import close_shared, pending_writes

    if not close_shared(plan.tracking_uri, timeout=2.0, keep_open=True):
        print(f"Waiting up to {FLUSH_TIMEOUT_S:.0f} s for the tracking store {plan.tracking_uri} to take "
              f"{pending_writes(plan.tracking_uri)} pending write(s)...", flush=True)
    if close_shared(plan.tracking_uri, timeout=FLUSH_TIMEOUT_S):
        return 0
    return max(1, pending_writes(plan.tracking_uri, closed=True))


def replay_results(exp_dir: Path, callback) -> None:
    """Give the tracking store every step Ray's result files hold (steps it has are skipped),
    and the final status of the trials Ray finished."""
    from pact_ray.report.ablation.ray_results import read_json, read_results, trial_states

    states = trial_states(exp_dir)
    for folder in sorted(p for p in exp_dir.iterdir() if (p / "params.json").is_file()):
        try:
            config = read_json(folder / "params.json")
        except ValueError:  # cut short (a full disk): Tune reruns the trial from its state
            continue
        results = read_results(folder / "result.json")
        state = states.get(folder.name)
        if results or state is not None:
            trial_id = state.trial_id if state else str(results[-1].get("trial_id", folder.name))
            callback.replay(trial_id, config, results, finished=bool(state and state.status == "TERMINATED"))


def optuna_dashboard_command(plan: SweepPlan) -> str | None:
    """The command that opens the sweep's Optuna study in optuna-dashboard (None without one)."""
    url = optuna_storage_url(plan) if plan.args.search == "optuna" else None
    return f"optuna-dashboard {url} --host 127.0.0.1 --port 8080" if url else None


def _print_best_knobs(plan: SweepPlan, data, client) -> None:
    """An Optuna sweep's best trial, like with like (validated at the last step): its knobs,
    its value against the variant's defaults (the study's first trial), whether the spread of
    the trial values stands out of the seed noise, the command that confirms the winner over
    seeds; its MLflow run is tagged."""
    from pact_ray.tracking.sweep_run import command_line
    from pact_ray.tracking.tags import OPTUNA_BEST_TAG

    metric, steps = verdict_metric(plan), plan.configs[0][1].steps
    curves = data.curves_of(metric)
    value = {r["run_id"]: dict(curves.get(r["run_id"], [])).get(steps) for r in data.rows if r["status"] == "finished"}
    scored = [r for r in data.rows if value.get(r["run_id"]) is not None]
    command = optuna_dashboard_command(plan)
    if not scored:
        print(f"Optuna: no trial reported {metric} at step {steps}.")
        if command:
            print(f"Optuna study: {command}")
        return
    mode = M.metric_mode(metric)
    best = (min if mode == "min" else max)(scored, key=lambda r: value[r["run_id"]])
    variant = plan.kind.variants[best["variant"]]
    knobs = [k for k in variant.knobs if k in data.params[best["run_id"]] and k not in plan.base]
    chosen = {k: data.params[best["run_id"]][k] for k in knobs}
    shown = ", ".join(f"{k}={float(v):.4g}" for k, v in chosen.items())
    stopped = len(data.rows) - len(scored)
    print(f"Optuna best of {len(scored)} trial{'s' * (len(scored) != 1)} at step {steps}"
          f"{f' ({stopped} stopped early or failed)' if stopped else ''}: {shown} -> {metric} {value[best['run_id']]:.6g}")
    defaults = {k: str(v) for k, v in plan.configs[0][1].flat().items() if k in knobs}
    first = next((r for r in scored if all(_same(data.params[r["run_id"]].get(k), v) for k, v in defaults.items())), None)
    values = [value[r["run_id"]] for r in scored]
    spread = max(values) - min(values)
    if first is not None and first is not best:
        gap = value[best["run_id"]] - value[first["run_id"]]
        pct = f" ({100 * gap / abs(value[first['run_id']]):+.2g} %)" if value[first["run_id"]] else ""
        print(f"  vs the variant's defaults (the first trial): {metric} {value[first['run_id']]:.6g}, Δ {gap:+.3g}{pct}")
    elif first is best:
        print("  the variant's defaults (the first trial) are the best trial: tuning found nothing better")
    noise = _seed_noise(plan, metric, steps)
    if noise is None:
        print(f"  the trial values span {spread:.3g}; every trial ran one seed, and no sweep in this store measured the seed "
              "noise of this setting, so the spread may be noise")
    elif spread <= 2 * noise:
        print(f"  the trial values span {spread:.3g}, within the seed noise (2 x {noise:.2g}, the seed-to-seed spread of "
              "this setting's runs): the objective is flat here, and the best trial is no evidence")
    else:
        print(f"  the trial values span {spread:.3g}, more than the seed noise (2 x {noise:.2g})")
    # Against the baseline where the kind has one (the world model compares MAE with GPT in its own summary).
    against = f"baseline,{best['variant']}" if "baseline" in plan.kind.variants else best["variant"]
    confirm = " ".join([command_line().split(" --")[0], "--profile", plan.args.profile, "--model", plan.args.model,
                        "--variants", against, "--seeds", "0,1,2", *[f"--set {k}={v}" for k, v in chosen.items()]])
    print(f"  confirm it {'against the baseline ' if ',' in against else ''}over seeds: {confirm}")
    with contextlib.suppress(Exception):  # a store that is away must not hide the summary
        client.set_tag(best["mlflow_run_id"], OPTUNA_BEST_TAG, "true")
    if command:
        print(f"Optuna study: {command}")


def _same(a: str | None, b: str) -> bool:
    """Two parameter values as MLflow stores them (strings), numerically where both are numbers."""
    try:
        return a is not None and math.isclose(float(a), float(b), rel_tol=1e-9)
    except ValueError:
        return a == b


def _seed_noise(plan: SweepPlan, metric: str, steps: int) -> float | None:
    """The seed-to-seed standard deviation of ``metric`` at ``steps`` in this setting (kind,
    profile, model), from the grid sweeps of this tracking store that ran a configuration over
    several seeds (the largest such spread); None when none did."""
    import statistics

    from pact_ray.report.summary import collect

    try:
        data = collect(plan.tracking_uri, [plan.kind.experiment], metrics=[metric])
    except Exception:  # noqa: BLE001  (the store answered a moment ago; without it there is simply no estimate)
        return None
    curves = data.curves_of(metric)
    groups: dict[tuple, list[float]] = {}
    for r in data.rows:
        config = tuple(sorted((k, v) for k, v in data.params.get(r["run_id"], {}).items() if k != "seed"))
        at = dict(curves.get(r["run_id"], [])).get(steps)
        if r["status"] == "finished" and at is not None and r["profile"] == plan.args.profile and r["model"] == plan.args.model:
            groups.setdefault(config, []).append(at)
    spreads = [statistics.stdev(v) for v in groups.values() if len(v) >= 2]
    return max(spreads) if spreads else None


def _print_header(plan: SweepPlan, results, rows: list[dict], wall: float) -> None:
    count = {s: sum(r["status"] == s for r in rows) for s in ("finished", "errored", "interrupted")}
    stopped = f", {count['interrupted']} interrupted" if count["interrupted"] else ""
    print()
    print(f"Sweep {plan.name}: {count['finished']}/{len(rows)} trials finished, {count['errored']} errored{stopped}, {wall:.0f} s")
    for r in rows:
        if r["status"] == "errored":
            print(f"  errored: {r['run']}: {r['error']}")


def _print_footer(plan: SweepPlan, files: list[str], ui: str) -> None:
    print(f"Ray results:  {plan.exp_dir}")
    print(f"MLflow:       {plan.tracking_uri}  (experiment {plan.kind.experiment})")
    for f in files:
        print(f"Summary:      {f}")
    command, _, then = ui.partition(", then ")
    env, space, rest = command.partition(" mlflow ui ")
    if space and "=" in env:  # the environment on a line of its own, continued: the command stays one to paste
        print(f"Open the UI:  {env} \\\n                mlflow ui {rest}")
    else:
        print(f"Open the UI:  {command}")
    if then:
        print(f"              then {then}")
