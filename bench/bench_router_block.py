"""OT-gated vs ungated Stage1 block: forward + backward time, side by side in one run.

    python bench/bench_router_block.py --out bench/results/router_block_cpu.json [--quick] [--device cuda]

Cases:
- ``small``: the small preset's shapes; the whole transformer block (self-attention,
  cross-attention, MLP) and the cross-attention sublayer alone.
- ``pact``: PAct shapes (width 1024, 16 heads, 4096 tokens per part, 1374 condition
  tokens on a 37x37 grid), fewer parts on a CPU; the cross-attention sublayer (the part the
  router changes: the stricter ratio), and on a GPU the whole block too.

Each variant's gated time is measured interleaved with the ungated one (ungated, gated,
ungated, ...) and the ratio of medians is reported, with router diagnostics computed as in
training. Target: gated / ungated <= 1.15 on CPU (1.05 on GPU at the pact preset).
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

from pact_ray.models.stage1 import ModulatedCrossBlock, PartLayout
from pact_ray.ot.router import OTRouter, RouterConfig
from pact_ray.runs.registry import STAGE1_VARIANTS

CASES = {
    # name: width, heads, tokens per part, grid, parts per object, objects, image size
    "small": dict(channels=256, heads=4, tokens=64, grid=(8, 8), parts=(4, 3), image=64),
    "pact": dict(channels=1024, heads=16, tokens=4096, grid=(37, 37), parts=(2,), image=518),
}
VARIANTS = ["ot_first", "mask_prior", "rgb_edge", "mask_edge", "virtual_patch"]


def make_inputs(case: dict, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_parts = torch.tensor(case["parts"])
    n = int(n_parts.sum())
    c, (h, w) = case["channels"], case["grid"]
    x = torch.randn(n, case["tokens"], c, generator=g)
    cond = torch.randn(n, 5 + h * w, c, generator=g)
    obj_masks = torch.randint(0, int(n_parts.max()) + 1, (len(case["parts"]), h, w), generator=g)
    images = torch.rand(len(case["parts"]), 3, case["image"], case["image"], generator=g)
    t = torch.rand(n, generator=g) * 1000
    t_emb = torch.randn(n, c, generator=g)
    masks = torch.repeat_interleave(obj_masks, n_parts, dim=0)
    return {k: v.to(device) for k, v in dict(x=x, cond=cond, masks=masks, images=images, t=t, t_emb=t_emb, num_parts=n_parts).items()}


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_case(name: str, case: dict, scope: str, variants: list[str], repeats: int, device: torch.device, dtype) -> list[dict]:
    torch.manual_seed(0)
    c, heads = case["channels"], case["heads"]
    block = ModulatedCrossBlock(c, c, heads, 4, True, global_attn=True).to(device)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    inp = make_inputs(case, device)
    layout = PartLayout.build(inp["num_parts"], inp["x"].shape[0], device)
    x = inp["x"].requires_grad_(True)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)

    def run(router, ctx):
        with autocast:
            if scope == "block":
                out = block(x, inp["t_emb"], inp["cond"], layout, router, ctx, 0)
            else:  # the cross-attention sublayer: norm2 -> (gated) cross-attention -> residual
                h = block.norm2(x)
                if router is not None:
                    q, k, v = block.cross_attn.project(h, inp["cond"])
                    k, v, bias = router.route(0, q, k, v, ctx)
                    out = x + block.cross_attn.attend(q, k, v, bias)
                else:
                    out = x + block.cross_attn(h, inp["cond"])
        out.float().pow(2).mean().backward()
        block.zero_grad(set_to_none=True)
        x.grad = None
        if router is not None:
            router.diagnostics()  # read as the trainer does once per step

    rows = []
    for variant in variants:
        rcfg = RouterConfig(**STAGE1_VARIANTS[variant].router)
        router = OTRouter(rcfg, 1, c, heads).to(device)
        ungated, gated = [], []
        for i in range(repeats + 1):
            ctx = router.context(layout, inp["masks"], inp["t"], inp["cond"].shape[1], inp["images"])
            tu = timed(lambda: run(None, None), device)
            tg = timed(lambda: (run(router, ctx), router.finish(ctx)), device)
            if i > 0:  # the first pair warms up
                ungated.append(tu)
                gated.append(tg)
        mu, mg = statistics.median(ungated), statistics.median(gated)
        rows.append(dict(case=name, scope=scope, variant=variant, ungated_ms=mu * 1e3, gated_ms=mg * 1e3, ratio=mg / mu,
                         repeats=repeats, rows=int(layout.num_parts.sum()), tokens=case["tokens"], cond_tokens=inp["cond"].shape[1]))
        print(f"{name:6s} {scope:5s} {variant:14s} ungated {mu * 1e3:9.2f} ms  gated {mg * 1e3:9.2f} ms  ratio {mg / mu:.3f}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/router_block_cpu.json")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="fewer repeats and variants (a smoke run)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    variants = VARIANTS[:2] if args.quick else VARIANTS
    repeats = 3 if args.quick else args.repeats
    rows = []
    rows += bench_case("small", CASES["small"], "block", variants, repeats, device, dtype)
    rows += bench_case("small", CASES["small"], "cross", variants, repeats, device, dtype)
    pact_repeats = max(2, repeats // 2) if device.type == "cpu" else repeats
    rows += bench_case("pact", CASES["pact"], "cross", variants, pact_repeats, device, dtype)
    if device.type == "cuda":
        rows += bench_case("pact", CASES["pact"], "block", variants, repeats, device, dtype)
    target = 1.15 if device.type == "cpu" else 1.05
    result = {
        "benchmark": "router_block", "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "dtype": args.dtype,
        "target_ratio": target, "rows": rows,
        "max_ratio": {f"{c}/{s}": max(r["ratio"] for r in rows if r["case"] == c and r["scope"] == s) for c, s in {(r["case"], r["scope"]) for r in rows}},
    }
    result["target_met"] = {k: v <= target for k, v in result["max_ratio"].items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"max_ratio": result["max_ratio"], "target_met": result["target_met"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
