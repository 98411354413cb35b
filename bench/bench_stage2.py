"""Stage2 benchmarks: the PAct Stage2 (sparse IO blocks) against the padded-set Stage2 it
replaced, the sparse convolution against a dense conv3d, and the spatial adapter's overhead.

    python bench/bench_stage2.py --out bench/results/stage2_cpu.json [--quick] [--device cuda]

1. ``vs_legacy``: optimiser steps of the Stage2 trainer on the ``small`` preset, today's
   model against the one of commit ``--legacy-commit`` (the padded-set Stage2 without
   sparse convolutions: a 32^3 grid, at most 48 voxels per row). The old trainer, model,
   loader and presets are loaded from git history into private modules (nothing of them
   is kept in the tree). Each side trains on its own preset's synthetic data, the steps
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
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pact_ray.config import Stage2RunConfig  # noqa: E402
from pact_ray.data.cache import ensure_synthetic  # noqa: E402
from pact_ray.data.loader import ArticulatedDataset, collate_voxels  # noqa: E402
from pact_ray.models.sparse import SparseLevel, SubMConv3d, downsample  # noqa: E402
from pact_ray.models.stage2 import build_stage2  # noqa: E402
from pact_ray.presets import CONDITION_PRESETS, STAGE1_PRESETS  # noqa: E402
from pact_ray.training.base import count_parameters  # noqa: E402
from pact_ray.training.stage2 import Stage2Trainer  # noqa: E402

VARIANTS = ("baseline", "spatial_adapter")
# The modules of the old Stage2, in import order (each imports the ones before it).
LEGACY_MODULES = ("pact_ray.presets", "pact_ray.data.loader", "pact_ray.models.stage2", "pact_ray.training.stage2")


def load_legacy(commit: str) -> types.ModuleType:
    """The Stage2 training module of ``commit`` with its own model, loader and presets, as
    private modules: they are registered while they execute (so their imports of each other
    resolve to the old code), then today's modules are put back."""
    saved = {name: sys.modules.get(name) for name in LEGACY_MODULES}
    try:
        for name in LEGACY_MODULES:
            path = name.replace(".", "/") + ".py"
            source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"], check=True, capture_output=True, text=True).stdout
            module = types.ModuleType(name)
            module.__file__ = f"{commit}:{path}"
            sys.modules[name] = module
            exec(compile(source, module.__file__, "exec"), module.__dict__)
        return sys.modules["pact_ray.training.stage2"]
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


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
    legacy = load_legacy(commit)
    cfg = dict(variant="baseline", profile="quick", model="small", steps=repeats + 1)
    trainers = {"legacy": legacy.Stage2Trainer(Stage2RunConfig.for_variant(**cfg), device=device),
                "pact": Stage2Trainer(Stage2RunConfig.for_variant(**cfg), device=device)}
    times = interleaved({k: t.train_step for k, t in trainers.items()}, repeats)
    old_b, new_b = trainers["legacy"].batch(0), trainers["pact"].batch(0)
    layout = trainers["pact"].model.layout(new_b["coords"], new_b["num_rows"])
    row = dict(
        preset="small", legacy_commit=commit, repeats=repeats,
        legacy_ms=statistics.median(times["legacy"]) * 1e3, pact_ms=statistics.median(times["pact"]) * 1e3,
        ratio=paired_ratio(times["pact"], times["legacy"]),
        legacy_params=count_parameters(trainers["legacy"].model), pact_params=count_parameters(trainers["pact"].model),
        legacy_tokens=int(old_b["valid"].sum()), legacy_grid=int(legacy.STAGE2_PRESETS["small"]["resolution"]),
        pact_voxels=layout.levels[0].size, pact_tokens=layout.top.size, pact_grid=trainers["pact"].model.flow.resolution,
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
