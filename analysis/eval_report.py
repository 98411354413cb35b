"""The evaluation report of one world-model run, as HTML and Markdown with PNG figures.

    .venv/bin/python analysis/eval_report.py --run RUN_ID --out reports/run1
    .venv/bin/python analysis/eval_report.py --run runs/wm/mae_s0_abc/checkpoint_000001 --compare OTHER_RUN_ID --out reports/x
    .venv/bin/python analysis/eval_report.py --run best.pt --notes notes.txt --data /data/so100-pan --out reports/real

RUN_ID_OR_CHECKPOINT: an MLflow run id of a world-model trial (its exported ``checkpoint``
artifact, else the checkpoint folder the run recorded, else its Ray trial folder under --storage-path), a trial checkpoint folder, or a
checkpoint file. A report of a run id is also logged as that run's ``eval_report/`` artifacts.
Bad input ends in one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pact_ray.cli import OneLineParser, user_errors


def build_parser() -> OneLineParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, metavar="RUN_ID_OR_CHECKPOINT", help="MLflow run id, trial checkpoint folder or checkpoint file")
    p.add_argument("--out", required=True, help="folder for report.html, report.md, metrics.json and images/")
    p.add_argument("--compare", default=None, metavar="RUN", help="a previous run (run id or checkpoint), evaluated on the same samples")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///$PWD/mlflow.db)")
    p.add_argument("--storage-path", default=None,
                   help="where to look for the run's trial folder when the run did not record its checkpoint (default: ./runs)")
    p.add_argument("--notes", default=None, help="a text file with the analysis notes (default: the run's MLflow note)")
    p.add_argument("--data", default=None, help="evaluate on this LeRobot-style folder's validation split instead of the run's data")
    p.add_argument("--samples", type=int, default=4, help="samples with counterfactual grids, heatmaps and joint tables")
    p.add_argument("--max-samples", type=int, default=None,
                   help="validation samples scored (0: all; default: the ones the run scored while training, so the numbers match)")
    p.add_argument("--no-log", action="store_true", help="do not log the report as artifacts of the run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stderr for errors
    return user_errors(lambda: _run(args))  # ReportError, CheckpointError, DataError, ConfigError, TrackingError

def _run(args) -> int:
    from pact_ray.report.world_model import ReportError, build_report, log_report, read_notes, resolve_checkpoint
    from pact_ray.tracking.store import default_tracking_uri

    if args.samples < 0 or (args.max_samples is not None and args.max_samples < 0):
        raise ReportError("--samples and --max-samples must be >= 0")
    uri = args.tracking_uri or default_tracking_uri()
    storage = Path(args.storage_path).resolve() if args.storage_path else Path.cwd().resolve() / "runs"
    source = resolve_checkpoint(args.run, uri, storage)
    compare = resolve_checkpoint(args.compare, uri, storage) if args.compare else None
    notes = read_notes(source, args.notes)
    content = build_report(source, args.out, notes=notes, data_folder=args.data, compare=compare,
                           samples=args.samples, max_samples=args.max_samples)
    out = Path(args.out).resolve()
    if source.run_id and not args.no_log:
        log_report(uri, source.run_id, out)
    print(f"Report of {content.run_name} ({content.model_type}, {content.val_samples} validation samples): {out / 'report.html'}")
    print(f"Markdown: {out / 'report.md'}")
    if source.run_id and not args.no_log:
        print(f"Logged as artifacts of run {source.run_id} under eval_report/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
