"""The OT router's config (:class:`RouterConfig`, block specs) and the Sinkhorn solver's
defaults, apart from the router and the solver (:mod:`pact_ray.ot.router`,
:mod:`pact_ray.ot.sinkhorn`) so that a sweep's driver checks its configs without importing
torch (Ray starts meanwhile: pact_ray.tune.sweep)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pact_ray.errors import ConfigError

# The solver's defaults (pact_ray.ot.sinkhorn), and through RouterConfig the router's: the one place they are set.
DEFAULT_EPS = 0.05  # entropic regularisation, in units of the (standardised) cost
DEFAULT_TOL = 1e-4  # L1 row-marginal error; float32 reaches about 1e-6 (pact_ray.ot.sinkhorn's docstring)
# Iterations at most (Sinkhorn warm-up and Newton steps together). On the quick matrix's
# real costs the solves stop after 6-10 (bench/bench_ot_convergence.py). On router-like
# costs with a mask prior of 4 (the top of its search range) they stop after 5-22: over
# 1,500 random problems (2-8 parts, 36-65 patches) the median is 13, 8 need 20 or more and
# the most is 22, so 30 leaves room. On CPU the loop stops at tol; on CUDA it runs them all.
DEFAULT_MAX_ITER = 30

EDGE_KINDS = ("none", "rgb", "mask")
PART_MARGINALS = ("uniform", "area")


def resolve_blocks(spec: str | list[int] | tuple[int, ...], num_blocks: int) -> list[int]:
    """Block spec -> sorted block indices.

    "first" -> [0]; "first_third" -> 0..ceil(n/3)-1; "all" -> every block; "0,2,5" or a list -> those.
    """
    if isinstance(spec, str):
        s = spec.strip()
        if s == "first":
            return [0]
        if s == "first_third":
            return list(range(math.ceil(num_blocks / 3)))
        if s == "all":
            return list(range(num_blocks))
        try:
            ids = [int(p) for p in s.split(",") if p.strip()]
        except ValueError:
            raise ConfigError(
                f"block spec {spec!r} is not 'first', 'first_third', 'all' or a comma-separated list of block indices"
            ) from None
    elif isinstance(spec, int):
        ids = [spec]
    else:
        ids = [int(i) for i in spec]
    if not ids:
        raise ConfigError(f"block spec {spec!r} names no block")
    bad = [i for i in ids if not 0 <= i < num_blocks]
    if bad:
        raise ConfigError(f"block spec {spec!r} names blocks {bad} outside 0..{num_blocks - 1} of this model")
    return sorted(set(ids))


@dataclass
class RouterConfig:
    """Knobs of the OT router; every field is a searchable, loggable parameter. A run config
    holds it as its ``router`` block and builds it from flat ``router.*`` keys, coerced to
    these fields' types (:meth:`pact_ray.runs.config.RunConfig.from_flat`)."""

    blocks: str = "first"  # "first", "first_third", "all" or "0,2,5"
    # The solver's own defaults (above), which pact_ray.ot.sinkhorn uses.
    eps: float = DEFAULT_EPS  # entropic regularisation (costs are standardised, so this is unit-free)
    iterations: int = DEFAULT_MAX_ITER  # solver iterations at most (Sinkhorn warm-up and Newton steps)
    tol: float = DEFAULT_TOL  # stop once every plan's L1 row-marginal error is below this
    strength: float = 1.0  # gate exponent; 0 reproduces the ungated block bit for bit
    mask_prior: bool = False  # part mask as a soft OT cost prior instead of a hard condition
    lambda_mask: float = 1.0  # cost added to patches outside part k's mask region
    edge: str = "none"  # edge-regularised cost: "none", "rgb" (Sobel of the image) or "mask" (label edges)
    lambda_edge: float = 0.5  # weight of the smoothed-plan pull in the second solve
    edge_beta: float = 4.0  # neighbour weight exp(-beta * max(e_p, e_q))
    virtual_patch: bool = False  # one learnable virtual image token per patched block
    m_v: float = 0.05  # plan mass of the virtual token
    part_marginal: str = "uniform"  # "uniform" (1/K) or "area" (mask-area proportional, floored)
    area_floor: float = 0.05  # floor of a part's area share, relative to 1/K
    t_min: float = 0.0  # active timestep range, in [0, 1] (the router is off outside it)
    t_max: float = 1.0
    differentiable_plan: bool = False  # backpropagate through the Sinkhorn iterations
    diag_tokens: int = 16  # query tokens per row (evenly spaced) used for the gate diagnostic

    def validate(self) -> "RouterConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.eps > 0, f"router eps must be > 0, got {self.eps}")
        need(int(self.iterations) >= 1, f"router iterations must be >= 1, got {self.iterations}")
        need(self.tol > 0, f"router tol must be > 0, got {self.tol}")
        need(self.strength >= 0, f"router strength must be >= 0, got {self.strength}")
        need(self.lambda_mask >= 0, f"router lambda_mask must be >= 0, got {self.lambda_mask}")
        need(self.lambda_edge >= 0, f"router lambda_edge must be >= 0, got {self.lambda_edge}")
        need(self.edge_beta >= 0, f"router edge_beta must be >= 0, got {self.edge_beta}")
        need(0 < self.m_v < 1, f"router virtual mass m_v must be in (0, 1), got {self.m_v}")
        need(self.edge in EDGE_KINDS, f"router edge must be one of {EDGE_KINDS}, got {self.edge!r}")
        need(self.part_marginal in PART_MARGINALS, f"router part_marginal must be one of {PART_MARGINALS}, got {self.part_marginal!r}")
        need(0 <= self.area_floor <= 1, f"router area_floor must be in [0, 1], got {self.area_floor}")
        need(0 <= self.t_min <= self.t_max <= 1, f"router timestep range must satisfy 0 <= t_min <= t_max <= 1, got [{self.t_min}, {self.t_max}]")
        need(int(self.diag_tokens) >= 1, f"router diag_tokens must be >= 1, got {self.diag_tokens}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)
