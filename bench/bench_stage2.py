"""Stage2 training step time per preset, and the spatial adapter's overhead over the baseline.

    python bench/bench_stage2.py --out bench/results/stage2_cpu.json [--quick] [--device cuda]

For each runnable preset (tiny and small on a CPU; pact too on a GPU) a baseline and a
spatial_adapter trainer are built with the same seed on the preset's synthetic data, and
their optimiser steps are timed interleaved (baseline, adapter, baseline, ...) on the
same sequence of batches; the first pair warms up. Reported: the median step time of
each, their ratio (adapter / baseline), parameter counts and batch sizes. The pact preset
is built on the meta device on a CPU: only its parameter count is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pact_ray.models.stage2 import build_stage2
from pact_ray.runs.stage2 import Stage2RunConfig
from pact_ray.training.base import count_parameters
from pact_ray.training.stage2 import Stage2Trainer, token_cap

VARIANTS = ("baseline", "spatial_adapter")


def bench_preset(preset: str, repeats: int, device: torch.device, precision: str) -> dict:
    trainers = {v: Stage2Trainer(Stage2RunConfig.for_variant(v, "quick", preset, precision=precision, steps=repeats + 1), device=device)
                for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(repeats + 1):
        for v, trainer in trainers.items():
            step = trainer.train_step()["step_time_s"]
            if i > 0:  # the first pair warms up
                times[v].append(step)
    med = {v: statistics.median(t) for v, t in times.items()}
    batch = trainers["baseline"].batch(0)
    row = dict(
        preset=preset, repeats=repeats, batch_size=trainers["baseline"].cfg.batch_size,
        rows=int(batch["num_rows"].sum()), parts=int(batch["num_parts"].sum()), max_tokens=token_cap(trainers["baseline"].cfg),
        params=count_parameters(trainers["baseline"].model),
        adapter_params=count_parameters(trainers["spatial_adapter"].model) - count_parameters(trainers["baseline"].model),
        baseline_ms=med["baseline"] * 1e3, adapter_ms=med["spatial_adapter"] * 1e3,
        ratio=med["spatial_adapter"] / med["baseline"],
    )
    print(f"{preset:6s} baseline {row['baseline_ms']:8.1f} ms  adapter {row['adapter_ms']:8.1f} ms  ratio {row['ratio']:.3f}"
          f"  ({row['params'] / 1e6:.2f}M params)", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/stage2_cpu.json")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="3 repeats (a smoke run)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    t0 = time.perf_counter()
    presets = ["tiny", "small"] + (["pact"] if device.type == "cuda" else [])
    rows = [bench_preset(preset, repeats, device, args.precision) for preset in presets]
    result = {
        "benchmark": "stage2", "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "precision": args.precision,
        "rows": rows, "max_ratio": max(r["ratio"] for r in rows), "wall_s": time.perf_counter() - t0,
    }
    if device.type != "cuda":
        with torch.device("meta"):
            pact = build_stage2("pact")
        result["pact_params"] = count_parameters(pact)
        print(f"pact   {result['pact_params'] / 1e6:.1f}M params (built on the meta device)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"max_ratio": result["max_ratio"], "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
