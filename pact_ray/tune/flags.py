"""The flags of every sweep script, and the parsing of the values they carry. A script's
help lists only what applies to it: its own profiles, presets and config keys."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pact_ray.cli import HelpFormatter, OneLineParser, nonneg_float, nonneg_int, positive_float, positive_int
from pact_ray.errors import ConfigError
from pact_ray.runs.kinds import RunKind

# Examples of --set per kind: keys of that kind's config.
SET_EXAMPLES = {
    "stage1": "lr=3e-4, batch_size=4, router.eps=0.1",
    "stage2": "lr=3e-4, art_weight=0.5, max_tokens=32",
    "matrix": "lr=3e-4, stage1.router.eps=0.1, stage2.art_weight=0.5",
    "world_model": "lr=5e-4, mask=target_random, eval_every=10",
}


def build_parser(kind: RunKind, description: str, examples: str = "") -> argparse.ArgumentParser:
    p = OneLineParser(description=description, epilog=examples or None, formatter_class=HelpFormatter)
    official = any(prof.init == "official" for prof in kind.profiles.values())
    g = p.add_argument_group("what to run")
    g.add_argument("--profile", default="quick", choices=list(kind.profiles), help="steps, optimiser, validation and export of each run")
    g.add_argument("--model", default="small", help=f"model preset: {', '.join(kind.presets)}")
    g.add_argument("--variants", default="all", help="comma-separated variants for the grid, or 'all': " + ", ".join(kind.variants))
    g.add_argument("--seeds", default=None, help="comma-separated seeds; the grid is variants x seeds (default: the profile's: "
                   + ", ".join(f"{p.name} {','.join(map(str, range(p.seeds)))}" for p in kind.profiles.values()) + ")")
    g.add_argument("--search", default="grid", choices=["grid", "optuna"], help="grid over named variants, or Optuna over one variant's continuous knobs")
    g.add_argument("--variant", default=None, help="the variant whose knobs --search optuna tunes")
    g.add_argument("--num-samples", type=positive_int, default=8, help="Optuna trials")
    g.add_argument("--scheduler", default="none", choices=["none", "asha"], help="asha stops poor trials early on the training loss")
    if "baseline" in kind.variants:  # a sweep whose variants meet a baseline
        g.add_argument("--until-conclusive", type=positive_int, default=0, metavar="MAX_SEEDS",
                       help="after the grid, add seeds to the variants whose corrected verdict against the baseline is still "
                            "inconclusive, up to MAX_SEEDS per variant")
    else:
        p.set_defaults(until_conclusive=0)
    metrics = _val_metrics(kind)
    g.add_argument("--metric", default=None, choices=metrics or None,
                   help="the validation metric the verdicts compare on (default: each kind's primary metric: "
                        + _primaries(kind) + ")")
    g.add_argument("--margin", default="1%", metavar="DELTA",
                   help="the margin of practical difference: relative to the baseline (1%%) or absolute (0.005); a difference "
                        "inside it is 'equivalent' or 'within' (default: 1%%)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config field for every trial (e.g. {SET_EXAMPLES[kind.name]}); repeatable")
    g.add_argument("--data", default=None, help="dataset folder (default: synthetic data generated once and cached)")
    if official:
        g.add_argument("--checkpoint", default=None, help="official weights (.safetensors or .pt) for --profile official-full")
    else:
        p.set_defaults(checkpoint=None)
    g = p.add_argument_group("where")
    g.add_argument("--name", default=None, help="sweep name (default: <script>-<profile>-<time>)")
    g.add_argument("--storage-path", default=None, help="absolute folder or URI for Ray results (default: ./runs)")
    g.add_argument("--tracking-uri", default=None, help="MLflow store: absolute sqlite:/// file or http:// server (default: ./mlflow.db)")
    g.add_argument("--summary-dir", default=None, help="where the summary files go (default: <storage-path>/<name>/summary)")
    g = p.add_argument_group("how")
    g.add_argument("--address", default=None, help="an existing Ray cluster (auto, or ray://host:10001; default: start a local one)")
    g.add_argument("--resume", action="store_true", help="continue the sweep --name where it stopped")
    g.add_argument("--max-concurrent", type=nonneg_int, default=0, help="trials at once (0: as many as resources allow)")
    g.add_argument("--cpus-per-trial", type=positive_float, default=1.0, help="CPUs per trial (torch threads follow)")
    g.add_argument("--gpus-per-trial", type=nonneg_float, default=0.0, help="GPUs per trial; fractions pack trials on one GPU")
    g.add_argument("--max-failures", type=nonneg_int, default=2, help="retries of a failed trial from its last checkpoint")
    g.add_argument("--optuna-seed", type=int, default=0, help="seed of the Optuna sampler")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    g.add_argument("--verbose", action="store_true", help="Ray's own per-trial result boxes and worker logs as well")
    return p


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> typed values (JSON literals where they parse, strings otherwise)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def parse_seeds(text: str) -> list[int]:
    from pact_ray.runs.config import MAX_SEED

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not a comma-separated list of integers") from None
    if not seeds:
        raise ConfigError("--seeds names no seed")
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise ConfigError(f"--seeds must be in 0..{MAX_SEED}, got {bad[0]}")
    return list(dict.fromkeys(seeds))


def _kinds_of(kind: RunKind) -> list[RunKind]:
    """The run kinds whose trials a sweep of ``kind`` runs (the matrix: Stage1 and Stage2)."""
    from pact_ray.runs.kinds import RUN_KINDS

    cells = getattr(kind, "cells", None)
    if cells:
        return [RUN_KINDS[k] for k in dict.fromkeys(k for k, _ in cells.values())]
    return [kind]


def _val_metrics(kind: RunKind) -> list[str]:
    """The validation metrics every kind of the sweep logs (what --metric accepts)."""
    kinds = _kinds_of(kind)
    return [m for m in kinds[0].val_metrics if all(m in k.val_metrics for k in kinds)]


def _primaries(kind: RunKind) -> str:
    return ", ".join(f"{k.title} {k.val_metric}" for k in _kinds_of(kind))


def verdict_metrics(kind: RunKind, metric: str | None) -> dict[str, str]:
    """kind name -> the metric its verdicts compare on, for ``--metric`` (empty: the primaries)."""
    return {k.name: metric for k in _kinds_of(kind)} if metric else {}
