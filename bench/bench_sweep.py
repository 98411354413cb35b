"""Sweep-level benchmarks, each measured side by side in one run:

1. the quick matrix (8 variants, small preset) as a user runs it: the sweep command
   (``python sweeps/stage1_router.py``: Python start, Ray start, two trials at a time with 1
   CPU each, MLflow, the summary and dashboard) against a command that trains the same trials
   one after another in one process, one torch thread (the same trainer, validation included;
   no tracking, no checkpoints). The two commands alternate, ``--repeats`` times each, and
   the ratio of the medians is reported. Targets (issue #16): whole command <= 0.75x; the
   trial phase (first trial start to last trial end, from MLflow's own timestamps) <= 0.6x the
   sequential command's training loop. The limit is 0.5 on 2 cores.
2. MLflow logging overhead per step: a small trial's steps with every step's metrics sent
   to the MLflow writer (SQLite store, flushed before the clock stops) vs the same steps
   without tracking: target <= 5 % of the trial's wall time.

    .venv/bin/python bench/bench_sweep.py --out bench/results/sweep_cpu.json [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pact_ray.runs.registry import STAGE1_VARIANTS
from pact_ray.runs.stage1 import Stage1RunConfig
from pact_ray.training.stage1 import Stage1Trainer, dataset_for

ROOT = Path(__file__).resolve().parents[1]


def sequential_command(model: str, profile: str) -> None:
    """The sequential side, run as its own command (``--sequential``): prints the seconds of
    its training loop (the whole command is timed by the caller)."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for variant in STAGE1_VARIANTS:
        cfg = Stage1RunConfig.for_variant(variant, profile, model, 0)
        trainer = Stage1Trainer(cfg)
        while trainer.step < cfg.steps:
            trainer.train_step()
    print(json.dumps({"loop_s": time.perf_counter() - t0}))


def run_sequential(model: str, profile: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--sequential", "--model", model, "--profile", profile],
                         capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, json.loads(out.stdout.strip().splitlines()[-1])["loop_s"]


def trial_phase(workdir: Path) -> float:
    """Seconds from the first trial run's start to the last one's end, from MLflow's own timestamps."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pact-ray/stage1_router")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`pact_ray.role` = 'trial'")
    return (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000.0


def run_sweep_command(model: str, profile: str, workdir: Path) -> tuple[float, float]:
    """The sweep command on the matrix's trials (seed 0, as the sequential side)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "sweeps" / "stage1_router.py"), "--model", model, "--profile", profile,
                    "--seeds", "0", "--name", "bench", "--quiet", "--storage-path", str(workdir / "runs"),
                    "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--cpus-per-trial", "1"],
                   capture_output=True, text=True, check=True, env=env)
    return time.perf_counter() - t0, trial_phase(workdir)


def logging_overhead(model: str, steps: int, repeats: int, workdir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from pact_ray.tracking.writer import MlflowWriter, RunRef

    torch.set_num_threads(1)
    uri = f"sqlite:///{workdir / 'overhead.db'}"
    exp = MlflowClient(uri).create_experiment("bench-overhead")
    cfg = Stage1RunConfig.for_variant("rgb_edge", "quick", model, 0, steps=steps)
    dataset = dataset_for(cfg)
    plain, tracked = [], []
    for r in range(repeats + 1):
        for mode in ("plain", "tracked"):
            trainer = Stage1Trainer(cfg, dataset=dataset)
            writer = MlflowWriter(uri) if mode == "tracked" else None
            ref = writer.run(RunRef(exp, f"r{r}", {"pact_ray.trial_id": f"{mode}{r}"}, params=cfg.flat())) if writer else None
            t0 = time.perf_counter()
            while trainer.step < cfg.steps:
                m = trainer.train_step()
                if writer:
                    writer.log_metrics(ref, trainer.step, m)
            if writer:
                writer.close()
            dt = time.perf_counter() - t0
            if r > 0:
                (plain if mode == "plain" else tracked).append(dt)
    p, t = statistics.median(plain), statistics.median(tracked)
    return {"steps": steps, "repeats": repeats, "plain_s": p, "tracked_s": t, "overhead_fraction": (t - p) / p,
            "target": 0.05, "target_met": (t - p) / p <= 0.05}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/sweep_cpu.json")
    ap.add_argument("--model", default="small")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny preset, smoke profile, one repeat (a check that it runs)")
    ap.add_argument("--sequential", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    model, profile = ("tiny", "smoke") if args.quick else (args.model, args.profile)
    if args.sequential:
        sequential_command(model, profile)
        return 0
    repeats = 1 if args.quick else args.repeats
    dataset_for(Stage1RunConfig.for_variant("baseline", profile, model, 0))  # generate the data before timing
    seq, loop, sweep, phase = [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        for r in range(repeats):  # interleaved: sequential, sweep, sequential, sweep, ...
            whole, inner = run_sequential(model, profile)
            seq.append(whole)
            loop.append(inner)
            work = Path(d) / f"r{r}"
            work.mkdir()
            whole, trials = run_sweep_command(model, profile, work)
            sweep.append(whole)
            phase.append(trials)
            print(f"repeat {r}: sequential {seq[-1]:.1f} s (loop {loop[-1]:.1f} s), sweep {sweep[-1]:.1f} s "
                  f"(trial phase {phase[-1]:.1f} s)", flush=True)
        overhead = logging_overhead(model, 4 if args.quick else 16, 1 if args.quick else 3, Path(d))
    med = statistics.median
    ratio, ratio_phase = med(sweep) / med(seq), med(phase) / med(loop)
    result = {
        "benchmark": "sweep", "model": model, "profile": profile, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "matrix": {"trials": len(STAGE1_VARIANTS), "repeats": repeats,
                   "sequential_command_s": seq, "sequential_loop_s": loop, "sweep_command_s": sweep, "trial_phase_s": phase,
                   "ratio": ratio, "ratio_trial_phase": ratio_phase,
                   "target": 0.75, "target_trial_phase": 0.6,
                   "target_met": ratio <= 0.75, "target_trial_phase_met": ratio_phase <= 0.6,
                   "note": "Both sides are commands started by this benchmark, alternating; ratios of medians. The sweep: "
                           "sweeps/stage1_router.py with a local Ray it starts (2 CPUs, 1 per trial), SQLite MLflow, summary and "
                           "dashboard. Sequential: the same trials one after another in one process, one torch thread. Trial "
                           "phase: first trial start to last trial end (MLflow), against the sequential command's training loop."},
        "mlflow_logging": overhead,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
