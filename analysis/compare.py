"""Compare two trial runs side by side: their config params and final metrics, with deltas.

    .venv/bin/python analysis/compare.py RUN_A RUN_B [--tracking-uri sqlite:///$PWD/mlflow.db] [--all-params]

RUN_A and RUN_B are MLflow run ids or ``experiment/trial_id`` as in the summary's run_id
column (``pact-ray/stage1_router/74992_00001``). Deltas are B - A, and in % of A.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import TYPE_CHECKING, Sequence

from pact_ray.cli import OneLineParser, user_errors
from pact_ray.tracking.tags import TRIAL_TAG

# MLflow and the summary's row builder are imported once the flags are parsed: `--help` and a
# bad flag answer in a tenth of a second instead of five.
if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

MLFLOW_RUN_ID = re.compile(r"[0-9a-f]{32}")
TRIAL_ID = re.compile(r"[\w.-]+")
MISSING = "-"


def find_run(client: MlflowClient, ref: str) -> tuple[Run, str] | None:
    """(run, experiment name) for an MLflow run id or ``experiment/trial_id``; None if there is none."""
    from mlflow.exceptions import MlflowException

    if MLFLOW_RUN_ID.fullmatch(ref):
        try:
            run = client.get_run(ref)
        except MlflowException:
            return None
        return run, client.get_experiment(run.info.experiment_id).name
    experiment, _, trial = ref.rpartition("/")
    exp = client.get_experiment_by_name(experiment) if experiment else None
    if exp is None or not TRIAL_ID.fullmatch(trial):
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial}'", max_results=1)
    return (runs[0], exp.name) if runs else None


def _cell(value: str | float | None) -> str:
    if value is None or value == "":
        return MISSING
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]


def param_lines(a: Run, b: Run, show_all: bool) -> list[str]:
    pa, pb = a.data.params, b.data.params
    keys = sorted(set(pa) | set(pb))
    differ = [k for k in keys if (pa.get(k) or "") != (pb.get(k) or "")]  # a param one run lacks = an empty one
    shown = keys if show_all else differ
    title = f"Params: {len(differ)} differ, {len(keys) - len(differ)} equal" + ("" if show_all else " (--all-params lists every one)")
    rows = [(("* " if k in differ else "  ") + k, _cell(pa.get(k)), _cell(pb.get(k))) for k in shown]
    return [title, *(_table(("  param", "A", "B"), rows) if rows else ["  (none differ)"])]


def _delta(a: float | None, b: float | None) -> tuple[str, str]:
    if a is None or b is None:
        return MISSING, MISSING
    pct = MISSING if a == 0 or math.isnan(a) else f"{100 * (b - a) / abs(a):+.3g}%"
    return f"{b - a:+.6g}", pct


def metric_lines(a: Run, b: Run) -> list[str]:
    from pact_ray.report.summary import METRIC_COLUMNS

    ma, mb = a.data.metrics, b.data.metrics
    keys = [m for m in METRIC_COLUMNS if m in ma or m in mb] + sorted((set(ma) | set(mb)) - set(METRIC_COLUMNS))
    rows = [(k, _cell(ma.get(k)), _cell(mb.get(k)), *_delta(ma.get(k), mb.get(k))) for k in keys]
    return ["Final metrics (the last value each run logged)", *_table(("metric", "A", "B", "B - A", "% of A"), rows)]


def run_lines(tag: str, run: Run, experiment: str) -> list[str]:
    from pact_ray.report.summary import row_from_run

    row = row_from_run(run, experiment)
    status = row["status"] + (f": {row['error']}" if row["error"] else "")
    return [f"{tag}  {row['run']}  [{status}]", f"   {row['run_id']}  (MLflow run {run.info.run_id})"]


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_a", metavar="RUN_A", help="MLflow run id or experiment/trial_id")
    p.add_argument("run_b", metavar="RUN_B", help="MLflow run id or experiment/trial_id")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///$PWD/mlflow.db)")
    p.add_argument("--all-params", action="store_true", help="list every param, not only those that differ")
    args = p.parse_args(argv)
    from mlflow.exceptions import MlflowException

    return user_errors(lambda: _compare(args), MlflowException)


def _compare(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from pact_ray.tracking.store import check_tracking_uri, default_tracking_uri, sqlite_path

    uri = check_tracking_uri(args.tracking_uri or default_tracking_uri())
    if uri.startswith("sqlite:///") and not sqlite_path(uri).is_file():
        raise ValueError(f"tracking store {uri} does not exist")
    client = MlflowClient(uri)
    found = []
    for ref in (args.run_a, args.run_b):
        hit = find_run(client, ref)
        if hit is None:
            raise ValueError(f"no run {ref!r} in {uri}; pass an MLflow run id or experiment/trial_id as in the summary's run_id column")
        found.append(hit)
    (a, exp_a), (b, exp_b) = found
    lines = [*run_lines("A", a, exp_a), *run_lines("B", b, exp_b), "", *param_lines(a, b, args.all_params), "", *metric_lines(a, b)]
    print("\n".join(lines))
    return 0

if __name__ == "__main__":
    sys.exit(main())
