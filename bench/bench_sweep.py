"""Sweep-level benchmarks, each measured side by side in one run:

1. the quick matrix (8 variants, small preset) through Ray on 2 CPUs (2 trials at once, 1
   CPU each) vs the same trials one after another in one process (1 torch thread, as each
   trial has): target wall-time ratio <= 0.75 (the limit is 0.5 on 2 cores);
2. MLflow logging overhead per step: a small trial's steps with every step's metrics sent
   to the MLflow writer (SQLite store, flushed before the clock stops) vs the same steps
   without tracking: target <= 5 % of the trial's wall time.

    python bench/bench_sweep.py --out bench/results/sweep_cpu.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pact_ray.runs.registry import STAGE1_VARIANTS
from pact_ray.runs.stage1 import Stage1RunConfig
from pact_ray.training.stage1 import Stage1Trainer, dataset_for
from pact_ray.tune.sweep import run_sweep


def sequential(model: str, profile: str, threads: int) -> float:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    for variant in STAGE1_VARIANTS:
        cfg = Stage1RunConfig.for_variant(variant, profile, model, 0)
        trainer = Stage1Trainer(cfg)
        while trainer.step < cfg.steps:
            trainer.train_step()
    return time.perf_counter() - t0


def trial_phase(workdir: Path) -> float:
    """Seconds from the first trial run's start to the last one's end, from MLflow's own timestamps."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pact-ray/stage1_router")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`pact_ray.role` = 'trial'")
    return (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000.0


def through_ray(model: str, profile: str, workdir: Path, tag: str) -> float:
    t0 = time.perf_counter()
    rc = run_sweep("stage1", ["--model", model, "--profile", profile, "--name", f"bench-{tag}", "--quiet",
                              "--storage-path", str(workdir / "runs"), "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                              "--cpus-per-trial", "1"])
    if rc != 0:
        raise RuntimeError("the benchmark sweep failed")
    return time.perf_counter() - t0


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
    ap.add_argument("--quick", action="store_true", help="tiny preset, smoke profile (a check that it runs)")
    args = ap.parse_args(argv)
    model, profile = ("tiny", "smoke") if args.quick else (args.model, args.profile)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        dataset_for(Stage1RunConfig.for_variant("baseline", profile, model, 0))  # generate the data before timing
        seq = sequential(model, profile, threads=1)
        from pact_ray.tune.sweep import init_ray

        t0 = time.perf_counter()
        init_ray(None)  # a running cluster (--address) has no start-up cost
        init_s = time.perf_counter() - t0
        ray_s = through_ray(model, profile, work, "a")
        phase_s = trial_phase(work)
        overhead = logging_overhead(model, 4 if args.quick else 16, 1 if args.quick else 3, work)
    result = {
        "benchmark": "sweep", "model": model, "profile": profile, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "matrix": {"trials": len(STAGE1_VARIANTS), "sequential_one_process_s": seq, "ray_init_s": init_s,
                   "ray_2cpu_s": ray_s, "ratio": ray_s / seq, "ratio_with_ray_init": (ray_s + init_s) / seq,
                   "trial_phase_s": phase_s, "ratio_trial_phase": phase_s / seq,
                   "target": 0.75, "target_met": ray_s / seq <= 0.75,
                   "note": "Ray time: the sweep command on a started Ray instance (worker start, MLflow, summary and "
                           "dashboard included); ratio_with_ray_init adds starting Ray; ratio_trial_phase counts the trials alone "
                           "(first trial start to last trial end, from MLflow). Sequential: one process, one thread."},
        "mlflow_logging": overhead,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
