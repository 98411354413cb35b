"""A node-local cache of generated data sets (the PAct objects' and the arm's), so
concurrent trials share one copy.

Each data set is generated into a temporary folder beside its final place and renamed into
place in one step: a trial never sees a half-written data set, and when two trials race,
the second one's copy is discarded (both are byte-identical: generation is seeded).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """``$PACT_RAY_DATA_CACHE`` or ``~/.cache/pact_ray/synthetic``."""
    return Path(os.environ.get("PACT_RAY_DATA_CACHE", Path.home() / ".cache" / "pact_ray" / "synthetic"))


# The file whose presence marks each kind of data set complete (written last, inside the rename).
OBJECTS_MARKER = "dataset.json"
# pact_ray.data.objects.format.FORMAT_VERSION (equal by a test; this module imports no torch).
OBJECTS_FORMAT = 2
ARM_MARKER = "meta/info.json"


def object_set_name(num_samples: int, seed: int, *, resolution: int, image_size, grid, cond_channels: int,
                    prefix_tokens: int = 5, occlusion_prob: float = 0.2, voxel_resolution: int | None = None) -> str:
    """The cache folder name of a synthetic PAct object set with these settings
    (:func:`pact_ray.data.objects.synthetic.ensure_synthetic`). The dataset format version
    leads it (``f2-``), so that no copy in an older format (an older articulation encoding)
    is ever reused."""
    return (f"f{OBJECTS_FORMAT}-n{num_samples}-s{seed}-r{resolution}-img{image_size[0]}x{image_size[1]}-g{grid[0]}x{grid[1]}"
            f"-c{cond_channels}-p{prefix_tokens}-o{occlusion_prob:g}" + (f"-v{voxel_resolution}" if voxel_resolution else ""))


def arm_set_name(episodes: int, length: int, seed: int) -> str:
    """The cache folder name of a synthetic arm data set (:func:`pact_ray.data.arm.synthetic.ensure_arm_dataset`)."""
    return f"arm-e{episodes}-t{length}-s{seed}"


def ready(name: str, marker: str, root: Path | None = None) -> Path | None:
    """``<root>/<name>`` when it is complete (its ``marker`` file exists), else None. Torch-free
    and generates nothing: the sweep driver describes cached data this way without importing
    the generators (torch), which saves its start-up a second."""
    final = (Path(root) if root is not None else cache_root()) / name
    return final if (final / marker).is_file() else None


def cached(name: str, marker: str, generate: Callable[[Path], object], root: Path | None = None) -> Path:
    """``<root>/<name>`` (root: :func:`cache_root`), made by ``generate(path)`` (``path`` does
    not exist yet) when the file ``marker`` inside it is missing."""
    if (done := ready(name, marker, root)) is not None:
        return done
    root = Path(root) if root is not None else cache_root()
    final = root / name
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        generate(tmp / name)
        try:
            os.rename(tmp / name, final)
        except OSError:  # another trial won the race: both copies are identical
            if not (final / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
