"""The sweep harness shared by every sweep script (``sweeps/*.py`` are thin wrappers).

One invocation = one Ray Tune experiment in ``<storage-path>/<name>`` and one MLflow parent
run in the experiment ``pact-ray/<script>``; each trial is a nested child run. ``--resume``
restores the Ray experiment and continues the same parent and child runs.

Everything a user can get wrong is checked before Ray starts, and reported as one sentence
with exit status 2; nothing is created before the checks pass.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pact_ray.cli import user_errors
from pact_ray.errors import ConfigError
from pact_ray.runs.config import RunConfig
from pact_ray.runs.kinds import WORLD_MODEL, RunKind, get_kind, resolve_kind
from pact_ray.runs.registry import parse_variants
from pact_ray.tune.flags import build_parser, parse_overrides, parse_seeds
from pact_ray.tune.manifest import MANIFEST, load_manifest, write_manifest
from pact_ray.tune.storage import Storage, check_visible_on_every_node, is_uri, join, open_storage, staged_folder


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


def _check_writable(folder: str) -> None:
    """The folder (or the nearest ancestor that exists) must be a writable directory, or the
    object store must answer and hold the bucket; nothing is created."""
    open_storage(folder).check_writable()


def _safe_name(name: str) -> str:
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
    trial_configs = [{**base, "variant": v, "seed": s} for v in variants for s in seeds]
    configs = []
    for tc in trial_configs:  # every config error surfaces before anything starts
        own_kind, own = resolve_kind(kind, tc)
        configs.append((own_kind, own_kind.config(own)))

    tracking_uri = args.tracking_uri or default_tracking_uri()
    check_tracking_uri(tracking_uri)
    summary_dir = join(exp_dir, "summary") if not args.summary_dir else open_storage(
        args.summary_dir if is_uri(args.summary_dir) else str(Path(args.summary_dir).resolve())).uri
    return SweepPlan(kind, args, name, storage, exp_dir, tracking_uri, summary_dir, base, trial_configs, configs)


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
    if args.until_conclusive < max(2, len(seeds)):
        raise ConfigError(f"--until-conclusive {args.until_conclusive} must be at least 2 (a paired interval needs 2 seeds) "
                          f"and at least the {len(seeds)} seed(s) of --seeds")


def validate_inputs(plan: SweepPlan) -> None:
    """Data folder and official checkpoint are read and checked in the driver, before Ray starts
    (once for each run kind of the sweep: the matrix holds Stage1 and Stage2 trials)."""
    first_of_kind: dict[str, tuple[RunKind, RunConfig]] = {}
    for kind, cfg in plan.configs:
        first_of_kind.setdefault(kind.name, (kind, cfg))
    for kind, cfg in first_of_kind.values():
        if cfg.data:
            kind.dataset(cfg).validate_all()
        if getattr(cfg, "init", "scratch") == "official":
            from pact_ray.models.checkpoint import load_core_weights

            model = kind.build_model(cfg)
            load_core_weights(model, cfg.init_checkpoint, model.core_state_dict_keys(), what=f"the {kind.title} '{cfg.model}' preset")


def check_cluster_paths(plan: SweepPlan) -> None:
    """On a Ray cluster of several nodes (``--address``), every node must see the local paths
    the sweep uses: the storage folder (unless an object store), ``--data`` and ``--checkpoint``."""
    if not plan.args.address:
        return  # a local Ray instance is one node
    paths = {f"data folder {v}" if k == "data" else f"checkpoint {v}": v for k, v in plan.base.items() if k in ("data", "init_checkpoint")}
    init_ray(plan.args.address, plan.args.quiet)
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

        return dict(plan.base), AdaptiveSeedSearcher(plan.base, variants, seeds, args.until_conclusive,
                                                     metric=plan.kind.val_metric, mode=plan.kind.mode)
    if args.search == "grid":
        return {**plan.base, "variant": tune.grid_search(variants), "seed": tune.grid_search(seeds)}, None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

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
    storage_url = optuna_storage_url(plan)
    searcher = OptunaSearch(
        metric=plan.kind.metric, mode=plan.kind.mode, seed=args.optuna_seed,
        storage=optuna.storages.RDBStorage(storage_url), study_name=plan.name,
    ) if storage_url else OptunaSearch(metric=plan.kind.metric, mode=plan.kind.mode, seed=args.optuna_seed)
    return space, searcher


def optuna_storage_url(plan: SweepPlan) -> str | None:
    """A persistent Optuna study next to the Ray results, readable by optuna-dashboard. None on an
    object store: the study then lives in memory and is kept in Ray's searcher state there."""
    if plan.local_dir is None:
        return None
    return f"sqlite:///{plan.local_dir}/optuna.db"


# ------------------------------------------------------------------------ run

def _tuner(plan: SweepPlan, callback, resume: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pact_ray.tune.trainables import TRAINABLES

    kind, args = plan.kind, plan.args
    trainable = tune.with_resources(TRAINABLES[kind.name], {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    if resume:
        if not tune.Tuner.can_restore(plan.store.path, storage_filesystem=plan.store.ray_filesystem):
            raise SweepError(f"sweep {plan.name!r} at {plan.exp_dir} has no Ray state to resume")
        return tune.Tuner.restore(plan.store.path, storage_filesystem=plan.store.ray_filesystem, trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    space, searcher = param_space(plan)
    steps = max(cfg.steps for _, cfg in plan.configs)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=steps, grace_period=max(1, steps // 4), reduction_factor=2) if args.scheduler == "asha" else None
    tune_config = tune.TuneConfig(
        metric=kind.metric, mode=kind.mode, search_alg=searcher, scheduler=scheduler,
        num_samples=_num_samples(plan),
        max_concurrent_trials=args.max_concurrent or None,
        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        # Every trial asks for the same resources: reusing the worker process saves each
        # trial the seconds of a fresh interpreter importing torch.
        reuse_actors=True,
    )
    root = open_storage(plan.storage)
    run_config = tune.RunConfig(
        name=plan.name, storage_path=root.path, storage_filesystem=root.ray_filesystem, callbacks=[callback],
        failure_config=tune.FailureConfig(max_failures=args.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=3),
        verbose=0 if args.quiet else 1,
    )
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)


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


def init_ray(address: str | None, quiet: bool) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=not quiet, configure_logging=True)
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(**kw)


def run_sweep(kind: RunKind | str, argv: list[str] | None = None, description: str = "") -> int:
    """Entry point of every sweep script. Returns the process exit status."""
    kind = get_kind(kind) if isinstance(kind, str) else kind
    args = build_parser(kind, description or kind.script).parse_args(argv)
    return user_errors(lambda: _run(kind, args))


def _run(kind: RunKind, args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from pact_ray.report.ablation import write_report
    from pact_ray.report.ablation.route import print_verdicts, route_status
    from pact_ray.report.summary import collect_sweep
    from pact_ray.tracking.callback import MlflowSweepCallback
    from pact_ray.tracking.store import ensure_experiment, git_commit, ui_command
    from pact_ray.tracking.tags import ROLE_TAG
    from pact_ray.tracking.writer import close_shared, env_fast_fail, shared_writer

    plan = make_plan(kind, args)
    _check_writable(plan.storage)
    if args.resume:
        manifest = read_manifest(plan)
        if args.tracking_uri and args.tracking_uri != manifest["tracking_uri"]:
            raise SweepError(f"sweep {plan.name!r} logs to {manifest['tracking_uri']}; resume it with that --tracking-uri or without the flag")
        plan.tracking_uri = manifest["tracking_uri"]
        if manifest.get("kind") != kind.name:
            raise SweepError(f"sweep {plan.name!r} is a {manifest.get('kind')!r} sweep, not {kind.name!r}")
    elif plan.store.exists():
        raise SweepError(f"sweep {plan.name!r} already exists at {plan.exp_dir}; pass --resume to continue it or choose another --name")
    validate_inputs(plan)
    check_cluster_paths(plan)

    env_fast_fail()
    client = MlflowClient(plan.tracking_uri)
    if args.resume:
        experiment_id, parent_id = manifest["experiment_id"], manifest["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
    else:
        experiment_id = ensure_experiment(client, kind.experiment)
        parent = client.create_run(experiment_id, run_name=plan.name, tags={
            ROLE_TAG: "sweep", "kind": kind.name, "profile": args.profile, "model": args.model,
            "search": args.search, "git_commit": git_commit(), "mlflow.note.content": f"{kind.script} sweep: {' '.join(sys.argv[1:])}",
        })
        parent_id = parent.info.run_id
        for key, value in {"profile": args.profile, "model": args.model, "search": args.search, "variants": args.variants,
                           "seeds": args.seeds, "cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": args.gpus_per_trial}.items():
            client.log_param(parent_id, key, str(value))
        plan.store.create()
        write_manifest(plan.store, {
            "kind": kind.name, "name": plan.name, "tracking_uri": plan.tracking_uri, "experiment_id": experiment_id,
            "parent_run_id": parent_id, "argv": sys.argv[1:], "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "summary_dir": plan.summary_dir,
        })

    shared_writer(plan.tracking_uri)
    callback = MlflowSweepCallback(plan.tracking_uri, experiment_id, parent_id, kind.name, plan.name, git_commit())
    init_ray(args.address, args.quiet)
    t0 = time.time()
    status = "FAILED"
    try:
        results = _tuner(plan, callback, args.resume).fit()
        status = "FINISHED"
    finally:
        close_shared(plan.tracking_uri)
        client.set_terminated(parent_id, status=status if status == "FINISHED" else "KILLED")

    if kind.name == WORLD_MODEL.name:
        from pact_ray.report.world_model_sweep import collect_world_model_sweep, print_world_model_summary, write_world_model_summary

        wm = collect_world_model_sweep(plan.tracking_uri, experiment_id, parent_id, storage=plan.storage)
        files = write_summary(plan, client, parent_id, lambda out: write_world_model_summary(wm, out))
        _print_header(plan, results, wm.rows, time.time() - t0)
        print_world_model_summary(wm)
    else:
        data = collect_sweep(plan.tracking_uri, experiment_id, parent_id)
        files = write_summary(plan, client, parent_id, lambda out: write_report(data, out, plan.tracking_uri))
        _print_header(plan, results, data.rows, time.time() - t0)
        print_verdicts(route_status(data))
    _print_footer(plan, files, ui_command(plan.tracking_uri))
    return 0 if results.num_errors == 0 else 1


SUMMARY_ARTIFACTS = "summary"  # the parent run's artifact folder holding the summary files


def write_summary(plan: SweepPlan, client, parent_run_id: str, write: Callable[[Path], list[Path]]) -> list[str]:
    """``write(folder)`` the summary files, put them at ``plan.summary_dir`` (a folder or an object
    store) and log them as the parent run's ``summary/`` artifacts; returns where the files
    other than the plots are."""
    with staged_folder(plan.summary_dir) as (folder, where):
        files = write(folder)
        for f in files:
            client.log_artifact(parent_run_id, str(f), SUMMARY_ARTIFACTS)
    return [where(f) for f in files if f.suffix != ".png"]


def _print_header(plan: SweepPlan, results, rows: list[dict], wall: float) -> None:
    done = sum(r["status"] == "finished" for r in rows)
    print()
    print(f"Sweep {plan.name}: {done}/{len(rows)} trials finished, {results.num_errors} errored, {wall:.0f} s")
    for r in rows:
        if r["status"] == "errored":
            print(f"  errored: {r['run']}: {r['error']}")


def _print_footer(plan: SweepPlan, files: list[Path], ui: str) -> None:
    print(f"Ray results:  {plan.exp_dir}")
    print(f"MLflow:       {plan.tracking_uri}  (experiment {plan.kind.experiment})")
    for f in files:
        print(f"Summary:      {f}")
    print(f"Open the UI:  {ui}")
