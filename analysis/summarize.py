"""Write the ablation summary and its report from an MLflow store or from Ray's result folders.

    .venv/bin/python analysis/summarize.py --tracking-uri sqlite:///$PWD/mlflow.db --experiment pact-ray/stage1_router --out summary/
    .venv/bin/python analysis/summarize.py --results /abs/runs --out summary/

The output folder gets ablation_summary.csv / .json (one row per run), route_status.json,
the plots (PNG) and index.html, a static page that opens from disk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pact_ray.cli import OneLineParser, user_errors

# MLflow, the report (matplotlib) and the verdicts (scipy) are imported once the flags are
# parsed: `--help` and a bad flag answer in a tenth of a second instead of five.
if TYPE_CHECKING:
    from pact_ray.report.summary import SummaryData
    from pact_ray.verdicts import Design


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///$PWD/mlflow.db)")
    src.add_argument("--results", default=None, metavar="DIR",
                     help="read Ray's result folders instead: a sweep's folder or the storage path holding sweeps")
    p.add_argument("--experiment", action="append", default=None,
                   help="MLflow experiment name (repeatable; default: every pact-ray/* experiment)")
    p.add_argument("--out", default="summary", help="output folder")
    p.add_argument("--metric", default=None, help="the validation metric the verdicts compare on (default: each kind's primary)")
    p.add_argument("--margin", default="1%", help="the margin of practical difference: relative (1%%) or absolute (0.005)")
    p.add_argument("--until-conclusive", type=int, default=None, metavar="MAX_SEEDS",
                   help="the runs come from an adaptive sweep with this MAX_SEEDS: verdicts spend alpha over its looks "
                        "(default: read from the sweeps' parent runs in MLflow; 0 for a fixed design)")
    return p


def design_for(args: argparse.Namespace, data: SummaryData, uri: str | None) -> Design:
    """The verdicts' design: the flags, and for MLflow sources the largest --until-conclusive of
    the sweeps the runs come from (an adaptive sweep's verdicts must spend alpha over its looks;
    assuming 2 as the first look only makes them more conservative)."""
    from mlflow.tracking import MlflowClient

    from pact_ray.report.summary import search_all
    from pact_ray.tracking.tags import ROLE_TAG
    from pact_ray.verdicts import Design, Margin

    margin = Margin.parse(args.margin)
    max_seeds = args.until_conclusive
    if max_seeds is None and uri is not None:
        client = MlflowClient(uri)
        experiments = [e for name in {r["experiment"] for r in data.rows} if (e := client.get_experiment_by_name(name))]
        parents = search_all(client, [e.experiment_id for e in experiments], f"tags.`{ROLE_TAG}` = 'sweep'") if experiments else []
        max_seeds = max((int(p.data.params.get("until_conclusive") or 0) for p in parents), default=0)
    if max_seeds is not None and max_seeds < 0:
        raise ValueError(f"--until-conclusive must be >= 0, got {max_seeds}")
    return Design(margin=margin, max_seeds=max_seeds or None, first_look=2)


def load(args: argparse.Namespace) -> tuple[SummaryData, str]:
    """The summary data and a description of where it came from."""
    from pact_ray.report.ablation import collect_results
    from pact_ray.report.summary import collect
    from pact_ray.tracking.store import check_tracking_uri, default_tracking_uri, sqlite_path

    if args.results:
        if args.experiment:
            raise ValueError("--experiment selects MLflow experiments; it does not apply to --results")
        path = Path(args.results).resolve()
        return collect_results(path, [args.metric] if args.metric else ()), str(path)
    uri = check_tracking_uri(args.tracking_uri or default_tracking_uri())
    if uri.startswith("sqlite:///") and not sqlite_path(uri).is_file():
        raise ValueError(f"tracking store {uri} does not exist (pass --tracking-uri, or --results for Ray's result folders)")
    data = collect(uri, args.experiment, metrics=[args.metric] if args.metric else ())
    return data, uri


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mlflow.exceptions import MlflowException

    return user_errors(lambda: _summarize(args), OSError, MlflowException)


def _summarize(args: argparse.Namespace) -> int:
    from pact_ray.report.ablation import write_report
    from pact_ray.report.ablation.build import status_counts
    from pact_ray.report.ablation.route import route_status

    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    data, source = load(args)
    design = design_for(args, data, None if args.results else source)
    metrics = {kind: args.metric for kind in {r["kind"] for r in data.rows}} if args.metric else None
    files = write_report(data, out, source, entries=route_status(data, design, metrics))
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
