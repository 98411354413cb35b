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


def cached(name: str, marker: str, generate: Callable[[Path], object], root: Path | None = None) -> Path:
    """``<root>/<name>`` (root: :func:`cache_root`), made by ``generate(path)`` (``path`` does
    not exist yet) when the file ``marker`` inside it is missing."""
    root = Path(root) if root is not None else cache_root()
    final = root / name
    if (final / marker).is_file():
        return final
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
