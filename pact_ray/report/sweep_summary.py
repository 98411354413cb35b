"""A finished sweep's summary in one shape for every run kind (each kind names its own in
:data:`pact_ray.kinds.RUN_KINDS`): the trials' rows, the files it writes, what it prints,
and what the parent MLflow run shows (its description and headline metrics).
:mod:`pact_ray.tune.finish` drives it without knowing which kind it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from pact_ray.report.summary import SummaryData
from pact_ray.verdicts import Design


@dataclass(frozen=True)
class SummaryRequest:
    """What a sweep's summary reads: its trials are the children of ``parent_id``."""

    tracking_uri: str
    experiment_id: str
    parent_id: str
    storage: str  # the sweep's storage path (the evaluation report's command names it)
    design: Design = Design()
    metrics: Mapping[str, str] = field(default_factory=dict)  # kind -> its --metric (empty: the primaries)
    optuna: str | None = None  # the command that opens the sweep's Optuna study, if it has one


@dataclass
class SweepSummary:
    rows: list[dict[str, Any]]  # one per trial, with "status", "run" and "error"
    write: Callable[[Path], list[Path]]  # writes the summary files into a folder; returns them
    show: Callable[[], None]  # prints the verdicts (or the kind's comparison)
    description: str  # the parent run's description (Markdown)
    headline: dict[str, float]  # the parent run's metrics
    data: SummaryData | None = None  # the trials' params and curves, where the best Optuna trial is read from


def ablation_summary(request: SummaryRequest) -> SweepSummary:
    """Variants against their baseline (Stage1, Stage2, the OT matrix): the route status with
    its verdicts, the HTML report and its tables."""
    from pact_ray.report.ablation import write_report
    from pact_ray.report.ablation.route import print_verdicts, route_status
    from pact_ray.report.summary import collect_sweep
    from pact_ray.tracking.sweep_run import ablation_headline, verdict_table

    data = collect_sweep(request.tracking_uri, request.experiment_id, request.parent_id, metrics=request.metrics.values())
    entries = route_status(data, request.design, request.metrics)
    return SweepSummary(
        rows=data.rows,
        write=lambda out: write_report(data, out, request.tracking_uri, optuna=request.optuna, entries=entries),
        show=lambda: print_verdicts(entries),
        description=verdict_table(entries), headline=ablation_headline(data.rows, entries), data=data,
    )


def world_model_summary(request: SummaryRequest) -> SweepSummary:
    """MAE variants against the GPT baseline of the same size, with each run's evaluation report command."""
    from pact_ray.report.world_model_sweep import (
        collect_world_model_sweep,
        print_world_model_summary,
        summary_lines,
        write_world_model_summary,
    )

    wm = collect_world_model_sweep(request.tracking_uri, request.experiment_id, request.parent_id, storage=request.storage,
                                   design=request.design)
    headline = {"trials_finished": sum(r["status"] == "finished" for r in wm.rows),
                "trials_errored": sum(r["status"] == "errored" for r in wm.rows),
                **{f"val_mse.{m['variant']}": m["val_mse"].mean for m in wm.means if m["val_mse"] is not None}}
    return SweepSummary(rows=wm.rows, write=lambda out: write_world_model_summary(wm, out),
                        show=lambda: print_world_model_summary(wm),
                        description="\n".join(summary_lines(wm)[:-2]), headline=headline)
