"""Write the ablation summary (ablation_summary.csv / .json) from an MLflow store.

    python analysis/summarize.py --tracking-uri sqlite:///$PWD/mlflow.db --experiment pact-ray/stage1_router --out summary/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pact_ray.summary import collect_rows, write_summary  # noqa: E402
from pact_ray.sweep import OneLineParser  # noqa: E402
from pact_ray.tracking.store import check_tracking_uri, default_tracking_uri  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite:///$PWD/mlflow.db)")
    p.add_argument("--experiment", action="append", default=None, help="experiment name (repeatable; default: every pact-ray/* experiment)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    try:
        uri = check_tracking_uri(args.tracking_uri or default_tracking_uri())
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            raise ValueError(f"tracking store {uri} does not exist")
        rows = collect_rows(uri, args.experiment)
        files = write_summary(rows, Path(args.out).resolve())
    except (ValueError, OSError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"{len(rows)} runs ({sum(r['status'] == 'finished' for r in rows)} finished, "
          f"{sum(r['status'] == 'errored' for r in rows)} errored, {sum(r['status'] == 'running' for r in rows)} running)")
    for f in files:
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
