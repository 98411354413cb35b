"""Stage2 benchmarks: the PAct Stage2 (sparse IO blocks) against the padded-set Stage2 it
replaced, the sparse convolution against a dense conv3d, and the spatial adapter's overhead.

    python bench/bench_stage2.py --out bench/results/stage2_cpu.json [--quick] [--device cuda]

1. ``vs_legacy``: optimiser steps of the Stage2 trainer on the ``small`` preset, today's
   model against the one of commit ``--legacy-commit`` (the padded-set Stage2 without
   sparse convolutions: a 32^3 grid, at most 48 voxels per row). The old package is
   exported from git history (``git archive``) into a temporary folder and trains in a
   worker process of its own (nothing of it is kept in the tree). Each side trains on its own preset's synthetic data, the steps
   interleaved (old, new, old, ...), the first pair a warm-up; a step is one
   ``Trainer.train_step``: batch collation, forward, loss, backward, AdamW.
2. ``conv``: one submanifold convolution (forward, and forward + backward) on the voxels of
   real batches against the dense equivalent (scatter into a zero grid per row, ``conv3d``
   with padding 1, read back at the voxels), interleaved; plus the rulebook's build time.
3. ``adapter``: spatial_adapter / baseline step time per preset (as before).

Reported: per side the median of the repeats (training steps, whose batches differ) or the
minimum (the convolutions, which repeat the same work), and each ratio as the median over
rounds of the two sides' times in that round (measured back to back in one run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pact_ray.data.objects.loader import ArticulatedDataset, collate_voxels
from pact_ray.data.objects.synthetic import ensure_synthetic
from pact_ray.common.presets import CONDITION_PRESETS, STAGE1_PRESETS
from pact_ray.models.sparse import SparseLevel, SubMConv3d, downsample
from pact_ray.models.stage2 import build_stage2
from pact_ray.runs.stage2 import Stage2RunConfig
from pact_ray.training.base import count_parameters
from pact_ray.training.stage2 import Stage2Trainer

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = ("baseline", "spatial_adapter")
# The old Stage2 trains in a process of its own on the package tree of its commit (the old
# trainer needs the old config, flow and base modules too, which today's layout has moved):
# the worker builds it, reports its sizes, then takes one optimiser step per line it reads.
LEGACY_WORKER = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
import pact_ray
assert pact_ray.__file__.startswith(sys.argv[3]), pact_ray.__file__
from pact_ray.config import Stage2RunConfig
from pact_ray.presets import STAGE2_PRESETS
from pact_ray.training.base import count_parameters
from pact_ray.training.stage2 import Stage2Trainer
trainer = Stage2Trainer(Stage2RunConfig.for_variant(variant="baseline", profile="quick", model="small", steps=int(sys.argv[2])))
batch = trainer.batch(0)
print(json.dumps({"params": count_parameters(trainer.model), "tokens": int(batch["valid"].sum()),
                  "grid": int(STAGE2_PRESETS["small"]["resolution"])}), flush=True)
for _ in sys.stdin:
    t0 = time.perf_counter()
    trainer.train_step()
    print(time.perf_counter() - t0, flush=True)
"""


class LegacyStage2:
    """The Stage2 trainer of ``commit`` (its ``pact_ray`` tree exported with ``git archive``)
    in a worker process; :meth:`step` times one of its optimiser steps."""

    def __init__(self, commit: str, steps: int, tmp: Path):
        tree = tmp / "legacy"
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "pact_ray"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.proc = subprocess.Popen([sys.executable, "-c", LEGACY_WORKER, str(torch.get_num_threads()), str(steps), str(tree)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the Stage2 of {commit} did not start (its worker exited with {self.proc.wait()})")
        self.info = json.loads(line)

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def interleaved(steps: dict[str, callable], repeats: int) -> dict[str, list[float]]:
    """Seconds of each callable in each of ``repeats`` rounds (one call of each per round, in
    turn); a first round warms up and is dropped."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(repeats + 1):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i > 0:
                times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """The median over rounds of num / den: the two sides of a round ran back to back, so
    the ratio holds even while other processes slow the machine down for a while."""
    return statistics.median(n / d for n, d in zip(num, den))


def bench_vs_legacy(commit: str, repeats: int, device: torch.device) -> dict:
    import tempfile

    cfg = dict(variant="baseline", profile="quick", model="small", steps=repeats + 1)
    trainer = Stage2Trainer(Stage2RunConfig.for_variant(**cfg), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        legacy = LegacyStage2(commit, repeats + 1, Path(tmp))
        times: dict[str, list[float]] = {"legacy": [], "pact": []}
        try:
            for i in range(repeats + 1):  # interleaved, the first round a warm-up
                old = legacy.step()
                t0 = time.perf_counter()
                trainer.train_step()
                new = time.perf_counter() - t0
                if i > 0:
                    times["legacy"].append(old)
                    times["pact"].append(new)
        finally:
            legacy.close()
    new_b = trainer.batch(0)
    layout = trainer.model.layout(new_b["coords"], new_b["num_rows"])
    row = dict(
        preset="small", legacy_commit=commit, repeats=repeats,
        legacy_ms=statistics.median(times["legacy"]) * 1e3, pact_ms=statistics.median(times["pact"]) * 1e3,
        ratio=paired_ratio(times["pact"], times["legacy"]),
        legacy_params=legacy.info["params"], pact_params=count_parameters(trainer.model),
        legacy_tokens=legacy.info["tokens"], legacy_grid=legacy.info["grid"],
        pact_voxels=layout.levels[0].size, pact_tokens=layout.top.size, pact_grid=trainer.model.flow.resolution,
    )
    print(f"small  legacy {row['legacy_ms']:8.1f} ms ({row['legacy_tokens']} tokens)   pact {row['pact_ms']:8.1f} ms "
          f"({row['pact_voxels']} voxels, {row['pact_tokens']} tokens)   ratio {row['ratio']:.2f}", flush=True)
    return row


def dense_conv(feats: torch.Tensor, coords: torch.Tensor, conv: SubMConv3d, grid: int) -> torch.Tensor:
    """The dense equivalent of a submanifold convolution: per row a zero grid, conv3d, read back."""
    rows = int(coords[:, 0].max()) + 1
    dense = feats.new_zeros(rows, feats.shape[1], grid, grid, grid)
    dense[coords[:, 0], :, coords[:, 1], coords[:, 2], coords[:, 3]] = feats
    out = F.conv3d(dense, conv.weight.permute(0, 4, 1, 2, 3), conv.bias, padding=1)
    return out[coords[:, 0], :, coords[:, 1], coords[:, 2], coords[:, 3]]


def bench_conv(name: str, coords: torch.Tensor, grid: int, c_in: int, c_out: int, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    coords = coords.to(device)
    conv = SubMConv3d(c_in, c_out).to(device)
    feats = torch.randn(len(coords), c_in, device=device, requires_grad=True)
    level = SparseLevel.build(coords)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(fn, backward):
        def step():
            out = fn()
            if backward:
                out.square().mean().backward()
            sync()
        return step

    sparse = lambda: conv(feats, level)  # noqa: E731
    dense = lambda: dense_conv(feats, coords, conv, grid)  # noqa: E731
    fwd = interleaved({"sparse": run(sparse, False), "dense": run(dense, False)}, repeats)
    both = interleaved({"sparse": run(sparse, True), "dense": run(dense, True)}, repeats)
    build = min(interleaved({"rulebook": lambda: SparseLevel.build(coords)}, repeats)["rulebook"])
    row = dict(case=name, voxels=len(coords), rows=int(coords[:, 0].max()) + 1, grid=grid, c_in=c_in, c_out=c_out,
               occupancy=len(coords) / ((int(coords[:, 0].max()) + 1) * grid**3), neighbours=level.active_pairs() / len(coords),
               sparse_fwd_ms=min(fwd["sparse"]) * 1e3, dense_fwd_ms=min(fwd["dense"]) * 1e3,
               speedup_fwd=paired_ratio(fwd["dense"], fwd["sparse"]),
               sparse_fwd_bwd_ms=min(both["sparse"]) * 1e3, dense_fwd_bwd_ms=min(both["dense"]) * 1e3,
               speedup_fwd_bwd=paired_ratio(both["dense"], both["sparse"]), rulebook_ms=build * 1e3)
    print(f"conv   {name:24s} {c_in:4d}->{c_out:<4d} sparse {row['sparse_fwd_bwd_ms']:8.2f} ms  dense {row['dense_fwd_bwd_ms']:8.2f} ms"
          f"  speed-up {row['speedup_fwd_bwd']:.1f}x (fwd {row['speedup_fwd']:.1f}x), rulebook {row['rulebook_ms']:.2f} ms", flush=True)
    return row


def conv_cases(repeats: int, device: torch.device) -> list[dict]:
    """The small preset's convolutions, on the voxels of its training batch: the input
    block's at the voxel level (32 -> 32), the first output block's (2 x 192 -> 32), and the
    downsampling block's at the cell level (32 -> 192); and the input block's on the same
    kind of objects voxelised at 32^3 (the sparser the grid, the more the dense conv wastes)."""
    trainer = Stage2Trainer(Stage2RunConfig.for_variant("baseline", "quick", "small"), device=torch.device("cpu"))
    coords = trainer.batch(0)["coords"]
    grid = trainer.model.flow.resolution
    cells, _ = downsample(coords)
    width = trainer.model.flow.model_channels
    cond = CONDITION_PRESETS["tiny"]
    fine = ArticulatedDataset(ensure_synthetic(2, 0, resolution=STAGE1_PRESETS["tiny"]["resolution"], image_size=cond["image_size"],
                                               grid=cond["grid"], cond_channels=64, prefix_tokens=cond["prefix_tokens"],
                                               voxel_resolution=2 * grid))
    fine_coords = collate_voxels([fine[0], fine[1]])["coords"]
    return [
        bench_conv("small voxels", coords, grid, 32, 32, repeats, device),
        bench_conv("small voxels (skip)", coords, grid, 2 * width, 32, repeats, device),
        bench_conv("small cells", cells, grid // 2, 32, width, repeats, device),
        bench_conv(f"voxels at {2 * grid}^3", fine_coords, 2 * grid, 32, 32, repeats, device),
    ]


def bench_adapter(preset: str, repeats: int, device: torch.device, precision: str) -> dict:
    trainers = {v: Stage2Trainer(Stage2RunConfig.for_variant(v, "quick", preset, precision=precision, steps=repeats + 1), device=device)
                for v in VARIANTS}
    times = interleaved({v: t.train_step for v, t in trainers.items()}, repeats)
    batch = trainers["baseline"].batch(0)
    row = dict(
        preset=preset, repeats=repeats, batch_size=trainers["baseline"].cfg.batch_size,
        rows=int(batch["num_rows"].sum()), parts=int(batch["num_parts"].sum()), voxels=int(batch["coords"].shape[0]),
        params=count_parameters(trainers["baseline"].model),
        adapter_params=count_parameters(trainers["spatial_adapter"].model) - count_parameters(trainers["baseline"].model),
        baseline_ms=statistics.median(times["baseline"]) * 1e3, adapter_ms=statistics.median(times["spatial_adapter"]) * 1e3,
        ratio=paired_ratio(times["spatial_adapter"], times["baseline"]),
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
    p.add_argument("--legacy-commit", default="a0f37d3", help="the commit of the padded-set Stage2 to compare with")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    t0 = time.perf_counter()
    result = {
        "benchmark": "stage2", "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "precision": args.precision,
    }
    result["vs_legacy"] = bench_vs_legacy(args.legacy_commit, repeats, device)
    result["conv"] = conv_cases(repeats, device)
    presets = ["tiny", "small"] + (["pact"] if device.type == "cuda" else [])
    result["adapter"] = [bench_adapter(preset, repeats, device, args.precision) for preset in presets]
    result["max_adapter_ratio"] = max(r["ratio"] for r in result["adapter"])
    if device.type != "cuda":
        with torch.device("meta"):
            pact = build_stage2("pact")
        result["pact_params"] = count_parameters(pact)
        print(f"pact   {result['pact_params'] / 1e6:.1f}M params (built on the meta device)")
    result["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"pact_vs_legacy": result["vs_legacy"]["ratio"], "max_adapter_ratio": result["max_adapter_ratio"], "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
