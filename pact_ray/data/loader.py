"""Torch dataset over a dataset folder (format.py), the part-wise batches Stage1 takes and
the padded voxel-set batches Stage2 takes."""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pact_ray.data.articulation import validity_mask
from pact_ray.data.format import (
    DATASET_FILE,
    DataError,
    DatasetSpec,
    grid_mask,
    load_sample,
    read_dataset_spec,
    sample_path,
)

# Spec fields that `expect` may name; max_parts is an upper bound, the rest must match.
_EXPECTABLE = ("resolution", "latent_channels", "image_size", "grid", "cond_channels", "prefix_tokens", "max_parts",
               "voxel_resolution", "voxel_channels")


class ArticulatedDataset(Dataset):
    """The samples of a dataset folder; each item is validated when it is loaded.

    Item i: the arrays of format.load_sample plus `grid_mask` int64 [h, w] (majority
    label per image patch) and `index`.

    expect: model requirements checked against dataset.json, e.g.
    {"resolution": 8, "cond_channels": 64, "grid": (6, 6)}; keys among resolution,
    latent_channels, image_size, grid, cond_channels, prefix_tokens, voxel_resolution,
    voxel_channels (must be equal) and max_parts (the most parts the model handles: the
    dataset's max_parts must not exceed it).
    """

    def __init__(self, folder: str | os.PathLike, expect: Mapping[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.spec: DatasetSpec = read_dataset_spec(self.folder)
        if expect:
            self._check_expect(expect)

    def _check_expect(self, expect: Mapping[str, Any]) -> None:
        source = self.folder / DATASET_FILE
        for key, needed in expect.items():
            if key not in _EXPECTABLE:
                raise ValueError(f"expect may name {', '.join(_EXPECTABLE)}, not {key!r}.")
            have = getattr(self.spec, key)
            if key.startswith("voxel_") and have is None:
                raise DataError(
                    f"{source}: the dataset has no voxel sets but the Stage2 model needs them "
                    f"(generate it with --voxel-resolution {expect.get('voxel_resolution', needed)})."
                )
            if key == "max_parts":
                if have > needed:
                    raise DataError(f"{source}: max_parts is {have} but the model handles at most {needed} parts.")
                continue
            needed = tuple(needed) if isinstance(have, tuple) else needed
            if have != needed:
                raise DataError(f"{source}: {key} is {_show(have)} but the model needs {_show(needed)}.")

    def __len__(self) -> int:
        return self.spec.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples.")
        sample: dict[str, Any] = load_sample(sample_path(self.folder, index), self.spec)
        sample["grid_mask"] = grid_mask(sample["mask"], self.spec.grid)
        sample["index"] = index
        return sample

    def validate_all(self) -> None:
        """Load every sample; raises DataError on the first bad one."""
        for index in range(len(self)):
            load_sample(sample_path(self.folder, index), self.spec)


def _show(value: Any) -> str:
    return "x".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def collate_parts(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Batch B objects (items of ArticulatedDataset) part by part, N = total parts.

    Rows of the part-wise tensors are grouped object by object.
      x            float32 [N, 8, R, R, R]  structure latents
      cond         float32 [N, L, C]        each object's tokens repeated per part
      masks        int64   [N, h, w]        each object's grid mask repeated per part
      num_parts    int64   [B]
      part_idx     int64   [N]              0..K-1 inside each object
      images       float32 [B, 3, H, W]     in [0, 1]
      pixel_masks  int64   [B, H, W]
      articulation float32 [N, 24]
      art_valid    bool    [N, 24]          articulation.validity_mask of joint_types
      part_labels  int64   [N]
      joint_types  int64   [N]
      index        int64   [B]              sample indices
    """
    counts = [len(s["part_labels"]) for s in samples]
    num_parts = torch.tensor(counts, dtype=torch.int64)

    def per_part(key: str) -> torch.Tensor:
        return torch.cat([torch.as_tensor(s[key]) for s in samples])

    def repeated(key: str, dtype: torch.dtype) -> torch.Tensor:
        rows = [torch.as_tensor(s[key], dtype=dtype) for s in samples]
        return torch.cat([row.expand(k, *row.shape) for row, k in zip(rows, counts)])

    def stacked(key: str) -> torch.Tensor:
        return torch.stack([torch.as_tensor(s[key]) for s in samples])

    return {
        "x": per_part("latents"),
        "cond": repeated("cond", torch.float32),
        "masks": repeated("grid_mask", torch.int64),
        "num_parts": num_parts,
        "part_idx": torch.cat([torch.arange(k) for k in counts]),
        "images": stacked("image").permute(0, 3, 1, 2).float() / 255.0,
        "pixel_masks": stacked("mask").long(),
        **_part_targets(samples),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
    }


def _part_targets(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Per-part supervision, parts of all objects in order: articulation [P, 24], art_valid,
    part_labels, joint_types."""
    joint_types = torch.cat([torch.as_tensor(s["joint_types"]) for s in samples])
    return {
        "articulation": torch.cat([torch.as_tensor(s["articulation"]) for s in samples]),
        "art_valid": validity_mask(joint_types),
        "part_labels": torch.cat([torch.as_tensor(s["part_labels"]) for s in samples]),
        "joint_types": joint_types,
    }


def _shared_cells(coords: np.ndarray) -> np.ndarray:
    """coords int16 [V, 4] (row, x, y, z) -> bool [V]: voxels whose cell is occupied by more
    than one part row (row >= 1) of the object."""
    radix = 1 << 15  # above every int16 coordinate: (x, y, z) -> one int64 key
    cell = (coords[:, 1].astype(np.int64) * radix + coords[:, 2]) * radix + coords[:, 3]
    cells, counts = np.unique(cell[coords[:, 0] > 0], return_counts=True)
    return np.isin(cell, cells[counts > 1])


def collate_voxels(
    samples: Sequence[Mapping[str, Any]],
    max_tokens: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Batch B objects (items of an ArticulatedDataset with voxels) as padded voxel sets.

    Each object contributes K + 1 rows, the whole object first, then its parts (the row
    ids of format.py's voxel_coords); N = sum(K + 1), P = sum(K). A row with more than
    `max_tokens` voxels keeps a uniform random subset of that size drawn from `generator`
    (kept in canonical order); M is the longest row after that, and shorter rows are
    padded (valid False, zeros).
      feats        float32 [N, M, C2]  voxel latents
      shared       float32 [N, M]      1 where the voxel's cell belongs to more than one
                                       part of its object (counted before subsampling)
      coords       int64   [N, M, 3]   x, y, z in 0..G-1
      valid        bool    [N, M]
      num_rows     int64   [B]         K + 1
      cond         float32 [B, L, C]   image tokens, once per object
      masks        int64   [B, h, w]   grid masks (labels k + 1 = part k = row k + 1)
      pixel_masks  int64   [B, H, W]
      num_parts    int64   [B]         K
      articulation float32 [P, 24], art_valid bool [P, 24], part_labels int64 [P],
      joint_types  int64   [P]         per part, objects in order
      index        int64   [B]
    """
    if any("voxel_coords" not in s for s in samples):
        raise ValueError("collate_voxels needs samples with voxel sets (a dataset made with a voxel_resolution).")
    rows_c, rows_f, rows_s, num_rows = [], [], [], []
    for s in samples:
        coords, feats = s["voxel_coords"], s["voxel_feats"]
        shared = _shared_cells(coords)
        bounds = np.searchsorted(coords[:, 0], np.arange(len(s["part_labels"]) + 2))
        num_rows.append(len(bounds) - 1)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            keep = np.arange(lo, hi)
            if max_tokens is not None and hi - lo > max_tokens:
                keep = keep[torch.randperm(hi - lo, generator=generator)[:max_tokens].sort().values.numpy()]
            rows_c.append(torch.from_numpy(coords[keep, 1:].astype(np.int64)))
            rows_f.append(torch.from_numpy(feats[keep].astype(np.float32)))
            rows_s.append(torch.from_numpy(shared[keep].astype(np.float32)))
    lengths = torch.tensor([len(c) for c in rows_c])
    valid = torch.arange(int(lengths.max()))[None] < lengths[:, None]
    pad = torch.nn.utils.rnn.pad_sequence
    counts = [len(s["part_labels"]) for s in samples]
    return {
        "feats": pad(rows_f, batch_first=True),
        "shared": pad(rows_s, batch_first=True),
        "coords": pad(rows_c, batch_first=True),
        "valid": valid,
        "num_rows": torch.tensor(num_rows, dtype=torch.int64),
        "cond": torch.stack([torch.as_tensor(s["cond"], dtype=torch.float32) for s in samples]),
        "masks": torch.stack([torch.as_tensor(s["grid_mask"], dtype=torch.int64) for s in samples]),
        "pixel_masks": torch.stack([torch.as_tensor(s["mask"]) for s in samples]).long(),
        "num_parts": torch.tensor(counts, dtype=torch.int64),
        **_part_targets(samples),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
    }


def make_loader(
    dataset: ArticulatedDataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of collate_parts batches whose shuffling order is fixed by `seed`."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_parts,
        persistent_workers=num_workers > 0,
    )
