"""The whole report of a summary: the CSV and JSON tables, route status, the plots of what
the sweep ran, one parallel-coordinates plot per tuned variant, and ``index.html``.

Everything is rendered in memory first and written only after it all rendered, each file
atomically (temporary file, then rename), so an error never leaves half a report.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pact_ray.fileio import atomic_write
from pact_ray.report.ablation.groups import STAGE1, STAGE2, router_on
from pact_ray.report.ablation.page import PlotLink, render_page
from pact_ray.report.ablation.plots import parallel_coordinates, plots_for
from pact_ray.report.ablation.route import RouteEntry, route_status
from pact_ray.report.ablation.tuning import tuned_variants
from pact_ray.report.summary import CSV_NAME, JSON_NAME, STATUSES, SummaryData, kind_title, to_csv, to_json

# route_status.json: one row per (variant, setting) comparison; report.json: the counts and
# the knob importances of tuned variants.
ROUTE_JSON, REPORT_JSON, INDEX_HTML = "route_status.json", "report.json", "index.html"
COUNT_LABELS = {"stage1_runs": f"{kind_title(STAGE1)} runs", "stage2_runs": f"{kind_title(STAGE2)} runs",
                "ot_diagnostic_runs": "OT diagnostic runs", "total_parsed_runs": "total parsed runs"}


def run_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """The page's counts (keys of ``COUNT_LABELS``): Stage1 runs, Stage2 runs, OT diagnostic
    runs (runs whose variant has the router on), every parsed run."""
    return {
        "stage1_runs": sum(r["kind"] == STAGE1 for r in rows),
        "stage2_runs": sum(r["kind"] == STAGE2 for r in rows),
        "ot_diagnostic_runs": sum(router_on(r) for r in rows),
        "total_parsed_runs": len(rows),
    }


def status_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Runs per status: finished, errored, running."""
    return {s: sum(r["status"] == s for r in rows) for s in STATUSES}


def render_report(data: SummaryData, source: str = "", optuna: str | None = None,
                  entries: list[RouteEntry] | None = None) -> dict[str, str | bytes]:
    """File name -> content of every report file (nothing is written); ``optuna``: the
    command that opens the sweep's Optuna study, which the page shows; ``entries``: the route
    status, when the caller computed it with its own design (default: a fixed design)."""
    entries = route_status(data) if entries is None else entries
    tuned = tuned_variants(data)
    counts, status = run_counts(data.rows), status_counts(data.rows)
    files: dict[str, str | bytes] = {CSV_NAME: to_csv(data.rows), JSON_NAME: to_json(data.rows)}
    files[ROUTE_JSON] = json.dumps([e.to_json() for e in entries], indent=1)
    files[REPORT_JSON] = json.dumps({"counts": counts, "status": status, "param_importance": [t.to_json() for t in tuned]}, indent=1)
    plots = plots_for(data)
    for spec in plots:
        files[f"{spec.name}.png"] = spec.draw(data, entries)
    for t in tuned:
        files[t.png] = parallel_coordinates(t)
    files[INDEX_HTML] = render_page(
        counts={COUNT_LABELS[k]: n for k, n in counts.items()}, status=status, entries=entries, tuned=tuned,
        figures=[PlotLink(f"{s.name}.png", s.caption) for s in plots], rows=data.rows,
        files=[CSV_NAME, JSON_NAME, ROUTE_JSON, REPORT_JSON], source=source, generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        optuna=optuna, images={name: content for name, content in files.items() if name.endswith(".png") and isinstance(content, bytes)},
    )
    return files


def write_report(data: SummaryData, out_dir: str | os.PathLike, source: str = "", optuna: str | None = None,
                 entries: list[RouteEntry] | None = None) -> list[Path]:
    """Render the report of ``data`` and write it into ``out_dir``; returns the paths in
    writing order (the page last, once everything it links is there)."""
    files = render_report(data, source, optuna, entries)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        atomic_write(out / name, content)
    return [out / name for name in files]
