"""Time the ablation summary on a large synthetic MLflow store (target: 1,000 runs of 60 steps in under 30 s).

The store is a SQLite file written in bulk (``example_store``, the callback's
layout): Stage1 runs of every variant on 2 profiles x 2 model presets with seeds, plus
one Optuna-style variant whose runs vary router.eps and router.strength. Each run logs
loss, step and wall_s at every step, and the router variants gate, edge_delta and
virtual_mass as well.

Measured, each on the same store:

- ``end_to_end_s``: ``python analysis/summarize.py --tracking-uri ... --out ...`` in a fresh
  interpreter (imports, reading, route status, plots, page, writing): the target number;
- in process: reading the runs (``search_runs`` in pages of 1,000), the loss histories by
  each method of :func:`pact_ray.report.summary.fetch_curves` (``bulk``: one SQL query per 500
  runs through the SQLAlchemy store; ``threads``: ``get_metric_history`` per run, 8
  threads), and rendering the report (route status, importances, plots, page).

Usage::

    python bench/bench_summary.py --out bench/results/summary_cpu.json [--quick]
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the example store writer is a test fixture, not part of the package

from example_store import TrialSpec, log_sweep, loss_curve, router_history  # noqa: E402

from pact_ray.cli import OneLineParser  # noqa: E402
from pact_ray.report.ablation import render_report  # noqa: E402
from pact_ray.report.summary import collect, fetch_curves  # noqa: E402
from pact_ray.runs.registry import STAGE1_VARIANTS  # noqa: E402

TARGET_S = 30.0
SETTINGS = (("quick", "tiny"), ("quick", "small"), ("full", "tiny"), ("full", "small"))
TUNED_VARIANT, TUNED_RUNS = "rgb_edge", 40
T = TypeVar("T")


def bench_specs(runs: int, steps: int) -> list[TrialSpec]:
    """``runs`` Stage1 trial specs of ``steps`` steps: a grid of variants x settings x seeds, then tuned runs."""
    tuned = min(TUNED_RUNS, runs // 10)
    grid = runs - tuned
    cells = [(profile, model, variant) for profile, model in SETTINGS for variant in STAGE1_VARIANTS]
    specs = []
    for i in range(grid):
        profile, model, variant = cells[i % len(cells)]
        seed = i // len(cells)
        final = 1.0 + 0.01 * list(STAGE1_VARIANTS).index(variant) + 0.02 * ((seed * 7919) % 11) / 11
        specs.append(TrialSpec(variant, router_history(variant, loss_curve(final, steps), seed), seed, profile, model))
    for j in range(tuned):
        eps, strength = 0.01 * (1 + j % 20), 0.5 + 0.05 * (j % 7)
        specs.append(TrialSpec(TUNED_VARIANT, router_history(TUNED_VARIANT, loss_curve(1.0 + eps, steps), 0), 0, "quick", "small",
                               overrides={"router.eps": eps, "router.strength": strength}))
    return specs


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """(what ``fn()`` returns, its wall time in seconds)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def end_to_end(uri: str, out: Path) -> float:
    """Wall time of the summary CLI in a fresh interpreter."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "analysis" / "summarize.py"), "--tracking-uri", uri, "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL, cwd=out.parent)
    return time.perf_counter() - start


def run(runs: int, steps: int, workdir: Path) -> dict:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    specs = bench_specs(runs, steps)
    _, build_s = timed(lambda: log_sweep(uri, specs, sweep="bench", bulk=True))
    e2e_s = end_to_end(uri, workdir / "summary")
    data, rows_s = timed(lambda: collect(uri, curves=False))
    ids = {r["run_id"]: r["mlflow_run_id"] for r in data.rows}
    curves_bulk, bulk_s = timed(lambda: fetch_curves(uri, ids, method="bulk"))
    curves_threads, threads_s = timed(lambda: fetch_curves(uri, ids, method="threads"))
    if curves_bulk != curves_threads:
        raise RuntimeError("the bulk and threaded history readers disagree")
    data.curves = curves_bulk
    files, render_s = timed(lambda: render_report(data, uri))
    return {
        "runs": len(data.rows), "steps": steps, "metric_rows": sum(len(s.history) + 2 for s in specs) * steps,
        "build_store_s": build_s, "end_to_end_s": e2e_s,
        "in_process": {"read_runs_s": rows_s, "histories_bulk_s": bulk_s, "histories_threads_s": threads_s,
                       "render_report_s": render_s, "files": len(files)},
        "target_s": TARGET_S, "meets_target": e2e_s < TARGET_S,
    }


def machine_info() -> dict:
    import matplotlib
    import mlflow

    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "mlflow": mlflow.__version__, "matplotlib": matplotlib.__version__}


def write_json(path: Path, payload: dict) -> None:
    """Write atomically: a temporary file beside ``path``, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "summary_cpu.json", help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="100 runs of 60 steps instead of 1,000")
    args = parser.parse_args(argv)
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a folder; name the JSON file")
    with tempfile.TemporaryDirectory(prefix="bench_summary_") as tmp:
        result = run(100 if args.quick else 1000, 60, Path(tmp))
    write_json(args.out, {"machine": machine_info(), "quick": args.quick, "result": result})
    r, ip = result, result["in_process"]
    print(f"{r['runs']} runs x {r['steps']} steps ({r['metric_rows']} metric rows): summary CLI end to end {r['end_to_end_s']:.1f} s "
          f"(target {TARGET_S:.0f} s: {'met' if r['meets_target'] else 'MISSED'}); store built in {r['build_store_s']:.1f} s")
    print(f"in process: read runs {ip['read_runs_s']:.2f} s, histories bulk {ip['histories_bulk_s']:.2f} s / "
          f"threads {ip['histories_threads_s']:.2f} s, render {ip['render_report_s']:.2f} s")
    print(f"wrote {args.out}")
    return 0 if r["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
