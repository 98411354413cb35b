"""Rectified-flow objective and sampler (TRELLIS convention, ``docs/specs/stage1_pact.md``).

    x_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps,   t in [0, 1]
    v   = (1 - sigma_min) eps - x0                           (the model predicts v from t * 1000)

Training timesteps follow TRELLIS's logit-normal schedule (mean 1, std 1); sampling is
Euler from t = 1 to 0 with classifier-free guidance against a zeroed condition.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SIGMA_MIN = 1e-5
T_SCALE = 1000.0


def sample_t(n: int, generator: torch.Generator, mean: float = 1.0, std: float = 1.0) -> torch.Tensor:
    """[n] timesteps from the logit-normal schedule."""
    return torch.sigmoid(torch.randn(n, generator=generator) * std + mean)


def diffuse(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x0: [N, ...], t: [N] -> x_t."""
    t = t.view(-1, *[1] * (x0.dim() - 1))
    return (1 - t) * x0 + (SIGMA_MIN + (1 - SIGMA_MIN) * t) * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return (1 - SIGMA_MIN) * noise - x0


@torch.no_grad()
def euler_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor],
    noise: torch.Tensor,
    steps: int = 25,
    guidance: float = 7.0,
) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0.

    velocity(x_t, t_scaled [N], conditional) -> v; with guidance g the step uses
    ``v_uncond + g * (v_cond - v_uncond)`` (guidance 1 = no guidance).
    """
    x = noise
    ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        t = torch.full((x.shape[0],), float(t_cur) * T_SCALE, device=x.device)
        v = velocity(x, t, True)
        if guidance != 1.0:
            v_neg = velocity(x, t, False)
            v = v_neg + guidance * (v - v_neg)
        x = x - (t_cur - t_next) * v
    return x
