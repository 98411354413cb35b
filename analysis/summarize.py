"""Write the ablation summary and its report from an MLflow store or from Ray's result folders.

    python analysis/summarize.py --tracking-uri sqlite:///$PWD/mlflow.db --experiment pact-ray/stage1_router --out summary/
    python analysis/summarize.py --results /abs/runs --out summary/

The output folder gets ablation_summary.csv / .json (one row per run), route_status.json,
the plots (PNG) and index.html, a static page that opens from disk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlflow.exceptions import MlflowException

from pact_ray.cli import OneLineParser, user_errors
from pact_ray.report.ablation import collect_results, write_report
from pact_ray.report.ablation.build import status_counts
from pact_ray.report.summary import SummaryData, collect
from pact_ray.tracking.store import check_tracking_uri, default_tracking_uri, sqlite_path


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///$PWD/mlflow.db)")
    src.add_argument("--results", default=None, metavar="DIR",
                     help="read Ray's result folders instead: a sweep's folder or the storage path holding sweeps")
    p.add_argument("--experiment", action="append", default=None,
                   help="MLflow experiment name (repeatable; default: every pact-ray/* experiment)")
    p.add_argument("--out", default="summary", help="output folder")
    return p


def load(args: argparse.Namespace) -> tuple[SummaryData, str]:
    """The summary data and a description of where it came from."""
    if args.results:
        if args.experiment:
            raise ValueError("--experiment selects MLflow experiments; it does not apply to --results")
        path = Path(args.results).resolve()
        return collect_results(path), str(path)
    uri = check_tracking_uri(args.tracking_uri or default_tracking_uri())
    if uri.startswith("sqlite:///") and not sqlite_path(uri).is_file():
        raise ValueError(f"tracking store {uri} does not exist (pass --tracking-uri, or --results for Ray's result folders)")
    data = collect(uri, args.experiment)
    return data, uri


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return user_errors(lambda: _summarize(args), OSError, MlflowException)


def _summarize(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    data, source = load(args)
    files = write_report(data, out, source)
    status = ", ".join(f"{n} {s}" for s, n in status_counts(data.rows).items())
    print(f"{len(data.rows)} runs ({status}) from {source}")
    print(f"wrote {len(files)} files to {out}")
    for f in files:
        if f.suffix != ".png":
            print(f"  {f.name}")
    print(f"open {out / 'index.html'}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
