"""Flags to a plan: everything a sweep will do, read from its command line and checked
before anything starts (:class:`SweepPlan`). Everything a user can get wrong is found here and
reported as one sentence (exit status 2); nothing is created before the checks pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pact_ray.errors import ConfigError
from pact_ray.kinds import MatrixKind, RunKind, resolve_kind
from pact_ray.runs.config import RunConfig
from pact_ray.runs.registry import parse_variants
from pact_ray.tune.flags import parse_overrides, parse_seeds, verdict_metrics
from pact_ray.tune.manifest import MANIFEST, load_manifest
from pact_ray.tune.storage import (
    Storage,
    check_visible_on_every_node,
    is_uri,
    join,
    open_storage,
)
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


def storage_path(arg: str | None) -> str:
    """An absolute folder or a URI pyarrow opens (s3://, gs://); anything else is a StorageError."""
    return str(Path.cwd().resolve() / "runs") if arg is None else open_storage(arg).uri


def check_writable(folder: str, what: str = "storage path") -> None:
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


def safe_name(name: str) -> str:
    if len(name) > MAX_NAME:
        raise SweepError(f"--name is {len(name)} characters long; keep it to {MAX_NAME}")
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise SweepError(f"--name {name!r} must be a plain folder name (no '/', not starting with '.')")
    if not all(c.isalnum() or c in "-_.+=" for c in name):
        raise SweepError(f"--name {name!r} may only use letters, digits and - _ . + =")
    return name


def make_plan(kind: RunKind, args: argparse.Namespace) -> SweepPlan:
    from pact_ray.tracking.store import check_tracking_uri, default_tracking_uri

    storage = storage_path(args.storage_path)
    name = safe_name(f"{kind.script}-{args.profile}-{time.strftime('%Y%m%d-%H%M%S')}" if args.name is None else args.name)
    if args.checkpoint and kind.profiles[args.profile].init != "official":
        official = [p.name for p in kind.profiles.values() if p.init == "official"]
        raise SweepError(f"--checkpoint is read only by the {' or '.join(official)} profile, which starts from official "
                         f"weights; --profile {args.profile} trains from scratch and would ignore it")
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
    if args.search != "optuna" and args.variants.strip() == "all":
        variants = distinct_variants(variants, trial_configs, configs)
        trial_configs, configs = map(list, zip(*[(tc, c) for tc, c in zip(trial_configs, configs) if tc["variant"] in variants]))
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


def distinct_variants(variants: list[str], trial_configs: list[dict[str, Any]],
                      configs: list[tuple[RunKind, RunConfig]]) -> list[str]:
    """``variants`` less those whose runs would repeat an earlier one's: a sized variant at the
    preset --model already gives its plain one (mae_small beside mae at --model small trains
    the same run twice, and both would enter the comparison). Compared on the grid's whole
    configs (profile, model and overrides applied), the variant's name aside; the first stays."""
    settings: dict[str, set[tuple]] = {}
    for tc, (kind, cfg) in zip(trial_configs, configs):
        flat = cfg.flat()
        flat.pop("variant")
        settings.setdefault(tc["variant"], set()).add((kind.name, tuple(sorted((k, repr(v)) for k, v in flat.items()))))
    seen: list[set[tuple]] = []
    out = []
    for variant in variants:
        if settings[variant] not in seen:
            seen.append(settings[variant])
            out.append(variant)
    return out


def _check_adaptive(kind: RunKind, args: argparse.Namespace, variants: list[str], seeds: list[int]) -> None:
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
    for kind, cfg in first_of_each_kind(plan):
        if cfg.data:
            kind.dataset(cfg).validate_all()
        if getattr(cfg, "init", "scratch") == "official":
            from pact_ray.models.checkpoint import load_core_weights

            model = kind.build_model(cfg)
            load_core_weights(model, cfg.init_checkpoint, model.core_state_dict_keys(), what=f"the {kind.title} '{cfg.model}' preset")


def first_of_each_kind(plan: SweepPlan) -> list[tuple[RunKind, RunConfig]]:
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


def num_samples(plan: SweepPlan) -> int:
    """Trials Tune may start: Optuna's budget; for adaptive seeds the most the searcher can
    ask for (it ends the search itself); one pass over the grid otherwise."""
    if plan.args.search == "optuna":
        return plan.args.num_samples
    if plan.args.until_conclusive:
        return len({tc["variant"] for tc in plan.trial_configs}) * plan.args.until_conclusive
    return 1


def searched(args: argparse.Namespace) -> bool:
    """Whether a searcher (Optuna, or adaptive seeds) proposes the trials, rather than the grid."""
    return args.search != "grid" or bool(args.until_conclusive)


# Flags a resume takes from its own command line; every other one is the original sweep's.
RESUME_OWN_FLAGS = ("address", "quiet", "verbose")

AUTO = "auto"  # --resume auto


def original_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace | str:
    """A resume runs the sweep its manifest records (its variants, seeds, profile, overrides),
    with this command's own --address, --quiet and --verbose. ``--resume auto`` starts the
    sweep where it does not exist (this command's own flags), resumes it where it does, and
    returns one line to print instead where it has finished."""
    if not args.name:
        raise SweepError(f"--resume {'auto ' if args.resume == AUTO else ''}needs the --name of the sweep to continue")
    manifest = load_manifest(open_storage(join(storage_path(args.storage_path), safe_name(args.name))))
    if args.resume == AUTO:
        if manifest is None:  # not started (or killed before it was created): start it
            args.resume = None
            return args
        if manifest.get("finished"):
            return (f"Sweep {args.name} finished at {manifest['finished']}; nothing to do "
                    f"(its summary: {manifest.get('summary_dir', 'in its folder')}).")
    if manifest is None or "argv" not in manifest:
        return args  # make_plan and read_manifest say what is missing
    original = parser.parse_args(manifest["argv"])
    original.argv = manifest["argv"]
    original.resume, original.name, original.storage_path = "yes", args.name, args.storage_path
    for flag in RESUME_OWN_FLAGS:
        setattr(original, flag, getattr(args, flag))
    if args.tracking_uri and not original.tracking_uri:
        original.tracking_uri = args.tracking_uri  # checked against the manifest's store in _run
    return original


def sweep_script(kind: RunKind) -> str:
    """The kind's sweep script, relative to the project folder."""
    return f"sweeps/{kind.script}.py"


def resume_command(plan: SweepPlan) -> str:
    """The exact command that continues this sweep: it runs as printed from the project folder
    in a fresh shell (the interpreter by absolute path, the storage folder named)."""
    from pact_ray.cli import project_command

    return project_command(sweep_script(plan.kind), "--name", plan.name, "--storage-path", plan.storage, "--resume")


DASHBOARD_HOST, DASHBOARD_PORT = "127.0.0.1", 8080


def optuna_dashboard_command(plan: SweepPlan, port: int | None = None) -> str | None:
    """The command that opens the sweep's Optuna study in optuna-dashboard (None without one):
    the virtualenv's optuna-dashboard by absolute path, on ``port`` or the first free port
    from 8080."""
    from pact_ray.cli import free_port, shell_join, venv_executable

    url = optuna_storage_url(plan) if plan.args.search == "optuna" else None
    if not url:
        return None
    port = free_port(DASHBOARD_PORT, DASHBOARD_HOST) if port is None else port
    return shell_join([venv_executable("optuna-dashboard"), url, "--host", DASHBOARD_HOST, "--port", str(port)])
