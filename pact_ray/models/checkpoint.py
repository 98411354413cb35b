"""Reading weights a user hands in: official PAct checkpoints and our own run checkpoints.

Everything a user gives us is loaded with ``weights_only=True`` (``.pt``) or safetensors,
so a checkpoint can never execute code. Failures raise :class:`CheckpointError` with one
sentence that names the file and what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pact_ray.errors import first_line


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (one-sentence message)."""


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` state dict from ``.safetensors`` or a torch file (weights only).

    Torch files may wrap the state dict under ``state_dict``, ``model`` or ``ema``; a
    ``module.`` prefix (DataParallel) is stripped.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist or is not a file")
    if p.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"checkpoint {p} has suffix {p.suffix!r}; expected one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is the same user error
        raise CheckpointError(f"checkpoint {p} could not be read as weights ({first_line(e, 200)})") from None
    for key in ("state_dict", "model", "ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {p} holds no flat state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def describe_mismatch(expected: dict[str, torch.Size], got: dict[str, torch.Tensor], limit: int = 5) -> str:
    """One sentence naming missing, unexpected and mis-shaped keys ('' when they match)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shaped = [f"{k} {tuple(got[k].shape)} vs {tuple(expected[k])}" for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k])]

    def part(label: str, items: list[str]) -> str:
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        return f"{len(items)} {label} ({', '.join(items[:limit])}{more})"

    parts = [part(lbl, items) for lbl, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys (checkpoint vs model)", shaped)) if items]
    return "; ".join(parts)


def load_core_weights(model: nn.Module, path: str | os.PathLike, core_keys: list[str], what: str = "the model") -> None:
    """Strictly load ``core_keys`` of ``model`` from ``path``; other parameters (e.g. the OT
    router's own, which the official model does not have) keep their initial values."""
    sd = read_weights(path)
    own = model.state_dict()
    expected = {k: own[k].shape for k in core_keys}
    problem = describe_mismatch(expected, sd)
    if problem:
        raise CheckpointError(f"checkpoint {path} does not fit {what}: {problem}")
    model.load_state_dict(sd, strict=False)
