"""A node-local cache of synthetic datasets, so concurrent trials share one copy.

Each dataset is generated into a temporary folder beside its final place and renamed
into place in one step: a trial never sees a half-written dataset, and when two trials
race, the second one's copy is discarded (both are byte-identical: generation is seeded).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pact_ray.data.synthetic import generate_dataset


def cache_root() -> Path:
    """``$PACT_RAY_DATA_CACHE`` or ``~/.cache/pact_ray/synthetic``."""
    return Path(os.environ.get("PACT_RAY_DATA_CACHE", Path.home() / ".cache" / "pact_ray" / "synthetic"))


def ensure_synthetic(num_samples: int, seed: int, *, resolution: int, image_size, grid, cond_channels: int,
                     prefix_tokens: int = 5, occlusion_prob: float = 0.2, voxel_resolution: int | None = None,
                     root: Path | None = None) -> Path:
    """Path of the synthetic dataset with these settings, generating it once if missing
    (with Stage2 voxel sets when ``voxel_resolution`` is given)."""
    root = Path(root) if root is not None else cache_root()
    name = (f"n{num_samples}-s{seed}-r{resolution}-img{image_size[0]}x{image_size[1]}-g{grid[0]}x{grid[1]}"
            f"-c{cond_channels}-p{prefix_tokens}-o{occlusion_prob:g}" + (f"-v{voxel_resolution}" if voxel_resolution else ""))
    final = root / name
    if (final / "dataset.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        generate_dataset(tmp, num_samples, seed=seed, resolution=resolution, image_size=tuple(image_size),
                         grid=tuple(grid), cond_channels=cond_channels, prefix_tokens=prefix_tokens,
                         occlusion_prob=occlusion_prob, voxel_resolution=voxel_resolution)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "dataset.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
