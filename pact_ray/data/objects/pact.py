"""PAct's training layout, read the way PAct's own dataset classes read it.

PAct-project/PAct, commit d974309: ``modules/pact/datasets/components.py``,
``sparse_structure_latent.py``, ``structured_latent.py`` and ``modules/utils/part_utils.py``.
docs/pact_layout.md describes the layout, what this module reproduces and the quirks of
PAct's loader it keeps or leaves out; ../shared/fixtures/pact_layout_tiny/README.md states
every formula. `object_samples` turns one object folder into the samples of format.py, one
per conditioning view, and `convert` (the CLI `main`) a whole root, in a process pool:

- parts in PAct's order (ascending transformed aabb minimum by (z, y, x), stable);
- ``latents``: the parts' ``ss_latents`` ``mean`` arrays (Stage1's ``x_0``);
- ``articulation``: PAct's ``x_0_arti`` (articulation.py), its mask being
  ``articulation.validity_mask`` of the joint types;
- ``voxel_coords``/``voxel_feats``: each part's SLat voxels and features (row k + 1), and the
  whole object (row 0) as PAct merges the part rows: the union, each voxel's features the
  mean over the parts that hold it (PAct's noise voxels, derived from the parts' voxels,
  are not stored: docs/pact_layout.md);
- ``image``: PAct's conditioning image (alpha-box crop, black background, 518 px LANCZOS);
  ``mask``: PAct's 37 x 37 part mask, each cell widened to its 14 x 14 pixels so that
  format.grid_mask gives back exactly PAct's cells, relabelled from ``id + 1`` to the part's
  position + 1; ``cond``: the image's tokens, from PAct's DINOv2 (dinov2.py, with
  ``--image-encoder dinov2 --encoder-weights FILE``) or the stand-in encoder (encoder.py);
- ``source`` (``<root name>/<object name>``, PAct's 2-part split tag), ``view`` and
  ``split`` ("train" for views 00-17, "test" for 18-19).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pact_ray.data.objects.articulation import (
    JOINT_TYPES,
    LABEL_IDS,
    encode_articulation_batch,
)
from pact_ray.errors import DataError

PACT_COMMIT = "d974309"
PREPROCESS = "trellis_part_preprocess"  # an object folder is a root's sub-folder holding this
OBJECT_JSON = "object_merge_fixed.json"
TRANSFORMS = f"{PREPROCESS}/render_merged_fixed_eevee/full/transforms.json"
SS_LATENTS = f"{PREPROCESS}/ss_latents/ss_enc_conv3d_16l8_fp16"
SLAT_LATENTS = f"{PREPROCESS}/latents/dinov2_vitl14_reg_slat_enc_swin8_B_64l8_fp16"
IMAGES = "imgs"
MASKS = "imgs/semantic_masks_merge_fixed"

TRAIN_VIEWS = range(0, 18)  # PAct's training views; its test views are 18 and 19
TEST_VIEWS = range(18, 20)
MAX_PARTS = 8  # PAct drops objects with more parts from training
SS_SHAPE = (8, 16, 16, 16)
VOXEL_GRID = 64
SLAT_CHANNELS = 8
IMAGE_SIZE = 518
MASK_GRID = 37
PATCH = 14
CROP_RATIO = 1.2  # TRELLIS's aug_size_ratio
# PartNet (y up) -> TRELLIS/Blender (z up): (x, y, z) -> (x, -z, y).
ROTATION = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


@dataclass(frozen=True)
class Part:
    """One node of object_merge_fixed.json, in PAct's transformed frame."""

    id: int
    name: str
    joint_type: int
    limit: float  # joint.range[1], untransformed
    origin: np.ndarray  # float64 [3]: scale * R origin + offset
    direction: np.ndarray  # float64 [3]: R direction (not scaled, not normalised)
    aabb_min: np.ndarray  # float64 [3]
    aabb_max: np.ndarray  # float64 [3]

    @property
    def centre(self) -> np.ndarray:
        """PAct's aabb centre: (max + min) / 2 in float32."""
        return (self.aabb_max.astype(np.float32) + self.aabb_min.astype(np.float32)) / np.float32(2)

    @property
    def stem(self) -> str:
        """File stem of the part's latents: part_{id}_{name}."""
        return f"part_{self.id}_{self.name}"


def _json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: file not found; a PAct object folder needs it.")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as JSON ({exc}).") from exc


def _npz(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: missing {what}.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read as an .npz archive ({exc}).") from exc


def _vector(value: Any, path: Path, where: str) -> np.ndarray:
    try:
        out = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        out = np.zeros(0)
    if out.shape != (3,) or not np.isfinite(out).all():
        raise DataError(f"{path}: {where} must be three finite numbers, got {value!r}.")
    return out


def find_objects(root: str | Path) -> list[Path]:
    """The object folders of a PAct dataset root: its immediate sub-folders that hold
    trellis_part_preprocess/ (PAct's ``prepare_meta``), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root does not exist or is not a folder.")
    objects = sorted(p for p in root.iterdir() if (p / PREPROCESS).is_dir())
    if not objects:
        raise DataError(f"{root}: not a PAct dataset root (no sub-folder holds {PREPROCESS}/).")
    return objects


def read_split(path: str | Path) -> dict[str, set[str]]:
    """PAct's split file {"train": [...], "test": [...]} as sets of path tails."""
    path = Path(path)
    record = _json(path)
    if not isinstance(record, dict) or not all(
        isinstance(record.get(k, []), list) and all(isinstance(x, str) for x in record.get(k, [])) for k in ("train", "test")
    ):
        raise DataError(f"{path}: a split file must be a JSON object with lists of paths under 'train' and 'test'.")
    return {k: set(record.get(k, [])) for k in ("train", "test")}


def object_splits(folder: Path, split: Mapping[str, set[str]] | None) -> tuple[str, ...]:
    """The splits an object belongs to: PAct uses an object when the last 2, 3 or 4 parts of
    its absolute path, joined by '/', are listed; with no split file, every object is in both."""
    if split is None:
        return ("train", "test")
    parts = folder.resolve().parts
    tails = {"/".join(parts[-n:]) for n in (2, 3, 4)}
    return tuple(name for name in ("train", "test") if tails & split[name])


def read_parts(folder: Path) -> tuple[list[Part], list[int]]:
    """The parts of one object in PAct's order (``prepaer_parts_meta``, part_utils.py l.417),
    and every id of the JSON.

    Nodes with no aabb centre or size are dropped, as PAct does (their ids stay valid mask
    labels, read as background).
    """
    path = folder / OBJECT_JSON
    record = _json(path)
    nodes = record.get("diffuse_tree") if isinstance(record, dict) else None
    if not isinstance(nodes, list) or not nodes:
        raise DataError(f"{path}: not in PAct's layout (needs a non-empty 'diffuse_tree' list of parts).")
    transforms = _json(folder / TRANSFORMS)
    try:
        scale = float(transforms["scale"])
        offset = _vector(transforms["offset"], folder / TRANSFORMS, "offset")
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{folder / TRANSFORMS}: needs a number 'scale' and three numbers 'offset'.") from exc
    # A trimesh Box rotated by R: its new aabb is taken over the 8 rotated corners.
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=bool)
    parts, ids = [], set()
    for n, node in enumerate(nodes):
        where = f"diffuse_tree[{n}]"
        part_id = node.get("id") if isinstance(node, dict) else None
        if not isinstance(part_id, int) or isinstance(part_id, bool) or part_id < 0 or part_id in ids:
            raise DataError(f"{path}: {where} has id {part_id!r}; ids must be distinct non-negative integers.")
        ids.add(part_id)
        aabb = node.get("aabb")
        if not isinstance(aabb, dict) or "center" not in aabb or "size" not in aabb:
            continue  # PAct drops the node
        try:
            name, joint = node["name"], node["joint"]
            kind, limit, axis = joint["type"], joint["range"][1], joint["axis"]
            origin, direction = axis["origin"], axis["direction"]
        except (KeyError, IndexError, TypeError) as exc:
            raise DataError(f"{path}: {where} lacks name, joint.type, joint.range or joint.axis ({exc!r}).") from exc
        if name not in LABEL_IDS:
            raise DataError(f"{path}: {where} has name {name!r}, not one of PAct's labels ({', '.join(LABEL_IDS)}).")
        if kind not in JOINT_TYPES:
            raise DataError(f"{path}: {where} has joint type {kind!r}, not one of {', '.join(JOINT_TYPES)}.")
        if not isinstance(limit, (int, float)) or isinstance(limit, bool) or not math.isfinite(limit):
            raise DataError(f"{path}: {where} has joint range {joint['range']!r}; range[1] must be a number.")
        centre = _vector(aabb["center"], path, f"{where}.aabb.center").astype(np.float32)
        size = _vector(aabb["size"], path, f"{where}.aabb.size").astype(np.float32)
        low, high = (centre - size * np.float32(0.5)).astype(np.float64), (centre + size * np.float32(0.5)).astype(np.float64)
        rotated = np.where(corners, high, low) @ ROTATION.T
        parts.append(Part(
            id=part_id, name=name, joint_type=JOINT_TYPES[kind], limit=float(limit),
            origin=scale * (ROTATION @ _vector(origin, path, f"{where}.joint.axis.origin")) + offset,
            direction=ROTATION @ _vector(direction, path, f"{where}.joint.axis.direction"),
            aabb_min=scale * rotated.min(0) + offset, aabb_max=scale * rotated.max(0) + offset,
        ))
    if not parts:
        raise DataError(f"{path}: no part has an aabb with center and size.")
    parts.sort(key=lambda p: (p.aabb_min[2], p.aabb_min[1], p.aabb_min[0]))  # stable: ties keep JSON order
    return parts, sorted(ids)


def articulation(parts: Sequence[Part]) -> np.ndarray:
    """PAct's x_0_arti of the parts, float32 [K, 24]."""
    return encode_articulation_batch(
        [p.joint_type for p in parts], [p.direction for p in parts], [p.origin for p in parts],
        [p.centre for p in parts], [p.limit for p in parts], [LABEL_IDS[p.name] for p in parts],
    )


def structure_latents(folder: Path, parts: Sequence[Part]) -> np.ndarray:
    """Stage1's x_0: the parts' ss_latents ``mean`` arrays, float32 [K, 8, 16, 16, 16].

    full.npz must exist (PAct loads it) but is not part of x_0.
    """
    _npz(folder / SS_LATENTS / "full.npz", "latent (the whole object's ss_latents)")
    out = []
    for p in parts:
        path = folder / SS_LATENTS / f"{p.stem}.npz"
        if not path.is_file():
            raise DataError(f"{path}: missing latent of part id {p.id} ({p.name}), which {OBJECT_JSON} lists.")
        mean = _npz(path, "latent").get("mean")
        if mean is None or mean.shape != SS_SHAPE or not np.isfinite(mean).all():
            shape = None if mean is None else mean.shape
            raise DataError(f"{path}: needs a finite array 'mean' of shape {SS_SHAPE}, got {shape}.")
        out.append(mean.astype(np.float32))
    return np.stack(out)


def voxel_sets(folder: Path, parts: Sequence[Part]) -> tuple[np.ndarray, np.ndarray]:
    """The Stage2 voxels of format.py from the parts' SLat latents: voxel_coords int16 [V, 4]
    (row 0 the union, row k + 1 part k; canonical order) and voxel_feats float32 [V, 8]
    (row 0: the mean of the part rows' features at each voxel, PAct's merge without noise)."""
    rows = []
    for k, p in enumerate(parts):
        path = folder / SLAT_LATENTS / f"{p.stem}.npz"
        if not path.is_file():
            raise DataError(f"{path}: missing latent of part id {p.id} ({p.name}), which {OBJECT_JSON} lists.")
        arrays = _npz(path, "latent")
        coords, feats = arrays.get("coords"), arrays.get("feats")
        if (coords is None or feats is None or coords.ndim != 2 or coords.shape[1] != 3 or len(coords) < 1
                or feats.shape != (len(coords), SLAT_CHANNELS) or not np.isfinite(feats).all()):
            raise DataError(f"{path}: needs 'coords' [N, 3] (N >= 1) and finite 'feats' [N, {SLAT_CHANNELS}].")
        xyz = coords.astype(np.int64)
        if xyz.min() < 0 or xyz.max() >= VOXEL_GRID:
            raise DataError(f"{path}: coords must lie in 0..{VOXEL_GRID - 1}, got {xyz.min()}..{xyz.max()}.")
        key = (xyz[:, 0] * VOXEL_GRID + xyz[:, 1]) * VOXEL_GRID + xyz[:, 2]
        order = np.argsort(key, kind="stable")
        if (np.diff(key[order]) == 0).any():
            raise DataError(f"{path}: coords lists a voxel twice.")
        rows.append((k + 1, key[order], xyz[order], feats[order].astype(np.float32)))
    keys = np.concatenate([r[1] for r in rows])
    feats = np.concatenate([r[3] for r in rows])
    cells, inverse = np.unique(keys, return_inverse=True)  # parts in PAct's order, as PAct concatenates them
    total = np.zeros((len(cells), SLAT_CHANNELS), np.float32)
    np.add.at(total, inverse, feats)
    whole = total / np.bincount(inverse, minlength=len(cells)).astype(np.float32)[:, None]
    whole_xyz = np.stack([cells // VOXEL_GRID**2, cells // VOXEL_GRID % VOXEL_GRID, cells % VOXEL_GRID], 1)
    coords = [np.concatenate([np.zeros((len(cells), 1), np.int64), whole_xyz], 1)]
    coords += [np.concatenate([np.full((len(r[2]), 1), r[0]), r[2]], 1) for r in rows]
    return np.concatenate(coords).astype(np.int16), np.concatenate([whole, feats]).astype(np.float32)


def view_names(folder: Path, splits: Sequence[str]) -> list[tuple[str, str]]:
    """(view name NN, split) of the views PAct reads for an object in `splits`: 00-17 for
    training, 18-19 for testing; views without a PNG are skipped."""
    wanted = [(f"{v:02d}", s) for s in splits for v in (TRAIN_VIEWS if s == "train" else TEST_VIEWS)]
    return [(v, s) for v, s in wanted if (folder / IMAGES / f"{v}.png").is_file()]


def nearest_resize(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV's INTER_NEAREST: dst[y, x] = src[min(floor(y / (H / h)), h - 1), ...] in doubles."""
    h, w = mask.shape
    rows = np.minimum(np.floor(np.arange(height) * (1.0 / (height / h))).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(width) * (1.0 / (width / w))).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


def crop_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    """TRELLIS's square crop around the alpha > 0 box, 1.2 x its larger side: (left, top,
    right, bottom), right/bottom exclusive; int() truncates toward 0."""
    ys, xs = np.nonzero(alpha)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0) / 2 * CROP_RATIO
    return int(cx - half), int(cy - half), int(cx + half), int(cy + half)


def padded_crop(array: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """array[top:bottom, left:right] with zeros outside the array (PAct pads, then crops)."""
    left, top, right, bottom = box
    out = np.zeros((bottom - top, right - left) + array.shape[2:], array.dtype)
    h, w = array.shape[:2]
    sy, sx = slice(max(top, 0), min(bottom, h)), slice(max(left, 0), min(right, w))
    out[sy.start - top:sy.stop - top, sx.start - left:sx.stop - left] = array[sy, sx]
    return out


def downsample_mask(mask: np.ndarray, grid: int = MASK_GRID) -> np.ndarray:
    """PAct's ``smart_downsample_mask``: each of grid x grid cells (rows int(i h / grid) ..
    min(int((i + 1) h / grid), h)) takes its most frequent non-zero label (ties: the smaller),
    or 0; int64 [grid, grid]."""
    h, w = mask.shape
    rows = [(int(i * h / grid), min(int((i + 1) * h / grid), h)) for i in range(grid)]
    cols = [(int(j * w / grid), min(int((j + 1) * w / grid), w)) for j in range(grid)]
    out = np.zeros((grid, grid), np.int64)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            cell = mask[r0:r1, c0:c1]
            cell = cell[cell != 0]
            if cell.size:
                values, counts = np.unique(cell, return_counts=True)
                out[i, j] = values[counts.argmax()]  # np.unique sorts: argmax is the smallest of the most frequent
    return out


def read_view(folder: Path, view: str, json_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """PAct's conditioning image and part mask of one view (``ImageConditionedMixin_PartNet``):
    the RGB crop resized to 518 px, uint8 [518, 518, 3] (PAct's cond is it / 255), and the
    37 x 37 mask, int64 with PAct's labels (id + 1; 0 background). A raw mask value that is
    not one of `json_ids` (the object's JSON ids) is refused."""
    from PIL import Image

    png, npz = folder / IMAGES / f"{view}.png", folder / MASKS / f"{view}.npz"
    try:
        with Image.open(png) as image:
            image.load()
            if image.mode != "RGBA":
                raise DataError(f"{png}: PAct needs RGBA views (it reads the alpha channel), got mode {image.mode}.")
            rgba = np.array(image)
    except OSError as exc:
        raise DataError(f"{png}: cannot be read as an image ({exc}).") from exc
    raw = _npz(npz, "semantic mask").get("semantic_mask")
    if raw is None or raw.ndim != 2 or raw.size == 0 or not np.issubdtype(raw.dtype, np.integer):
        raise DataError(f"{npz}: needs a 2-D integer array 'semantic_mask'.")
    raw = raw.astype(np.int64)
    beyond = sorted(set(np.unique(raw).tolist()) - set(json_ids) - {0})
    if beyond:
        raise DataError(f"{npz}: holds labels {beyond} beyond the parts (ids {sorted(json_ids)}).")
    alpha = rgba[..., 3]
    if not alpha.any():
        raise DataError(f"{png}: the alpha channel is empty, so PAct finds no object to crop.")
    mask = nearest_resize(raw.astype(np.int32), *alpha.shape).astype(np.int64)
    mask[alpha / 255 > 0.5] += 1
    box = crop_box(alpha)
    crop = padded_crop(rgba, box)
    rgb = np.where(crop[..., 3:] == 0, 0, crop[..., :3]).astype(np.uint8)
    image = np.asarray(Image.fromarray(rgb, "RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS))
    return image, downsample_mask(padded_crop(mask, box))


def relabel(mask: np.ndarray, part_ids: Sequence[int]) -> np.ndarray:
    """PAct's mask labels (id + 1) -> the format's (position + 1) for parts listed in order.

    A label whose id is no part (only the raw ids of half-transparent edge pixels of a part
    whose id - 1 is not a part can give one) becomes background.
    """
    lookup = np.zeros(max(max(part_ids) + 2, int(mask.max()) + 1), np.int64)
    lookup[np.asarray(part_ids) + 1] = np.arange(1, len(part_ids) + 1)
    return lookup[mask]


# ---------------------------------------------------------------- conversion

# Sizes of the converted data: "pact" keeps PAct's (every value as PAct derives it); the CPU
# presets shrink a copy for smoke runs of the CPU models (see `shrink`; not PAct's values).
SIZES: dict[str, dict[str, Any]] = {
    "pact": dict(resolution=16, voxel_resolution=VOXEL_GRID),
    "small": dict(resolution=8, voxel_resolution=16),
    "tiny": dict(resolution=8, voxel_resolution=16),
}


def object_samples(folder: Path, source: str, splits: Sequence[str]) -> tuple[list[Part], list[dict[str, np.ndarray]]]:
    """The parts of one object and its samples (format.py keys, PAct's sizes; ``cond``
    left out), one per view PAct reads for `splits`."""
    parts, json_ids = read_parts(folder)
    ids = [p.id for p in parts]
    if len(parts) > MAX_PARTS:
        return parts, []
    shared = {
        "latents": structure_latents(folder, parts),
        "articulation": articulation(parts),
        "part_labels": np.array([LABEL_IDS[p.name] for p in parts], np.int64),
        "joint_types": np.array([p.joint_type for p in parts], np.int64),
    }
    shared["voxel_coords"], shared["voxel_feats"] = voxel_sets(folder, parts)
    samples = []
    for view, split in view_names(folder, splits):
        image, cells = read_view(folder, view, json_ids)
        mask = np.kron(relabel(cells, ids), np.ones((PATCH, PATCH), np.int64)).astype(np.uint8)
        samples.append({**shared, "image": image, "mask": mask, "source": np.array(source),
                        "view": np.array(int(view), np.int64), "split": np.array(split)})
    return parts, samples


def _pool_rows(coords: np.ndarray, feats: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Voxel rows at a grid `factor` times coarser: each coarse cell of a row once, with the mean feature."""
    c = coords.astype(np.int64)
    c[:, 1:] //= factor
    cells, inverse = np.unique(c, axis=0, return_inverse=True)
    total = np.zeros((len(cells), feats.shape[1]), np.float64)
    np.add.at(total, inverse.ravel(), feats)
    return cells.astype(np.int16), (total / np.bincount(inverse.ravel())[:, None]).astype(np.float32)


def shrink(sample: dict[str, np.ndarray], resolution: int, voxel_resolution: int, image_size: tuple[int, int],
           grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """A CPU-sized copy of a converted sample (for smoke runs, NOT PAct's values): latents
    average-pooled to `resolution`, voxels pooled to `voxel_resolution` (mean features),
    image LANCZOS-resized and mask nearest-resized to `image_size`."""
    from PIL import Image

    out = dict(sample)
    k, c, r = sample["latents"].shape[:3]
    f = r // resolution
    out["latents"] = np.ascontiguousarray(
        sample["latents"].reshape(k, c, resolution, f, resolution, f, resolution, f).mean((3, 5, 7)), np.float32)
    out["voxel_coords"], out["voxel_feats"] = _pool_rows(sample["voxel_coords"], sample["voxel_feats"], VOXEL_GRID // voxel_resolution)
    height, width = image_size
    out["image"] = np.asarray(Image.fromarray(sample["image"]).resize((width, height), Image.Resampling.LANCZOS))
    out["mask"] = np.ascontiguousarray(nearest_resize(sample["mask"], height, width))
    return out


def _settings(src: Path, split_file: Path | None, preset: str, encoder: dict[str, Any]) -> dict[str, Any]:
    """What a partial conversion was started with (a rerun with other settings starts over)."""
    return {"source": str(src.resolve()), "split": None if split_file is None else str(split_file.resolve()),
            "preset": preset, "pact_commit": PACT_COMMIT, "image_encoder": encoder}


def check_encoder(kind: str, weights: str | None, preset: str) -> dict[str, Any]:
    """Check the image encoder flags and weights file before anything is written; returns
    what the dataset records of the encoder (the weights' sha256 among it)."""
    if kind == "stand-in":
        if weights is not None:
            raise ValueError("--encoder-weights goes with --image-encoder dinov2; the stand-in encoder has no weights.")
        return {"name": "stand-in", "module": "pact_ray.data.objects.encoder.StandInImageEncoder"}
    if kind != "dinov2":
        raise ValueError(f"--image-encoder must be stand-in or dinov2, got {kind!r}.")
    if weights is None:
        raise ValueError("--image-encoder dinov2 needs --encoder-weights FILE (nothing is downloaded: "
                         "docs/pact_layout.md says where the official weights come from).")
    from pact_ray.data.objects.dinov2 import arch_for, file_digest, read_weights

    arch = arch_for(preset)
    read_weights(weights, arch)
    return {"name": "dinov2", "architecture": arch.name, "weights": str(Path(weights).resolve()),
            "sha256": file_digest(weights)}


@dataclass(frozen=True)
class EncoderChoice:
    """Which image encoder gives ``cond``: "stand-in" (encoder.py) or "dinov2" (dinov2.py,
    from ``weights``, run on ``device`` with ``threads`` torch threads per worker)."""

    kind: str = "stand-in"
    weights: str | None = None
    device: str = "cpu"
    threads: int = 1


_ENCODERS: dict[tuple[EncoderChoice, str], Any] = {}  # one per worker process: a ViT-L loads once


def image_encoder(choice: EncoderChoice, preset: str):
    """The encoder of `choice` for `preset`'s condition layout (cached in this process)."""
    if (choice, preset) not in _ENCODERS:
        from pact_ray.common.presets import CONDITION_PRESETS, STAGE1_PRESETS

        if choice.kind == "dinov2":
            import torch

            from pact_ray.data.objects.dinov2 import Dinov2ImageEncoder, arch_for

            torch.set_num_threads(choice.threads)
            encoder = Dinov2ImageEncoder(choice.weights, arch_for(preset), device=choice.device)
        else:
            from pact_ray.data.objects.encoder import StandInImageEncoder

            condition = CONDITION_PRESETS[preset]
            encoder = StandInImageEncoder(STAGE1_PRESETS[preset]["cond_channels"], condition["grid"],
                                          condition["prefix_tokens"],
                                          patch=condition["image_size"][0] // condition["grid"][0])
        _ENCODERS.clear()
        _ENCODERS[(choice, preset)] = encoder
    return _ENCODERS[(choice, preset)]


def _convert_one(job: tuple[Path, str, tuple[str, ...], Path, str, EncoderChoice]) -> tuple[str, int, int, float]:
    """Convert one object into `work` (its samples, then done.json last); returns
    (source, samples, parts, seconds). Runs in a worker process."""
    import shutil
    import time

    from pact_ray.data.objects.format import write_sample
    from pact_ray.common.presets import CONDITION_PRESETS

    folder, source, splits, work, preset, choice = job
    start = time.perf_counter()
    shutil.rmtree(work, ignore_errors=True)  # an unfinished earlier try
    parts, samples = object_samples(folder, source, splits)
    condition = CONDITION_PRESETS[preset]
    if preset != "pact":
        samples = [shrink(sample, image_size=condition["image_size"], grid=condition["grid"], **SIZES[preset])
                   for sample in samples]
    encoder = image_encoder(choice, preset) if samples else None
    for j, sample in enumerate(samples):
        sample["cond"] = encoder(sample["image"]).astype(np.float16)
        write_sample(work, j, sample)
    work.mkdir(parents=True, exist_ok=True)
    done = {"source": source, "samples": len(samples), "parts": len(parts)}
    (work / ".done.tmp").write_text(json.dumps(done))
    (work / ".done.tmp").replace(work / "done.json")
    return source, len(samples), len(parts), time.perf_counter() - start


def _run(todo: list, workers: int, report, spawn: bool = False) -> None:
    """Convert the objects of `todo`, in this process (one worker) or a process pool (started
    with spawn where the workers use a GPU: CUDA does not survive fork); the first failure
    cancels the objects not yet started and is raised."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    if workers == 1:
        for job in todo:
            report(_convert_one(job))
    else:
        context = multiprocessing.get_context("spawn") if spawn else None
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_convert_one, job) for job in todo]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()
                    report(future.result())


def convert(src: str | Path, out: str | Path, *, split_file: str | Path | None = None, preset: str = "pact",
            workers: int | None = None, image_encoder: str = "stand-in", encoder_weights: str | None = None,
            encoder_device: str | None = None, log=None) -> Any:
    """Convert the PAct dataset root `src` into a dataset folder `out` (format.py); returns its spec.

    Objects are converted one per worker process (`workers`, default: the machine's cores)
    into ``.<out>.partial/`` beside `out`, each finished object marked by its done.json: a
    rerun after an interruption or a fixed input skips the finished ones. Only a complete
    conversion is moved to `out`, which must not exist (or be empty). Bad input raises
    DataError naming the file; `out` is then left untouched.

    ``cond`` comes from `image_encoder`: "stand-in" (default) or "dinov2" with
    `encoder_weights` (checked before anything is written), run on `encoder_device`
    (default: "cuda" where torch sees a GPU, else "cpu"). Each worker holds one copy of
    the encoder (DINOv2 ViT-L: 1.2 GB in float32).
    """
    import dataclasses
    import os
    import shutil
    import sys
    import time
    import uuid

    from pact_ray.data.objects.format import DatasetSpec, sample_path, write_dataset_spec
    from pact_ray.common.presets import CONDITION_PRESETS, STAGE1_PRESETS

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    src, out = Path(src), Path(out)
    if preset not in SIZES:
        raise ValueError(f"preset must be one of {', '.join(SIZES)}, got {preset!r}.")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; give a new --out folder.")
    objects = find_objects(src)
    split = None if split_file is None else read_split(split_file)
    chosen = [(folder, splits) for folder in objects if (splits := object_splits(folder, split))]
    if not chosen:
        raise DataError(f"{split_file}: lists none of the {len(objects)} objects under {src}.")
    encoder = check_encoder(image_encoder, encoder_weights, preset)
    work = out.with_name(f".{out.name}.partial")
    settings = _settings(src, None if split_file is None else Path(split_file), preset, encoder)
    settings_file = work / "settings.json"
    if work.exists() and (not settings_file.is_file() or json.loads(settings_file.read_text()) != settings):
        log(f"{work}: a partial conversion with other settings; starting over")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings))

    # Each sample's source: root name / object name, the 2-component form of PAct's split tags.
    todo_folders = [(folder, splits) for folder, splits in chosen
                    if not (work / "objects" / folder.name / "done.json").is_file()]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo_folders) or 1))
    if encoder["name"] == "dinov2" and encoder_device is None:
        import torch

        encoder_device = "cuda" if torch.cuda.is_available() else "cpu"
    choice = EncoderChoice(image_encoder, None if encoder_weights is None else str(Path(encoder_weights).resolve()),
                           encoder_device or "cpu", max(1, (os.cpu_count() or 1) // workers))
    jobs = [(folder, f"{src.resolve().name}/{folder.name}", splits, work / "objects" / folder.name, preset, choice)
            for folder, splits in chosen]
    todo = [job for job in jobs if not (job[3] / "done.json").is_file()]
    if len(todo) < len(jobs):
        log(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} objects already converted")
    start, finished = time.perf_counter(), len(jobs) - len(todo)

    def report(result: tuple[str, int, int, float]) -> None:
        nonlocal finished
        finished += 1
        source, n, k, seconds = result
        note = f"dropped: {k} parts > {MAX_PARTS} (PAct drops it from training)" if k > MAX_PARTS else (
            f"{n} views, {k} parts" if n else "dropped: no conditioning view")
        log(f"[{finished}/{len(jobs)}] {source}: {note}, {seconds:.1f} s")

    try:
        _run(todo, workers, report, spawn=choice.device != "cpu")
    except BaseException:
        _ENCODERS.clear()
        if not any((work / "objects").glob("*/done.json")):
            shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming
        raise

    _ENCODERS.clear()  # where one worker ran here, let its encoder go
    # Assemble: link every object's samples, in object order, into a staging folder, then rename.
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    index, max_parts, objects = 0, 1, []
    try:
        for job in jobs:
            done = json.loads((job[3] / "done.json").read_text())
            if done["parts"] > MAX_PARTS or not done["samples"]:
                continue
            max_parts = max(max_parts, done["parts"])
            objects.append([done["source"], done["samples"]])
            for j in range(done["samples"]):
                target = sample_path(staging, index)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(sample_path(job[3], j), target)
                except OSError:
                    shutil.copyfile(sample_path(job[3], j), target)
                index += 1
        if index == 0:
            raise DataError(f"{src}: no object gave a sample (each has more than {MAX_PARTS} parts or no view).")
        condition, sizes = CONDITION_PRESETS[preset], SIZES[preset]
        spec = DatasetSpec(
            name=f"pact-{src.name}", resolution=sizes["resolution"], image_size=tuple(condition["image_size"]),
            grid=tuple(condition["grid"]), cond_channels=STAGE1_PRESETS[preset]["cond_channels"],
            prefix_tokens=condition["prefix_tokens"], num_samples=index, max_parts=max_parts,
            voxel_resolution=sizes["voxel_resolution"], voxel_channels=SLAT_CHANNELS,
        )
        spec = dataclasses.replace(spec, generator={
            "name": "pact_ray.data.objects.pact", "pact_commit": PACT_COMMIT, "source": str(src.resolve()),
            "split": settings["split"], "preset": preset, "image_encoder": encoder,
            # Samples in object order; the trainers hold out whole objects (ArticulatedDataset.groups).
            "objects": objects})
        write_dataset_spec(staging, spec)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {index} samples of {len(jobs)} objects to {out} in {time.perf_counter() - start:.1f} s")
    return spec


def main(argv: Sequence[str] | None = None) -> int:
    """``pact-object-data from-pact SRC --out DST [--split FILE]``: bad input ends in one
    line naming the file and exit status 2, with nothing written to DST."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="pact-object-data from-pact",
        description="Convert a PAct dataset root (sub-folders = objects, PAct's training layout) into this "
                    "project's dataset format, with PAct's part order, articulation vectors, latents, voxels and views.")
    parser.add_argument("src", help="PAct dataset root: a folder whose sub-folders are objects")
    parser.add_argument("--out", required=True, help="dataset folder to create (must not exist or be empty)")
    parser.add_argument("--split", help="PAct split JSON ({'train': [...], 'test': [...]}); default: every object")
    parser.add_argument("--preset", choices=sorted(SIZES), default="pact",
                        help="pact (default): PAct's sizes and values; tiny/small: a shrunk copy for CPU smoke runs")
    parser.add_argument("--workers", type=int, help="processes (default: the machine's cores)")
    parser.add_argument("--image-encoder", choices=("stand-in", "dinov2"), default="stand-in",
                        help="what gives the condition tokens: stand-in (default; fixed random projections) or "
                             "dinov2 (PAct's DINOv2 ViT-L/14 with registers; needs --encoder-weights)")
    parser.add_argument("--encoder-weights", metavar="FILE",
                        help="DINOv2 weights: Meta's dinov2_vitl14_reg4_pretrain.pth or Hugging Face's "
                             "model.safetensors of facebook/dinov2-with-registers-large (docs/pact_layout.md)")
    parser.add_argument("--encoder-device", help="device of the DINOv2 encoder (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.out, split_file=args.split, preset=args.preset, workers=args.workers,
                image_encoder=args.image_encoder, encoder_weights=args.encoder_weights,
                encoder_device=args.encoder_device)
    except (ValueError, OSError) as exc:
        from pact_ray.errors import first_line

        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 2
    return 0
