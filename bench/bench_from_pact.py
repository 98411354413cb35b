"""Time `pact-object-data from-pact` on a generated folder of PAct-sized objects.

Each generated object has PAct's training layout (pact_ray.data.objects.pact) at PAct's
sizes: K parts (box-shaped, one revolute door, one prismatic drawer, the rest fixed), the
``mean`` latents [8, 16, 16, 16] of every part and of the whole object, SLat latents of
`--voxels` voxels per part (coords in 0..63, 8 float32 features), and `--views` RGBA views
of 518 x 518 px with their int32 semantic masks. The contents are random; only the sizes
matter for timing.

It reports seconds per object per core: the wall time of a one-process conversion divided
by the objects (the cost of one object on one core), and, with ``--workers N`` (N > 1),
also the pool's wall time for the same folder, so that N x wall / objects shows how close
the pool comes to N cores. 1,000 objects take about 1,000 x (seconds per object per core)
/ cores.

With ``--image-encoder dinov2`` the condition tokens come from PAct's DINOv2 ViT-L/14 with
registers, with random weights written to a temporary file (1.2 GB; only the arithmetic
matters): one process using every core (torch's threads), so its figure is seconds per
object on this machine, and per view.

Usage::

    python bench/bench_from_pact.py --out bench/results/from_pact_cpu.json [--objects 4 --views 20 --workers 2]
    python bench/bench_from_pact.py --image-encoder dinov2 --objects 1 --views 2 --out bench/results/from_pact_dinov2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pact_ray.data.objects import pact

PARTS = (("base", "fixed"), ("door", "revolute"), ("drawer", "prismatic"), ("handle", "fixed"), ("shelf", "fixed"),
         ("knob", "fixed"), ("tray", "fixed"), ("wheel", "fixed"))


def make_object(folder: Path, rng: np.random.Generator, parts: int, views: int, voxels: int, image_size: int) -> None:
    """One object in PAct's training layout (random contents at PAct's sizes)."""
    nodes = []
    for k, (name, kind) in enumerate(PARTS[:parts]):
        centre, size = rng.uniform(-0.3, 0.3, 3), rng.uniform(0.1, 0.6, 3)
        direction = np.eye(3)[rng.integers(3)] * rng.choice([-1, 1])
        nodes.append({"id": k, "name": name, "parent": -1 if k == 0 else 0, "children": [],
                      "joint": {"type": kind, "range": [0.0, 90.0 if kind == "revolute" else 0.3],
                                "axis": {"origin": centre.tolist(), "direction": direction.tolist()}},
                      "aabb": {"center": centre.tolist(), "size": size.tolist()}})
    (folder / pact.TRANSFORMS).parent.mkdir(parents=True)
    (folder / pact.OBJECT_JSON).write_text(json.dumps({"diffuse_tree": nodes}))
    (folder / pact.TRANSFORMS).write_text(json.dumps({"scale": 0.76, "offset": [0.0, 0.0, 0.0], "frames": []}))
    for sub in (pact.SS_LATENTS, pact.SLAT_LATENTS, pact.MASKS):
        (folder / sub).mkdir(parents=True)
    np.savez(folder / pact.SS_LATENTS / "full.npz", mean=rng.standard_normal(pact.SS_SHAPE).astype(np.float32))
    for node in nodes:
        stem = f"part_{node['id']}_{node['name']}"
        np.savez(folder / pact.SS_LATENTS / f"{stem}.npz", mean=rng.standard_normal(pact.SS_SHAPE).astype(np.float32))
        cells = rng.choice(pact.VOXEL_GRID**3, voxels, replace=False)
        coords = np.stack(np.unravel_index(cells, (pact.VOXEL_GRID,) * 3), 1).astype(np.uint8)
        np.savez(folder / pact.SLAT_LATENTS / f"{stem}.npz", coords=coords,
                 feats=rng.standard_normal((voxels, pact.SLAT_CHANNELS)).astype(np.float32))
    for v in range(views):
        rgba = np.zeros((image_size, image_size, 4), np.uint8)
        mask = np.zeros((image_size, image_size), np.int32)
        for node in nodes:  # one rectangle per part, later parts in front
            y0, x0 = rng.integers(image_size // 8, image_size // 2, 2)
            y1, x1 = y0 + rng.integers(image_size // 8, image_size // 3, 2)
            rgba[y0:y1, x0:x1, :3] = rng.integers(0, 256, 3)
            rgba[y0:y1, x0:x1, 3] = 255
            mask[y0:y1, x0:x1] = node["id"]
        Image.fromarray(rgba, "RGBA").save(folder / pact.IMAGES / f"{v:02d}.png")
        np.savez(folder / pact.MASKS / f"{v:02d}.npz", semantic_mask=mask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/from_pact_cpu.json", help="JSON file to write")
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--parts", type=int, default=4, help=f"parts per object (at most {len(PARTS)})")
    parser.add_argument("--views", type=int, default=20, help="views per object (PAct renders 20: 00-19)")
    parser.add_argument("--voxels", type=int, default=4000, help="SLat voxels per part")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes of the pool run")
    parser.add_argument("--image-encoder", choices=("stand-in", "dinov2"), default="stand-in")
    parser.add_argument("--encoder-device", help="for dinov2 (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        weights = None
        if args.image_encoder == "dinov2":
            import torch

            from pact_ray.data.objects.dinov2 import PACT_ARCH

            g = torch.Generator().manual_seed(0)
            weights = Path(tmp) / "dinov2_random.pth"
            torch.save({k: torch.randn(shape, generator=g) * 0.02 for k, shape in PACT_ARCH.shapes().items()}, weights)
            args.workers = 1  # one process, torch's threads on every core
        root = Path(tmp) / "data" / "Bench"
        rng = np.random.default_rng(0)
        for i in range(args.objects):
            folder = root / f"{i:05d}"
            (folder / pact.IMAGES).mkdir(parents=True)
            make_object(folder, rng, args.parts, args.views, args.voxels, args.image_size)
        source_mb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20
        timings = {}
        for workers in sorted({1, args.workers}):
            out = Path(tmp) / f"out{workers}"
            start = time.perf_counter()
            pact.convert(root, out, workers=workers, log=lambda line: None, image_encoder=args.image_encoder,
                         encoder_weights=weights and str(weights), encoder_device=args.encoder_device)
            timings[workers] = time.perf_counter() - start
            out_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
            shutil.rmtree(out)
    per_object_core = timings[1] / args.objects
    result = {
        "benchmark": "pact-object-data from-pact on generated PAct-sized objects",
        "objects": args.objects, "parts": args.parts, "views": args.views, "voxels_per_part": args.voxels,
        "image_size": args.image_size, "source_mb_per_object": source_mb / args.objects,
        "output_mb_per_object": out_mb / args.objects,
        "image_encoder": args.image_encoder,
        "seconds_per_object_per_core": per_object_core if args.image_encoder == "stand-in" else None,
        "seconds_per_object_all_cores": per_object_core if args.image_encoder == "dinov2" else None,
        "seconds_per_view": timings[1] / (args.objects * args.views),
        # PAct renders 20 views per object: the encoder's share scales with them.
        "hours_for_1000_objects_of_20_views": 1000 * 20 * timings[1] / (args.objects * args.views) / 3600,
        "pool": {"workers": args.workers, "wall_s": timings[args.workers],
                 "cores_used": timings[1] / timings[args.workers] if args.workers > 1 else 1.0},
        ("hours_for_1000_objects_on_one_core" if args.image_encoder == "stand-in"
         else "hours_for_1000_objects_on_this_machine"): 1000 * per_object_core / 3600,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
