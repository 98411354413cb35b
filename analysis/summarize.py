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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlflow.exceptions import MlflowException  # noqa: E402

from pact_ray.report import collect_results, write_report  # noqa: E402
from pact_ray.report.build import status_counts  # noqa: E402
from pact_ray.summary import SummaryData, collect  # noqa: E402
from pact_ray.sweep import EXIT_USAGE, OneLineParser  # noqa: E402
from pact_ray.tracking.store import check_tracking_uri, default_tracking_uri, sqlite_path  # noqa: E402


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
    out = Path(args.out).resolve()
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        data, source = load(args)
        files = write_report(data, out, source)
    except (ValueError, OSError, MlflowException) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return EXIT_USAGE
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
