"""The trial checkpoint format (Ray-free, so offline evaluation never loads Ray).

A checkpoint is a folder with ``state.pt`` (model, optimiser, step, RNG, config; tensors and
plain values only, so it loads with ``weights_only=True``) and ``meta.json`` (step, kind,
sha256 of ``state.pt``, config, the articulation encoding). A checkpoint whose file is
missing, truncated or fails its checksum is refused with the reason, so the caller can fall
back to an older one; so is a checkpoint of a kind that predicts articulation vectors
(``RunConfig.predicts_articulation``) written before the vectors took PAct's encoding
(:data:`pact_ray.data.objects.articulation.ENCODING`): its head would be read in the wrong
layout.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from pact_ray.data.objects.articulation import ENCODING
from pact_ray.fileio import sha256_file

STATE_FILE = "state.pt"
META_FILE = "meta.json"


@contextlib.contextmanager
def _without_record_crc32() -> Iterator[None]:
    """``torch.save`` without its per-record CRC32, restoring the setting after.

    Why: the sha256 in ``meta.json`` covers the whole file and is checked before every load,
    so torch's own CRC32 of each tensor record is redundant here, and it is most of the cost
    of a save: 0.2 s of 0.25 s for a small-preset trial's 136 MB (model and Adam state),
    paid by every trial at its final step. ``torch.load`` reads such a file as usual (only a
    zip tool would report the records' CRC as wrong)."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def write_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (a trainer's ``state_dict()``) into ``folder``."""
    with _without_record_crc32():
        torch.save(state, folder / STATE_FILE)
    meta = {"step": state["step"], "kind": state["kind"], "sha256": sha256_file(folder / STATE_FILE), "config": state["config"],
            "articulation_encoding": ENCODING}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))


def read_checkpoint(folder: Path, kind: str, articulation: bool = False) -> dict[str, Any]:
    """Load and verify one checkpoint folder of run kind ``kind`` (whose model predicts
    articulation vectors where ``articulation``); raises ValueError with the reason."""
    meta_path, state_path = folder / META_FILE, folder / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise ValueError(f"checkpoint {folder} lacks {META_FILE} or {STATE_FILE}")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"checkpoint {folder} is a {meta.get('kind')!r} checkpoint, not {kind!r}")
    if articulation and meta.get("articulation_encoding") != ENCODING:
        raise ValueError(f"checkpoint {folder} predicts articulation vectors in the project's first encoding, "
                         f"not PAct's ({ENCODING}); train it again")
    if sha256_file(state_path) != meta.get("sha256"):
        raise ValueError(f"checkpoint {folder} is corrupted (checksum mismatch)")
    return torch.load(state_path, map_location="cpu", weights_only=True)
