"""World-model throughput: training samples per second per preset, and evaluation time per
100 validation samples (every metric, counterfactuals under all three actions included).

    python bench/bench_world_model.py --out bench/results/world_model_cpu.json [--quick] [--device cuda]

Training runs the trainer's real step (seeded batch, masking, AdamW, clipping) on the
synthetic arm data (64 x 64 frames, 2 context frames); the median step time over
``--steps`` steps after two warm-up steps gives samples/s. Evaluation predicts 100
validation samples under every action (the GPT free-running, plus teacher-forced) and
computes the metrics. ``--quick`` measures the tiny and small presets only, with fewer steps.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pact_ray.metrics.world_model import compute_metrics, evaluate_model
from pact_ray.models.world_model import PRESET_NAMES
from pact_ray.runs.world_model import WorldModelRunConfig
from pact_ray.training.base import count_parameters
from pact_ray.training.validation import eval_sample_ids
from pact_ray.training.world_model import WorldModelTrainer, dataset_for

EVAL_SAMPLES = 100


def bench_case(model_type: str, preset: str, data, device: torch.device, batch_size: int, steps: int) -> dict:
    cfg = WorldModelRunConfig.for_variant(model_type, "quick", preset, 0, batch_size=batch_size, steps=steps + 2)
    trainer = WorldModelTrainer(cfg, device=device, data=data)
    times = []
    for _ in range(steps + 2):
        times.append(trainer.train_step()["step_time_s"])
    step_s = statistics.median(times[2:])
    ids = eval_sample_ids(len(data.val), EVAL_SAMPLES)
    t0 = time.perf_counter()
    ev = evaluate_model(trainer.model, data.val, ids, device)
    compute_metrics(ev, data.strip)
    eval_s = time.perf_counter() - t0
    return {
        "model_type": model_type, "preset": preset, "params": count_parameters(trainer.model),
        "train_step_s": step_s, "train_samples_per_s": batch_size / step_s,
        "eval_s_per_100_samples": eval_s * 100 / len(ids), "eval_samples": len(ids),
    }


def main(argv: list[str] | None = None) -> int:
    from pact_ray.cli import OneLineParser

    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/world_model_cpu.json")
    p.add_argument("--quick", action="store_true", help="tiny and small presets, 3 timed steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one per Ray trial in a sweep)")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    presets = PRESET_NAMES[:2] if args.quick else PRESET_NAMES
    steps = 3 if args.quick else 10
    data = dataset_for(WorldModelRunConfig.for_variant("mae", "quick", "tiny"))  # 24 episodes x 24 frames; 132 validation samples
    results = []
    for preset in presets:
        for model_type in ("mae", "gpt"):
            r = bench_case(model_type, preset, data, device, args.batch_size, steps)
            print(f"{model_type:4s} {preset:6s} {r['params'] / 1e6:6.2f}M params  train {r['train_samples_per_s']:8.1f} samples/s  "
                  f"eval {r['eval_s_per_100_samples']:6.2f} s / 100 samples", flush=True)
            results.append(r)
    record = {
        "benchmark": "world_model", "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "batch_size": args.batch_size,
        "image_size": 64, "context_frames": 2, "timed_steps": steps, "quick": args.quick, "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
