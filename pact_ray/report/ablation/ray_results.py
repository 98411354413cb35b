"""Summary rows from Ray Tune's own result folders, for when there is no tracking store.

A sweep's experiment folder (``<storage-path>/<name>``) holds our ``pact_ray_sweep.json``
manifest (the run kind) and one folder per trial with ``params.json`` (the trial config),
``result.json`` (one JSON object per reported result: the metrics, ``step``,
``time_total_s``) and ``error.txt`` when the trial failed. The trial's status comes from
Ray's newest ``experiment_state-*.json`` where it can be read (TERMINATED -> finished,
ERROR -> errored, anything else -> running), else from ``error.txt`` and whether the trial
reached its configured steps. Phase, note and the flat params come from the run-kind
registry (a matrix trial is a trial of its cell's kind); rows are keyed
``<experiment>/<trial_id>`` as the MLflow rows are.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pact_ray.errors import ConfigError, error_line
from pact_ray.fileio import SWEEP_MANIFEST as MANIFEST
from pact_ray.kinds import RUN_KINDS, resolve_kind
from pact_ray.metrics import names as M
from pact_ray.report.summary import (
    DEFAULT_KIND,
    ERRORED,
    FINISHED,
    RUNNING,
    Curve,
    SummaryData,
    make_row,
    set_val_steps,
    sort_rows,
    verdict_metrics,
)
from pact_ray.runs.config import RunConfig

log = logging.getLogger(__name__)

RAY_STATUS = {"TERMINATED": FINISHED, "ERROR": ERRORED}
TRIAL_DIR = re.compile(r"_s-?\d+_(?P<trial_id>[0-9a-f]+_\d+)$")  # our trial folder names: <variant>_s<seed>_<trial_id>


@dataclass(frozen=True)
class TrialState:
    """What Ray's experiment state says about one trial."""

    trial_id: str
    status: str  # TERMINATED, ERROR, RUNNING, PENDING, PAUSED


@dataclass(frozen=True)
class _ErrorFile:
    """The trial attributes :func:`pact_ray.errors.error_line` reads."""

    error_file: str
    error_msg: str | None = None


def experiment_dirs(path: Path) -> list[Path]:
    """``path`` itself when it is a sweep's folder, else the sweep folders directly in it."""
    if not path.is_dir():
        raise ValueError(f"results path {path} is not a folder")
    if (path / MANIFEST).is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / MANIFEST).is_file())
    if not found:
        raise ValueError(f"results path {path} holds no pact-ray sweep (no {MANIFEST} in it or in its subfolders)")
    return found


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ValueError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def trial_states(exp_dir: Path) -> dict[str, TrialState]:
    """Trial folder name -> state, from Ray's newest experiment state (empty if unreadable).

    The file is Ray's internal format: any surprise in it falls back to the folder contents.
    """
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
        trials = (json.loads(item[0]) for item in data["trial_data"])
        return {t["relative_logdir"]: TrialState(t["trial_id"], t["status"]) for t in trials}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        log.warning("could not read %s (%s); trial status comes from the trial folders", states[-1], e)
        return {}


def read_results(path: Path) -> list[dict[str, Any]]:
    """The reported results of one trial, in order; a torn last line (a killed driver) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


def _last_values(results: list[dict[str, Any]]) -> dict[str, float]:
    """Each numeric metric's latest reported value (what MLflow keeps as a run's metric)."""
    out: dict[str, float] = {}
    for item in results:
        for key, value in item.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = float(value)
    if "time_total_s" in out:
        out["wall_s"] = out["time_total_s"]
    return out


def _curve(results: list[dict[str, Any]], metric: str = M.LOSS) -> Curve:
    """The metric at every reported step that has it (NaN left out)."""
    points = {}
    for item in results:
        step, value = item.get(M.STEP, item.get("training_iteration")), item.get(metric)
        if isinstance(step, (int, float)) and isinstance(value, (int, float)) and not math.isnan(value):
            points[int(step)] = float(value)
    return sorted(points.items())


def _trial_id(folder: Path, results: list[dict[str, Any]], state: TrialState | None) -> str:
    if state:
        return state.trial_id
    for item in results:
        if isinstance(item.get("trial_id"), str):
            return item["trial_id"]
    m = TRIAL_DIR.search(folder.name)
    return m.group("trial_id") if m else folder.name


def _status(folder: Path, state: TrialState | None, steps: int | None, planned: int | None) -> str:
    if state:
        return RAY_STATUS.get(state.status, RUNNING)
    if (folder / "error.txt").is_file():
        return ERRORED
    return FINISHED if steps is not None and planned is not None and steps >= planned else RUNNING


def _own_config(sweep_kind: str, trial_config: dict[str, Any], folder: Path) -> tuple[str, dict[str, Any], RunConfig | None]:
    """(the trial's own kind, its trial config in that kind's terms, its run config): a matrix
    trial is a trial of its cell's kind, as the MLflow callback tags it. The run config is
    None where the registry cannot build it (a kind or variant this version does not know)."""
    kind = RUN_KINDS.get(sweep_kind)
    if kind is None:
        return sweep_kind, trial_config, None
    try:
        own_kind, own = resolve_kind(kind, trial_config)
        return own_kind.name, own, own_kind.config(own)
    except (ConfigError, KeyError) as e:
        log.warning("%s: %s; phase and note left empty", folder, e)
        return sweep_kind, trial_config, None


def _trial(folder: Path, sweep_kind: str, experiment: str, state: TrialState | None) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, str]]:
    """(row, reported results, flat params) of one trial folder of a ``sweep_kind`` sweep."""
    results = read_results(folder / "result.json")
    params_file = folder / "params.json"
    trial_config = read_json(params_file) if params_file.is_file() else (results[-1].get("config", {}) if results else {})
    kind_name, own, cfg = _own_config(sweep_kind, trial_config, folder)
    fields = {k: getattr(cfg, k) if cfg else own.get(k) for k in ("variant", "profile", "model", "seed")}
    variant = RUN_KINDS[kind_name].variants.get(fields["variant"]) if cfg else None
    metrics = _last_values(results)
    steps = int(metrics[M.STEP]) if M.STEP in metrics else None
    status = _status(folder, state, steps, getattr(cfg, "steps", None))
    row = make_row(
        kind=kind_name, experiment=experiment, trial_id=_trial_id(folder, results, state),
        variant=str(fields["variant"] or ""), profile=str(fields["profile"] or ""), model=fields["model"], seed=fields["seed"],
        phase=getattr(cfg, "phase", None), note=variant.note if variant else None, status=status,
        error=error_line(_ErrorFile(str(folder / "error.txt"))) if status == ERRORED else None, metrics=metrics,
    )
    flat = cfg.flat() if cfg else own
    return row, results, {k: "" if v is None else str(v) for k, v in flat.items()}


def _experiment(sweep_kind: str) -> str:
    """The MLflow experiment the sweep logs to, which the MLflow rows' run ids name."""
    kind = RUN_KINDS.get(sweep_kind)
    return kind.experiment if kind else f"pact-ray/{sweep_kind}"


def collect_results(path: str | Path, metrics: Iterable[str] = ()) -> SummaryData:
    """Rows, loss curves and params of every trial in the sweep folder ``path``, or in every
    sweep folder directly inside ``path`` (a storage path)."""
    rows, results, params = [], {}, {}
    for exp_dir in experiment_dirs(Path(path)):
        sweep_kind = str(read_json(exp_dir / MANIFEST).get("kind") or DEFAULT_KIND)
        states = trial_states(exp_dir)
        for folder in sorted(p for p in exp_dir.iterdir() if (p / "params.json").is_file() or (p / "result.json").is_file()):
            row, reported, flat = _trial(folder, sweep_kind, _experiment(sweep_kind), states.get(folder.name))
            rows.append(row)
            results[row["run_id"]], params[row["run_id"]] = reported, flat
    data = SummaryData(sort_rows(rows), {k: _curve(r) for k, r in results.items()}, params,
                       {k: _curve(r, M.VAL_LOSS) for k, r in results.items()})
    for metric in verdict_metrics({r["kind"] for r in rows}, metrics):
        data.metric_curves[metric] = {k: _curve(r, metric) for k, r in results.items()}
    set_val_steps(data)
    return data
