"""The flags of every sweep script, and the parsing of the values they carry. A script's
help lists only what applies to it: its own profiles, presets and config keys."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pact_ray.cli import HelpFormatter, OneLineParser, nonneg_float, nonneg_int, positive_float, positive_int
from pact_ray.errors import ConfigError
from pact_ray.kinds import RunKind


def build_parser(kind: RunKind, description: str, examples: str = "") -> argparse.ArgumentParser:
    p = OneLineParser(description=description, epilog=examples or None, formatter_class=HelpFormatter)
    official = any(prof.init == "official" for prof in kind.profiles.values())
    p.add_argument_group("profiles (--profile)", profiles_text(kind))
    g = p.add_argument_group("what to run")
    g.add_argument("--profile", default="quick", choices=list(kind.profiles), help="steps, optimiser, validation and export of each run")
    g.add_argument("--model", default="small", help=f"model preset: {', '.join(kind.presets)}")
    g.add_argument("--variants", default="all", help="comma-separated variants for the grid, or 'all' (every one whose settings differ: a sized variant "
                   "that equals another at --model is left out): " + ", ".join(kind.variants))
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
                   help=f"override a config field for every trial (e.g. {kind.set_example}); repeatable; "
                        "--list-keys lists the keys, their types, defaults and accepted values")
    g.add_argument("--list-keys", action=ListKeys, kind=kind, help="list the keys --set accepts and exit")
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
    g.add_argument("--resume", nargs="?", const="yes", default=None, type=_resume_mode, metavar="auto",
                   help="continue the sweep --name where it stopped; '--resume auto': start it if it does not exist, "
                        "continue it if it does, and do nothing if it has finished (the same command for every retry "
                        "of a scheduler)")
    g.add_argument("--max-concurrent", type=nonneg_int, default=0, help="trials at once (0: as many as resources allow)")
    g.add_argument("--cpus-per-trial", type=positive_float, default=1.0, help="CPUs per trial (torch threads follow)")
    g.add_argument("--gpus-per-trial", type=nonneg_float, default=0.0, help="GPUs per trial; fractions pack trials on one GPU")
    g.add_argument("--max-failures", type=nonneg_int, default=2, help="retries of a failed trial from its last checkpoint")
    g.add_argument("--optuna-seed", type=int, default=0, help="seed of the Optuna sampler")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    g.add_argument("--verbose", action="store_true", help="Ray's own per-trial result boxes and worker logs as well")
    return p


class ListKeys(argparse.Action):
    """``--list-keys``: print the keys ``--set`` accepts (pact_ray.runs.keys) and exit."""

    def __init__(self, option_strings, dest, kind: RunKind, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.kind = kind

    def __call__(self, parser, namespace, values, option_string=None):
        print(keys_text(self.kind))
        parser.exit()


def keys_text(kind: RunKind) -> str:
    """The keys ``--set`` accepts for a sweep of ``kind``: name (type, default, accepted values,
    Optuna range): meaning. A matrix takes each kind's keys, unprefixed for every cell or
    prefixed with the kind for its cells only."""
    from pact_ray.runs.keys import format_keys, keys_of

    kinds = _kinds_of(kind)
    lines = [f"--set KEY=VALUE keys of {kind.script} (a profile or variant may set other values than these defaults; "
             "variant, profile, model and seed have flags of their own):"]
    for k in kinds:
        prefix = f"{k.name}." if len(kinds) > 1 else ""
        if prefix:
            lines.append(f"\n{k.title} cells (KEY for every cell that has it, {prefix}KEY for {k.title} cells only):")
        lines.extend(format_keys(keys_of(k.config_cls, k.knobs), prefix))
    return "\n".join(lines)


def profiles_text(kind: RunKind) -> str:
    """Each profile's steps, validation points and default seeds (what --profile picks)."""
    kinds = _kinds_of(kind)
    lines = []
    width = max(len(name) for name in kind.profiles)
    for name, profile in kind.profiles.items():
        parts = []
        for k in kinds:
            own = k.profiles[name]
            parts.append((f"{k.title}: " if len(kinds) > 1 else "") + _profile_steps(k, own))
        seeds = ",".join(map(str, range(profile.seeds)))
        extra = [f"seeds {seeds}"]
        if not profile.verdicts:
            extra.append("no verdicts (not meant for conclusions)")
        if profile.init != "scratch":
            extra.append(f"from the {profile.init} weights (--checkpoint)")
        if len(parts) == 1:
            lines.append(f"{name:<{width}}  {parts[0]}; {'; '.join(extra)}")
        else:  # the matrix: each kind's steps on a line of its own
            lines.append(f"{name:<{width}}  {'; '.join(extra)}")
            lines.extend(f"{'':<{width}}    {part}" for part in parts)
    return "\n".join(lines)


def _profile_steps(kind: RunKind, profile) -> str:
    """"8 steps (first-third variants: 3), validated at steps 3, 8"."""
    from dataclasses import fields

    default_every = next(f.default for f in fields(kind.config_cls) if f.name == "eval_every")
    every = profile.settings.get("eval_every", default_every)
    steps = {profile.steps}
    short = profile.steps_first_third
    first_third = short is not None and short != profile.steps and any(v.first_third for v in kind.variants.values())
    text = f"{profile.steps} step{'s' * (profile.steps != 1)}"
    if first_third:
        text += f" (first-third variants: {short})"
        steps.add(short)
    points = sorted(steps | set(range(every, profile.steps + 1, every) if every else ()))
    if len(points) > 6:
        shown = f"every {every} steps ({points[0]}, {points[1]}, ..., {points[-1]})"
        return f"{text}, validated {shown}" + (f" and at {short}" if first_third and short % every else "")
    return f"{text}, validated at step{'s' * (len(points) != 1)} {', '.join(map(str, points))}"


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


def _resume_mode(text: str) -> str:
    if text not in ("auto", "yes"):  # "yes": the value of a bare --resume
        raise argparse.ArgumentTypeError(f"--resume takes no value or 'auto', not {text!r}")
    return text


def parse_seeds(text: str) -> list[int]:
    from pact_ray.runs.config import MAX_SEED

    items = [s.strip() for s in text.split(",")]
    if not any(items):
        raise ConfigError("--seeds names no seed")
    try:  # an empty item ("0,,1", "0,") is a typo, not a seed to skip
        seeds = [int(s) for s in items]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not a comma-separated list of integers") from None
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise ConfigError(f"--seeds must be in 0..{MAX_SEED}, got {bad[0]}")
    return list(dict.fromkeys(seeds))


def _kinds_of(kind: RunKind) -> list[RunKind]:
    """The run kinds whose trials a sweep of ``kind`` runs (the matrix: Stage1 and Stage2)."""
    from pact_ray.kinds import RUN_KINDS

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
