"""Time our batched Sinkhorn-Newton solver against POT on the OT router's problem sizes.

Three solvers run the same float32 problems (one per object x head, K parts against P
patches, standardised dot-product costs, with or without the mask prior's +1 outside a
part's region, uniform marginals):

- ``ours``: :func:`pact_ray.ot.sinkhorn.sinkhorn_log` at the router's defaults on the
  [objects, heads, K, P] batch;
- ``pot_batched``: ``ot.batch.solve_batch(..., method="log_sinkhorn")`` on [objects*heads, K, P];
- ``pot_loop``: a Python loop of ``ot.sinkhorn(..., method="sinkhorn_log")``, one call per
  problem (POT's torch backend).

At equal accuracy: every solver gets the same eps and must reach the same tolerance on
the L1 marginal error, the router's (1e-4). The stopping rules measure different norms
(ours: L1 error of the K row sums, every iteration; POT batched: L2 error of the K row
sums, every 10; POT per problem: L2 error of the P column sums, every 10), so POT gets
the threshold tol / sqrt(n) on its L2 norm of n entries, which implies L1 < tol as ours
does (||x||_1 <= sqrt(n) ||x||_2), and up to 20000 iterations. For each solver the
achieved accuracy is recorded: the L1 error of both marginals and the max |plan -
reference|, where the reference is POT's batched solver run to 1e-10 in float64. Timings
interleave the solvers, repeat by repeat, so that load drifting on the machine hits all of
them alike. Target: ours <= 0.5 x POT's batched solver on every case.

Usage::

    python bench/bench_sinkhorn.py --out bench/results/sinkhorn_cpu.json [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import ot
import torch

from pact_ray.ot.sinkhorn import DEFAULT_EPS, DEFAULT_MAX_ITER, DEFAULT_TOL, sinkhorn_log

OURS, POT_BATCHED, POT_LOOP = "ours", "pot_batched", "pot_loop"
STOP_RULES = {
    OURS: "L1 error of the row sums < tol, checked every iteration",
    POT_BATCHED: "L2 error of the row sums < tol / sqrt(K), checked every 10 iterations",
    POT_LOOP: "L2 error of the column sums < tol / sqrt(P), checked every 10 iterations",
}
REFERENCE_TOL, REFERENCE_MAX_ITER = 1e-10, 100_000
HEAD_DIM = 64


@dataclass(frozen=True)
class Regime:
    """Solver settings shared by every method in one comparison."""

    name: str
    eps: float
    max_iter: int
    tol: float


REGIMES = (
    # ours runs at its defaults (at most DEFAULT_MAX_ITER iterations); POT gets POT_MAX_ITER.
    Regime("router_tol", eps=DEFAULT_EPS, max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL),
)
POT_MAX_ITER = 20_000
LAYOUTS = ((8, 4), (2, 16))  # (objects, heads): 32 problems per batch either way
PARTS = (4, 8)
PATCHES = (64, 37 * 37)
PRIORS = (0.0, 1.0)  # the mask prior's cost outside a part's region (router default lambda_mask 1)


@dataclass(frozen=True)
class Problems:
    """A batch of router-like OT problems, float32."""

    cost: torch.Tensor  # [objects, heads, K, P]
    a: torch.Tensor  # [objects, heads, K]
    b: torch.Tensor  # [objects, heads, P]


def make_problems(objects: int, heads: int, parts: int, patches: int, prior: float, seed: int) -> Problems:
    """Standardised costs -<q_k, key_p>/sqrt(d) from random queries and keys, plus ``prior``
    on the patches outside part k's region of a random label map (as the router's mask
    prior: labels 0..K, 0 the background)."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(objects, heads, parts, HEAD_DIM, generator=gen)
    keys = torch.randn(objects, heads, patches, HEAD_DIM, generator=gen)
    cost = -queries @ keys.transpose(-1, -2) / HEAD_DIM**0.5
    cost = (cost - cost.mean(dim=(-2, -1), keepdim=True)) / (
        cost.std(dim=(-2, -1), keepdim=True) + 1e-6
    )
    labels = torch.randint(0, parts + 1, (objects, 1, 1, patches), generator=gen)
    cost = cost + prior * (labels != torch.arange(1, parts + 1)[:, None]).float()
    a = torch.full((objects, heads, parts), 1.0 / parts)
    b = torch.full((objects, heads, patches), 1.0 / patches)
    return Problems(cost, a, b)


def solve_ours(problems: Problems, regime: Regime) -> tuple[torch.Tensor, int]:
    result = sinkhorn_log(
        problems.cost, problems.a, problems.b,
        eps=regime.eps, max_iter=regime.max_iter, tol=regime.tol,
    )
    return result.plan, int(result.iterations)


def solve_pot_batched(problems: Problems, regime: Regime) -> tuple[torch.Tensor, int]:
    parts = problems.cost.shape[-2]
    result = ot.batch.solve_batch(
        problems.cost.flatten(0, 1), regime.eps,
        problems.a.flatten(0, 1), problems.b.flatten(0, 1),
        max_iter=POT_MAX_ITER, tol=regime.tol / math.sqrt(parts),  # L2 over K rows
        method="log_sinkhorn", grad="detach",
    )
    return result.plan.reshape(problems.cost.shape), result.log["n_iter"] + 1


def solve_pot_loop(problems: Problems, regime: Regime) -> tuple[torch.Tensor, int]:
    plans, iterations = [], 0
    threshold = regime.tol / math.sqrt(problems.cost.shape[-1])  # L2 over P columns
    for cost, a, b in zip(
        problems.cost.flatten(0, 1), problems.a.flatten(0, 1), problems.b.flatten(0, 1)
    ):
        plan, log = ot.sinkhorn(
            a, b, cost, regime.eps, method="sinkhorn_log",
            numItermax=POT_MAX_ITER, stopThr=threshold, warn=False, log=True,
        )
        plans.append(plan)
        iterations = max(iterations, log["niter"] + 1)
    return torch.stack(plans).reshape(problems.cost.shape), iterations


SOLVERS: dict[str, Callable[[Problems, Regime], tuple[torch.Tensor, int]]] = {
    OURS: solve_ours,
    POT_BATCHED: solve_pot_batched,
    POT_LOOP: solve_pot_loop,
}


def reference_plan(problems: Problems, regime: Regime) -> torch.Tensor:
    """POT's batched solver, float64, run to 1e-10: the converged plan."""
    # float32 1/P summed P times is not exactly 1: renormalise in float64, or the
    # two marginals differ by ~1e-8 and no plan satisfies both to 1e-10.
    a, b = (m.flatten(0, 1).double() for m in (problems.a, problems.b))
    result = ot.batch.solve_batch(
        problems.cost.flatten(0, 1).double(), regime.eps,
        a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True),
        max_iter=REFERENCE_MAX_ITER, tol=REFERENCE_TOL, method="log_sinkhorn", grad="detach",
    )
    return result.plan.reshape(problems.cost.shape)


def wall_times(problems: Problems, regime: Regime, repeats: int) -> dict[str, list[float]]:
    """Wall times in seconds of each solver, over interleaved repeats."""
    times: dict[str, list[float]] = {name: [] for name in SOLVERS}
    for _ in range(repeats):
        for name, solve in SOLVERS.items():
            start = time.perf_counter()
            solve(problems, regime)
            times[name].append(time.perf_counter() - start)
    return times


def run_case(
    regime: Regime, objects: int, heads: int, parts: int, patches: int, prior: float, repeats: int
) -> dict:
    problems = make_problems(objects, heads, parts, patches, prior, seed=parts * 10_000 + patches)
    reference = reference_plan(problems, regime)
    a, b = problems.a.double(), problems.b.double()
    methods = {}
    for name, solve in SOLVERS.items():  # also the warm-up call of each solver
        plan, iterations = solve(problems, regime)
        plan = plan.double()
        marginal_error = (plan.sum(-1) - a).abs().sum(-1) + (plan.sum(-2) - b).abs().sum(-1)
        methods[name] = {
            "iterations": iterations,
            "max_marginal_error_l1": marginal_error.max().item(),
            "max_abs_plan_diff_vs_reference": (plan - reference).abs().max().item(),
        }
    for name, samples in wall_times(problems, regime, repeats).items():
        # The median is the statistic compared; the minimum shows how much of it is
        # noise from other load on the machine.
        methods[name]["median_s"] = statistics.median(samples)
        methods[name]["min_s"] = min(samples)
    ours = methods[OURS]["median_s"]
    return {
        "regime": asdict(regime),
        "objects": objects,
        "heads": heads,
        "parts": parts,
        "patches": patches,
        "prior": prior,
        "methods": methods,
        "all_reach_tol": all(m["max_marginal_error_l1"] < regime.tol for m in methods.values()),
        "ratio_ours_over_pot_batched": ours / methods[POT_BATCHED]["median_s"],
        "ratio_ours_over_pot_batched_min": methods[OURS]["min_s"] / methods[POT_BATCHED]["min_s"],
        "ratio_ours_over_pot_loop": ours / methods[POT_LOOP]["median_s"],
    }


def machine_info() -> dict:
    return {
        "torch": torch.__version__,
        "pot": ot.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),  # other work on a shared machine; ratios interleave it away
    }


def check_writable(path: Path) -> str | None:
    """Create the output folder; the reason it cannot be written to, or None."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return error.strerror
    if path.is_dir():
        return "it is a directory"
    return None if os.access(path.parent, os.W_OK) else "its folder is not writable"


def write_json(path: Path, payload: dict) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        try:
            json.dump(payload, tmp, indent=2)
            tmp.write("\n")
        except BaseException:
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/sinkhorn_cpu.json"),
                        help="where to write the JSON results")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per solver and case (default 11, or 5 with --quick)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch.set_num_threads for every solver (default 2, as the benchmarks' CPU setting)")
    parser.add_argument("--quick", action="store_true",
                        help="one (objects, heads) layout and 5 repeats: about a minute")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_writable(args.out)
    if problem is not None:
        print(f"error: cannot write {args.out}: {problem}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 11)
    layouts = LAYOUTS[:1] if args.quick else LAYOUTS

    cases = []
    print(f"{'prior':>5} {'B x H':>7} {'K':>2} {'P':>5} | {'ours':>9} {'pot_batch':>9} "
          f"{'pot_loop':>9} | {'ours/batch':>10} {'ours/loop':>9} | iters o/b/l")
    for regime, (objects, heads), parts, patches, prior in itertools.product(REGIMES, layouts, PARTS, PATCHES, PRIORS):
        case = run_case(regime, objects, heads, parts, patches, prior, repeats)
        cases.append(case)
        m = case["methods"]
        print(
            f"{prior:>5} {objects:>3}x{heads:<3} {parts:>2} {patches:>5} | "
            + " ".join(f"{m[k]['median_s'] * 1e3:>7.2f}ms" for k in SOLVERS)
            + f" | {case['ratio_ours_over_pot_batched']:>10.2f} "
            f"{case['ratio_ours_over_pot_loop']:>9.2f} | "
            + "/".join(str(m[k]["iterations"]) for k in SOLVERS),
            flush=True,
        )

    payload = {
        "machine": machine_info(),
        "settings": {"repeats": repeats, "quick": args.quick, "dtype": "float32",
                     "stop_rules": STOP_RULES, "pot_max_iter": POT_MAX_ITER,
                     "reference": {"solver": "ot.batch.solve_batch float64",
                                   "tol": REFERENCE_TOL, "max_iter": REFERENCE_MAX_ITER}},
        "cases": cases,
        "target": "ours <= 0.5 x POT's batched solver on every case, every solver at L1 marginal error < tol",
        "target_met": all(c["ratio_ours_over_pot_batched"] <= 0.5 and c["all_reach_tol"] for c in cases),
    }
    try:
        write_json(args.out, payload)
    except OSError as error:
        print(f"error: cannot write {args.out}: {error.strerror}", file=sys.stderr)
        return 1
    print(f"target_met={payload['target_met']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
