"""On-disk format of an articulated-object dataset (format_version 2).

A dataset is a folder::

    DATASET/
      dataset.json
      samples/sample_000000.npz
      samples/sample_000001.npz
      ...

`dataset.json` describes every sample of the folder:

    format_version   2 (1: the project's first articulation encoding, refused)
    name             free-form dataset name
    resolution       R: structure latents are [K, latent_channels, R, R, R]
    latent_channels  channels of the structure latents (optional, default 8 as in TRELLIS/PAct)
    image_size       [H, W] of the image and its pixel mask
    grid             [h, w] patch grid of the image tokens; H = h * patch, W = w * patch
                     with one patch size for both axes
    cond_channels    C: width of the image tokens
    prefix_tokens    tokens before the h*w patch tokens (DINOv2 cls + registers: 5)
    num_samples      samples/sample_{i:06d}.npz exists for i = 0 .. num_samples - 1
    max_parts        upper bound on the part count K of a sample
    voxel_resolution G of the Stage2 voxel sets (optional; present with voxel_channels
                     exactly when every sample carries voxels, see below)
    voxel_channels   C2: latent channels per voxel (optional, as voxel_resolution)
    generator        how the data was made (synthetic generator settings) or null (optional)

Each `samples/sample_{i:06d}.npz` is a plain NumPy archive (no pickled objects) of one
object with K parts (1 <= K <= max_parts), part 0 being the base/body:

    image         uint8    [H, W, 3]             RGB render or photo of the object
    mask          uint8    [H, W]                0 background, k + 1 where part k is visible
    latents       float32  [K, latent_channels, R, R, R]   per-part structure latents
    articulation  float32  [K, 24]               articulation vectors (articulation.py:
                                                 PAct's encoding, articulation.ENCODING)
    cond          float16 or float32 [L, C]      image tokens, L = prefix_tokens + h * w:
                                                 prefix tokens first, then patch tokens
                                                 row by row
    part_labels   int64    [K]                   semantic label ids 0..7 (articulation.LABELS)
    joint_types   int64    [K]                   joint type ids 1..5 (articulation.JOINT_TYPES)

All floating values are finite; `mask` holds no label above K; `articulation` rows decode
to the row's `joint_types` and `part_labels` entries. A part may be invisible (no pixel of
`mask` is k + 1), e.g. a handle hidden behind its door. Readers ignore other keys. The
[h, w] masks the model takes are derived, not stored: `grid_mask` gives each patch its
majority pixel label (ties: the smallest label).

Optional provenance keys (written when given, checked when present, returned by
`load_sample`; the converter of PAct's layout, pact.py, writes all three):

    source        str (NumPy unicode scalar)     the object the sample comes from
    view          integer  scalar                its conditioning view
    split         str (NumPy unicode scalar)     "train" or "test": PAct's view split

Version 2 changed the articulation vector to PAct's encoding (articulation.py); a version 1
dataset.json is refused with one sentence, since its vectors would be misread (range pair
tiled, first axis component made positive, zero origin for fixed parts).

Voxels (Stage2). A dataset whose dataset.json names `voxel_resolution` G and
`voxel_channels` C2 stores, in every sample, the occupied voxels of the whole object and
of each part with their structured-latent features (TRELLIS SLat: 64^3, 8 channels), as
one sparse list of V voxels:

    voxel_coords  int16    [V, 4]                (row, x, y, z): row 0 is the whole object,
                                                 row k + 1 is part k (as in `mask`);
                                                 x, y, z in 0..G-1 (index order of `latents`)
    voxel_feats   float16 or float32 [V, C2]     latent features of each voxel

Rows are stored in canonical order: (row, x, y, z) strictly increasing, so every voxel of
a row appears once. Every row has at least one voxel, and row 0 is exactly the union of
the part rows' voxels (PAct's whole-object row); features are per row, so a voxel shared
by two parts may carry different features in each. The layout is the batch layout of
Stage2 (whole object first), with no per-row padding on disk. Real users encode their
objects with the TRELLIS SLat encoder; the synthetic generator stores the surface voxels
of each part with the stand-in features of `synthetic.StandInVoxelEncoder`. Datasets
without voxels (Stage1 only) leave both dataset.json keys out, and their samples carry no
voxel keys.
The loader derives PAct's training rows from these arrays (`loader.pact_latents`: the
ownership channel that makes the model's 9th latent channel, and each part's context
voxels); nothing of that is stored.

`write_sample` and `write_dataset_spec` write atomically (a temp file in the same folder,
then os.replace) and store the arrays with fixed zip timestamps, so equal arrays give
byte-identical files; `load_sample` and `read_dataset_spec` validate everything above and
raise DataError with one sentence naming the file.

`image`/`mask` are what a user would see; `latents` and `cond` come from encoders that
users run themselves (TRELLIS sparse-structure VAE, DINOv2-L/14-reg); the synthetic
generator uses the stand-ins of encoder.py instead.
"""

import json
import os
import uuid
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from pact_ray.data.objects.articulation import ARTICULATION_DIM, JOINT_TYPES, LABELS, decode_articulation
from pact_ray.errors import DataError

FORMAT_VERSION = 2
# What version 1 meant: the reason it is refused.
_OLD_VERSIONS = {
    1: "stores articulation vectors in the project's first encoding (range pair tiled, first axis component "
       "made positive, zero origin for fixed parts), not PAct's; regenerate it (pact-object-data) or convert "
       "it again (pact-object-data from-pact)",
}
DATASET_FILE = "dataset.json"
SAMPLES_DIR = "samples"

# Allowed dtypes of every sample key, in the order they are written.
SAMPLE_DTYPES: dict[str, tuple[np.dtype, ...]] = {
    "image": (np.dtype(np.uint8),),
    "mask": (np.dtype(np.uint8),),
    "latents": (np.dtype(np.float32),),
    "articulation": (np.dtype(np.float32),),
    "cond": (np.dtype(np.float16), np.dtype(np.float32)),
    "part_labels": (np.dtype(np.int64),),
    "joint_types": (np.dtype(np.int64),),
}
_FLOAT_KEYS = ("latents", "articulation", "cond")
# Optional provenance keys (any or none of them).
SOURCE_KEYS = ("source", "view", "split")
# The Stage2 voxel keys: present in every sample of a dataset with voxels, in no other.
VOXEL_DTYPES: dict[str, tuple[np.dtype, ...]] = {
    "voxel_coords": (np.dtype(np.int16),),
    "voxel_feats": (np.dtype(np.float16), np.dtype(np.float32)),
}
# What NumPy raises for truncated, corrupt or pickled files.
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
# Fixed zip timestamp, so that the same arrays always give the same bytes.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class DatasetSpec:
    """What `dataset.json` says about every sample of a dataset folder."""

    name: str  # free-form dataset name
    resolution: int  # R of the structure latents [K, latent_channels, R, R, R]
    image_size: tuple[int, int]  # (H, W) of image and mask
    grid: tuple[int, int]  # (h, w) patch grid of the image tokens
    cond_channels: int  # C, width of the image tokens
    prefix_tokens: int  # cls + register tokens before the patch tokens
    num_samples: int  # number of sample files
    max_parts: int  # upper bound on K
    latent_channels: int = 8  # channels of the structure latents
    voxel_resolution: int | None = None  # G of the Stage2 voxel sets; None = no voxels
    voxel_channels: int | None = None  # C2, latent channels per voxel (set with voxel_resolution)
    generator: dict[str, Any] | None = None  # how the data was made, or None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version in _OLD_VERSIONS:
            raise ValueError(f"format_version {self.format_version} {_OLD_VERSIONS[self.format_version]}.")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported (this reader handles {FORMAT_VERSION})."
            )
        for name in ("resolution", "latent_channels", "cond_channels", "max_parts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        for name in ("prefix_tokens", "num_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}.")
        if (self.voxel_resolution is None) != (self.voxel_channels is None):
            raise ValueError("voxel_resolution and voxel_channels must be given together.")
        if self.has_voxels and not (1 <= self.voxel_resolution <= np.iinfo(np.int16).max and self.voxel_channels >= 1):
            raise ValueError(
                f"voxel_resolution must be in 1..{np.iinfo(np.int16).max} and voxel_channels positive, "
                f"got {self.voxel_resolution} and {self.voxel_channels}."
            )
        (height, width), (h, w) = self.image_size, self.grid
        if min(height, width, h, w) < 1 or height % h or width % w or height // h != width // w:
            raise ValueError(
                f"image_size {list(self.image_size)} must be grid {list(self.grid)} times one patch size."
            )

    @property
    def patch(self) -> int:
        """Pixels per patch side: H // h."""
        return self.image_size[0] // self.grid[0]

    @property
    def num_tokens(self) -> int:
        """L = prefix_tokens + h * w."""
        return self.prefix_tokens + self.grid[0] * self.grid[1]

    @property
    def has_voxels(self) -> bool:
        """Whether every sample carries the Stage2 voxel sets."""
        return self.voxel_resolution is not None

    def to_json(self) -> str:
        """The dataset.json text (keys in the documented order)."""
        record = {
            "format_version": self.format_version,
            "name": self.name,
            "resolution": self.resolution,
            "latent_channels": self.latent_channels,
            "image_size": list(self.image_size),
            "grid": list(self.grid),
            "cond_channels": self.cond_channels,
            "prefix_tokens": self.prefix_tokens,
            "num_samples": self.num_samples,
            "max_parts": self.max_parts,
        }
        if self.has_voxels:  # left out otherwise: Stage1 datasets keep their exact dataset.json
            record.update(voxel_resolution=self.voxel_resolution, voxel_channels=self.voxel_channels)
        record["generator"] = self.generator
        return json.dumps(record, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = DATASET_FILE) -> "DatasetSpec":
        """Parse dataset.json text; any problem raises DataError naming `source`."""
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno}).") from exc
        if not isinstance(record, dict):
            raise DataError(f"{source}: expected a JSON object, got {type(record).__name__}.")
        names = [f.name for f in fields(cls)]
        optional = {"latent_channels", "voxel_resolution", "voxel_channels", "generator"}
        missing = [n for n in names if n not in record and n not in optional]
        if missing:
            raise DataError(f"{source}: missing key {', '.join(missing)}.")
        unknown = sorted(set(record) - set(names))
        if unknown:
            raise DataError(f"{source}: unknown key {', '.join(unknown)}.")
        values = dict(record)
        for name in names:
            if name in ("name", "generator") or name not in values:
                continue
            if name in ("voxel_resolution", "voxel_channels") and values[name] is None:
                continue
            value = values[name]
            if name in ("image_size", "grid"):
                if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)):
                    raise DataError(f"{source}: {name} must be a list of two integers, got {value!r}.")
                values[name] = tuple(value)
            elif not _is_int(value):
                raise DataError(f"{source}: {name} must be an integer, got {value!r}.")
        if not isinstance(values["name"], str):
            raise DataError(f"{source}: name must be a string, got {values['name']!r}.")
        if values.get("generator") is not None and not isinstance(values["generator"], dict):
            raise DataError(f"{source}: generator must be an object or null, got {values['generator']!r}.")
        try:
            return cls(**values)
        except ValueError as exc:
            raise DataError(f"{source}: {exc}") from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sample_path(folder: str | os.PathLike, index: int) -> Path:
    """Path of sample `index` inside a dataset folder."""
    return Path(folder) / SAMPLES_DIR / f"sample_{index:06d}.npz"


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a new temp file beside `path`, then os.replace it into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_dataset_spec(folder: str | os.PathLike, spec: DatasetSpec) -> Path:
    """Write `folder/dataset.json` atomically (creating the folder); returns its path."""
    path = Path(folder) / DATASET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: f.write(spec.to_json().encode()))
    return path


def read_dataset_spec(folder: str | os.PathLike) -> DatasetSpec:
    """Read and validate `folder/dataset.json`; problems raise DataError naming the path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: dataset folder does not exist.")
    path = folder / DATASET_FILE
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found; a dataset folder needs a {DATASET_FILE}.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({exc}).") from exc
    return DatasetSpec.from_json(text, source=str(path))


def write_sample(folder: str | os.PathLike, index: int, sample: Mapping[str, np.ndarray]) -> Path:
    """Write one sample to `folder/samples/sample_{index:06d}.npz` atomically; returns its path.

    `sample` must hold exactly the keys of SAMPLE_DTYPES, plus both keys of VOXEL_DTYPES
    or neither, plus any of SOURCE_KEYS (see the module docstring); the arrays are written
    as given, in a fixed order and with fixed zip timestamps, so equal arrays give
    byte-identical files.
    Contents are checked on reading (`load_sample`).
    """
    keys = list({**SAMPLE_DTYPES, **VOXEL_DTYPES} if any(k in sample for k in VOXEL_DTYPES) else SAMPLE_DTYPES)
    missing = [k for k in keys if k not in sample]
    keys += [k for k in SOURCE_KEYS if k in sample]
    unknown = sorted(set(sample) - set(keys))
    if missing or unknown:
        raise ValueError(f"sample {index} has missing keys {missing} and unknown keys {unknown}.")
    path = sample_path(folder, index)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
            for key in keys:
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE_TIME)
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(sample[key], order="C"), allow_pickle=False)

    _atomic_write(path, write)
    return path


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: file not found.")
    try:
        archive = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot be read as an .npz archive ({exc}).") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single .npy array, not an .npz archive of named arrays.")
    try:
        with archive:
            return {key: archive[key] for key in archive.files}
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot be read as an .npz archive ({exc}).") from exc


def _shape_text(shape: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def load_sample(path: str | os.PathLike, spec: DatasetSpec) -> dict[str, np.ndarray]:
    """Read and validate one sample file against `spec`; returns the arrays of SAMPLE_DTYPES
    (and of VOXEL_DTYPES when the spec has voxels, and the SOURCE_KEYS the file holds).

    Every problem raises DataError with one sentence naming the file: unreadable or not an
    .npz, missing key, wrong dtype, shape inconsistent with spec or with the other arrays,
    part count outside 1..max_parts, non-finite values, mask label above K, ids out of
    range, articulation rows that disagree with joint_types/part_labels, and voxel sets
    that break the rules of the module docstring.
    """
    path = Path(path)
    arrays = _read_npz(path)
    dtypes_of = {**SAMPLE_DTYPES, **VOXEL_DTYPES} if spec.has_voxels else SAMPLE_DTYPES
    for key, dtypes in dtypes_of.items():
        if key not in arrays:
            raise DataError(f"{path}: missing key '{key}' (a sample needs {', '.join(dtypes_of)}).")
        if arrays[key].dtype not in dtypes:
            expected = " or ".join(str(d) for d in dtypes)
            raise DataError(f"{path}: {key} has dtype {arrays[key].dtype}, expected {expected}.")
    sample = {key: arrays[key] for key in dtypes_of}
    for key in SOURCE_KEYS:
        if key in arrays:
            value = arrays[key]
            kind = "i" if key == "view" else "U"
            if value.shape != () or value.dtype.kind != kind:
                expected = "an integer scalar" if key == "view" else "a string scalar"
                raise DataError(f"{path}: {key} must be {expected}, got {value.dtype} of shape {_shape_text(value.shape)}.")
            sample[key] = value

    labels = sample["part_labels"]
    if labels.ndim != 1:
        raise DataError(
            f"{path}: part_labels has shape {_shape_text(labels.shape)}, expected (K,) with one label per part."
        )
    num_parts = labels.shape[0]
    if not 1 <= num_parts <= spec.max_parts:
        raise DataError(f"{path}: sample has K = {num_parts} parts, expected 1 to max_parts = {spec.max_parts}.")
    height, width = spec.image_size
    r = spec.resolution
    expected_shapes: dict[str, tuple[int | str, ...]] = {
        "image": (height, width, 3),
        "mask": (height, width),
        "latents": ("K", spec.latent_channels, r, r, r),
        "articulation": ("K", ARTICULATION_DIM),
        "cond": (spec.num_tokens, spec.cond_channels),
        "joint_types": ("K",),
    }
    for key, expected in expected_shapes.items():
        actual = sample[key].shape
        if actual != tuple(num_parts if s == "K" else s for s in expected):
            with_k = f" with K = {num_parts} parts" if "K" in expected else ""
            raise DataError(
                f"{path}: {key} has shape {_shape_text(actual)}, expected {_shape_text(expected)}{with_k}."
            )

    for key in _FLOAT_KEYS:
        bad = int(np.count_nonzero(~np.isfinite(sample[key])))
        if bad:
            raise DataError(f"{path}: {key} contains {bad} non-finite values (NaN or inf).")
    top = int(sample["mask"].max())
    if top > num_parts:
        raise DataError(
            f"{path}: mask contains label {top} but the sample has only K = {num_parts} parts (labels 0..K)."
        )
    joint_types = sample["joint_types"]
    low, high = min(JOINT_TYPES.values()), max(JOINT_TYPES.values())
    if ((joint_types < low) | (joint_types > high)).any():
        raise DataError(
            f"{path}: joint_types {joint_types.tolist()} must be ids {low}..{high} ({', '.join(JOINT_TYPES)})."
        )
    if ((labels < 0) | (labels >= len(LABELS))).any():
        raise DataError(
            f"{path}: part_labels {labels.tolist()} must be ids 0..{len(LABELS) - 1} ({', '.join(LABELS)})."
        )
    decoded = decode_articulation(sample["articulation"])
    for key, stored in (("joint_type", joint_types), ("label", labels)):
        wrong = np.flatnonzero(decoded[key] != stored)
        if wrong.size:
            k = int(wrong[0])
            name = "joint_types" if key == "joint_type" else "part_labels"
            raise DataError(
                f"{path}: articulation row {k} encodes {key} {int(decoded[key][k])} "
                f"but {name}[{k}] is {int(stored[k])}."
            )
    if spec.has_voxels:
        _check_voxels(path, sample["voxel_coords"], sample["voxel_feats"], num_parts, spec)
    return sample


def _check_voxels(path: Path, coords: np.ndarray, feats: np.ndarray, num_parts: int, spec: DatasetSpec) -> None:
    """The voxel rules of the module docstring; coords int16 [V, 4], feats [V, C2]."""
    g = spec.voxel_resolution
    if coords.ndim != 2 or coords.shape[1] != 4 or coords.shape[0] < 1:
        raise DataError(f"{path}: voxel_coords has shape {_shape_text(coords.shape)}, expected (V, 4) with V >= 1.")
    if feats.shape != (coords.shape[0], spec.voxel_channels):
        raise DataError(
            f"{path}: voxel_feats has shape {_shape_text(feats.shape)}, "
            f"expected {_shape_text(('V', spec.voxel_channels))} with V = {coords.shape[0]} voxels."
        )
    c = coords.astype(np.int64)
    rows, xyz = c[:, 0], c[:, 1:]
    if rows.min() < 0 or rows.max() > num_parts:
        raise DataError(f"{path}: voxel_coords has rows {rows.min()}..{rows.max()}, expected 0..K = 0..{num_parts}.")
    if xyz.min() < 0 or xyz.max() >= g:
        raise DataError(f"{path}: voxel_coords has x, y, z in {xyz.min()}..{xyz.max()}, expected 0..{g - 1}.")
    cell = (xyz[:, 0] * g + xyz[:, 1]) * g + xyz[:, 2]
    key = rows * g**3 + cell
    if (np.diff(key) <= 0).any():
        raise DataError(f"{path}: voxel_coords is not in canonical order ((row, x, y, z) strictly increasing).")
    counts = np.bincount(rows, minlength=num_parts + 1)
    if (counts == 0).any():
        empty = int(np.flatnonzero(counts == 0)[0])
        raise DataError(f"{path}: voxel row {empty} has no voxel (every row of K = {num_parts} parts needs one).")
    whole, parts = cell[rows == 0], np.unique(cell[rows > 0])
    if whole.shape != parts.shape or (whole != parts).any():
        raise DataError(f"{path}: voxel row 0 ({whole.size} voxels) is not the union of the part rows ({parts.size} voxels).")
    bad = int(np.count_nonzero(~np.isfinite(feats)))
    if bad:
        raise DataError(f"{path}: voxel_feats contains {bad} non-finite values (NaN or inf).")


def grid_mask(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Majority label per patch: mask [H, W] non-negative ints -> int64 [h, w].

    H and W must be multiples of h and w. Ties go to the smallest label.
    """
    height, width = mask.shape
    h, w = grid
    if height % h or width % w:
        raise ValueError(f"mask of shape {mask.shape} does not split into a {h}x{w} grid.")
    labels = mask.astype(np.int64).reshape(h, height // h, w, width // w).transpose(0, 2, 1, 3).reshape(h * w, -1)
    if labels.size and labels.min() < 0:
        raise ValueError("mask labels must not be negative.")
    num_labels = int(labels.max()) + 1
    keys = (np.arange(h * w)[:, None] * num_labels + labels).ravel()
    counts = np.bincount(keys, minlength=h * w * num_labels).reshape(h * w, num_labels)
    return counts.argmax(axis=1).reshape(h, w)  # argmax returns the first (smallest) maximum


def grid_mask_batch(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Batched `grid_mask`: masks [B, H, W] non-negative ints -> int64 [B, h, w] on the same device."""
    batch, height, width = masks.shape
    h, w = grid
    if height % h or width % w:
        raise ValueError(f"masks of shape {tuple(masks.shape)} do not split into a {h}x{w} grid.")
    labels = masks.long().reshape(batch, h, height // h, w, width // w).permute(0, 1, 3, 2, 4)
    labels = labels.reshape(batch * h * w, -1)
    if labels.numel() and labels.min() < 0:
        raise ValueError("mask labels must not be negative.")
    num_labels = int(labels.max()) + 1
    cells = torch.arange(batch * h * w, device=masks.device)[:, None]
    counts = torch.bincount((cells * num_labels + labels).ravel(), minlength=batch * h * w * num_labels)
    return counts.reshape(batch * h * w, num_labels).argmax(dim=1).reshape(batch, h, w)
