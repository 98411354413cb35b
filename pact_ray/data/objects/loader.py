"""Torch dataset over a dataset folder (format.py), the part-wise batches Stage1 takes and
the sparse voxel batches Stage2 takes."""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pact_ray.data.objects.articulation import validity_mask
from pact_ray.data.objects.format import DATASET_FILE, DatasetSpec, grid_mask, load_sample, read_dataset_spec, sample_path
from pact_ray.errors import DataError

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

    @property
    def groups(self) -> np.ndarray | None:
        """The object of each sample (int64 [num_samples]) where the dataset records it
        (``generator["objects"]``: [source, number of samples] in sample order, as
        ``pact-object-data from-pact`` writes it); None where every sample is its own object."""
        objects = (self.spec.generator or {}).get("objects")
        if not objects:
            return None
        counts = [int(count) for _, count in objects]
        if sum(counts) != self.spec.num_samples:
            raise DataError(f"{self.folder / DATASET_FILE}: generator.objects counts {sum(counts)} samples, "
                            f"but num_samples is {self.spec.num_samples}.")
        return np.repeat(np.arange(len(counts)), counts)

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


# PAct's ownership channel (its dataset's preset_alpha): the 9th latent channel is +OWNERSHIP
# on a part's own voxels and -OWNERSHIP on its context voxels.
OWNERSHIP = 6.0


def _cell_keys(xyz: np.ndarray) -> np.ndarray:
    """xyz int [V, 3] -> one int64 key per cell, increasing in (x, y, z) order."""
    radix = 1 << 15  # above every int16 coordinate
    return (xyz[:, 0].astype(np.int64) * radix + xyz[:, 1]) * radix + xyz[:, 2]


def pact_latents(coords: np.ndarray, feats: np.ndarray, num_parts: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The rows of one object as PAct's Stage2 trains on them: the voxels and their
    9-channel latents (the C2 stored channels, then the ownership channel).

    coords int16 [V, 4] (row, x, y, z) and feats [V, C2]: one sample's voxel sets
    (format.py). Returns K + 1 pairs (xyz int64 [n_r, 3], latents float32 [n_r, C2 + 1]),
    the whole object first, each in (x, y, z) order:

    - part row r: its own voxels (stored features, ownership +OWNERSHIP) and its *context
      voxels*: the cells of the other parts strictly inside r's bounding box that r does not
      own (features 0, ownership -OWNERSHIP), as PAct's dataset adds them
      (``adding_slat_noise``); the model learns to tell the part from what surrounds it;
    - the whole-object row: its stored voxels and features; its ownership is the mean over
      the part rows that hold the cell (PAct merges the rows' duplicates by their mean):
      OWNERSHIP (n_own - n_ctx) / (n_own + n_ctx).
    """
    bounds = np.searchsorted(coords[:, 0], np.arange(num_parts + 2))
    rows = [(coords[lo:hi, 1:].astype(np.int64), feats[lo:hi].astype(np.float32)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    cells = coords[bounds[1]:, 1:].astype(np.int64)  # every part's cells, rows 1..K
    owner = coords[bounds[1]:, 0]
    whole_keys = _cell_keys(rows[0][0])
    votes = np.zeros((len(whole_keys), 2))  # per whole-object cell: (n_own, n_ctx)
    out = []
    for r in range(1, num_parts + 1):
        xyz, f = rows[r]
        own = _cell_keys(xyz)
        inside = (owner != r) & np.all((cells > xyz.min(0)) & (cells < xyz.max(0)), axis=1)
        ctx_keys, first = np.unique(_cell_keys(cells[inside]), return_index=True)
        keep = ~np.isin(ctx_keys, own)
        ctx_keys, ctx_xyz = ctx_keys[keep], cells[inside][first[keep]]
        np.add.at(votes[:, 0], np.searchsorted(whole_keys, own), 1)
        np.add.at(votes[:, 1], np.searchsorted(whole_keys, ctx_keys), 1)
        keys = np.concatenate([own, ctx_keys])
        latent = np.concatenate([
            np.concatenate([f, np.full((len(f), 1), OWNERSHIP, np.float32)], axis=1),
            np.concatenate([np.zeros((len(ctx_keys), f.shape[1]), np.float32), np.full((len(ctx_keys), 1), -OWNERSHIP, np.float32)], axis=1),
        ])
        order = np.argsort(keys, kind="stable")
        out.append((np.concatenate([xyz, ctx_xyz])[order], latent[order]))
    whole = OWNERSHIP * (votes[:, 0] - votes[:, 1]) / votes.sum(1)
    out.insert(0, (rows[0][0], np.concatenate([rows[0][1], whole[:, None].astype(np.float32)], axis=1)))
    return out


def collate_voxels(
    samples: Sequence[Mapping[str, Any]],
    max_tokens: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Batch B objects (items of an ArticulatedDataset with voxels) as one sparse voxel list.

    Each object contributes K + 1 rows (:func:`pact_latents`), the whole object first, then
    its parts; N = sum(K + 1), P = sum(K); the rows are numbered 0..N-1 across the batch and
    their voxels are contiguous (T in all). A row with more than `max_tokens` voxels keeps a
    uniform random subset of that size drawn from `generator` (kept in order).
      coords       int64   [T, 4]      (row, x, y, z), x, y, z in 0..G-1
      latents      float32 [T, C2 + 1] the structured latents, then PAct's ownership channel
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
    coords, latents, num_rows = [], [], []
    counts = [len(s["part_labels"]) for s in samples]
    for s, k in zip(samples, counts):
        rows = pact_latents(s["voxel_coords"], s["voxel_feats"], k)
        num_rows.append(len(rows))
        for xyz, latent in rows:
            if max_tokens is not None and len(xyz) > max_tokens:
                keep = torch.randperm(len(xyz), generator=generator)[:max_tokens].sort().values.numpy()
                xyz, latent = xyz[keep], latent[keep]
            coords.append(np.concatenate([np.full((len(xyz), 1), len(coords)), xyz], axis=1))
            latents.append(latent)
    return {
        "coords": torch.from_numpy(np.concatenate(coords)),
        "latents": torch.from_numpy(np.concatenate(latents)),
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
