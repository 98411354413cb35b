"""Deterministic synthetic articulated objects, written in the format of format.py.

Objects live in the normalised cube [-1, 1]^3 (x right, y up, z out of the front) and are
unions of axis-aligned boxes, one entry per part:

- cabinet: body + 1-3 doors side by side (revolute about a vertical axis at the hinge
  edge, opening 90-120 degrees outwards) + handles (fixed bars near the free edge);
- drawers: body + 1-4 stacked drawers (prismatic along +z, out of the front, 0.2-0.5
  long; a front panel plus a tray inside the body) + knobs (fixed);
- mixed: body + a top row of 1-2 drawers + a bottom row of 1-2 doors, with knobs/handles.

Part 0 is the body (label base, fixed joint, optionally with a top slab); each door or
drawer is followed by its handles or knobs (at most two each). K, the part count, is drawn
uniformly from [min_parts, max_parts]. Axis origins are the point of the joint axis
closest to the cube centre. The articulation vectors take PAct's encoding (articulation.py:
the pivot slots of fixed parts and drawers hold their bounding-box centre). With
probability `occlusion_prob` a handle or knob sits behind its panel, inside the body: it has
voxels but no pixel. Tiny knobs can also miss every pixel centre of a small image, so empty
part masks occur even without it.

A sample is an orthographic render (camera in front, 20-40 degrees to the left or right
and 15-30 degrees above; rays cast against the boxes, faces shaded by orientation, one
colour per part, white background), the label mask from the same rays, per-part
occupancy at (4R)^3 turned into latents by StandInStructureEncoder, cond from
StandInImageEncoder (stored as float16) and articulation vectors. Sample i is drawn from
np.random.Generator(PCG64([seed, i])): it does not depend on num_samples, and datasets of
different seeds share no sample.

With a `voxel_resolution` G (Stage2 data), each sample also stores the voxel sets of
format.py: the surface voxels at G^3 of each part (cells that touch a box face; a solid
box would flood a part with interior voxels, while TRELLIS's structured latents sit on the
surface) and of the whole object (their union), with the features of
StandInVoxelEncoder. They are computed from the same boxes and draw no random numbers, so
every other array of a sample is the same with or without voxels.

CLI: python -m pact_ray.data.objects.synthetic --out DIR --num-samples N --seed S --preset tiny [--voxel-resolution G]
(console script pact-object-data; its subcommand ``from-pact`` converts PAct's layout, pact.py).
"""

import argparse
import colorsys
import dataclasses
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pact_ray.common.presets import CONDITION_PRESETS, STAGE1_PRESETS
from pact_ray.data.cache import OBJECTS_MARKER, cached, object_set_name
from pact_ray.data.objects.articulation import JOINT_TYPES, LABEL_IDS, encode_articulation_batch
from pact_ray.data.objects.encoder import StandInImageEncoder, StandInStructureEncoder
from pact_ray.data.objects.format import DATASET_FILE, DatasetSpec, write_dataset_spec, write_sample

GENERATOR_NAME = "pact_ray.data.objects.synthetic"
MIN_PARTS, MAX_PARTS = 2, 8
BACKGROUND = (255, 255, 255)

# Data sizes of each model preset (pact_ray.common.presets is the one source).
PRESETS: dict[str, dict[str, int | tuple[int, int]]] = {
    name: {"resolution": STAGE1_PRESETS[name]["resolution"], "image_size": CONDITION_PRESETS[name]["image_size"],
           "grid": CONDITION_PRESETS[name]["grid"], "cond_channels": STAGE1_PRESETS[name]["cond_channels"]}
    for name in STAGE1_PRESETS
}

# Object kinds: (fewest, most) doors + drawers.
_MOVABLE_COUNTS = {"cabinet": (1, 3), "drawers": (1, 4), "mixed": (2, 4)}
_MAX_FIXTURES = 2  # handles or knobs per door or drawer
_VIEW_HALF_EXTENT = 1.45  # half of the shorter image side, in object units (objects reach |p| < 1.42)
_SHADE = np.array([0.72, 1.12, 0.95])  # brightness of faces whose normal is x (side), y (top), z (front)
_PANEL = 0.04  # thickness of doors and drawer fronts
_FIXTURE_DEPTH = 0.04  # how far handles and knobs stick out
_GAP = 0.015  # gap around panels
_RAY_CHUNK = 32768  # rays per ray-casting step, bounds memory at 518 px


@dataclass(frozen=True)
class _Part:
    """One part: boxes [n, 2, 3] as (lo, hi) corners, and its joint."""

    boxes: np.ndarray
    label: int
    joint_type: int = JOINT_TYPES["fixed"]
    axis: tuple[float, float, float] = (0.0, 0.0, 0.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    limit: float = 0.0  # upper joint limit: degrees (revolute) or length (prismatic)

    @property
    def centre(self) -> np.ndarray:
        """Centre of the part's axis-aligned bounding box (PAct's pivot of fixed and drawer parts)."""
        return (self.boxes[:, 0].min(0) + self.boxes[:, 1].max(0)) / 2


def _boxes(*corners: tuple[Sequence[float], Sequence[float]]) -> np.ndarray:
    return np.array(corners, dtype=np.float64).reshape(-1, 2, 3)


def _closest_to_centre(point: Sequence[float], axis: Sequence[float]) -> tuple[float, float, float]:
    """The point of the line point + t * axis (unit axis) closest to the cube centre."""
    p, a = np.asarray(point, dtype=np.float64), np.asarray(axis, dtype=np.float64)
    foot = p - (p @ a) * a
    return (float(foot[0]), float(foot[1]), float(foot[2]))


def _edges(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    """n + 1 increasing edges splitting [low, high] into n cells of similar size."""
    weights = rng.uniform(0.75, 1.25, size=n)
    return low + (high - low) * np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])


def _fixtures(
    rng: np.random.Generator,
    centres: Sequence[tuple[float, float]],
    half_size: tuple[float, float],
    label: int,
    front: float,
    occlusion_prob: float,
) -> list[_Part]:
    """Handles or knobs: boxes of half size (x, y) at `centres` on a panel whose back is at z = front.

    Visible ones stick out of the panel; hidden ones sit just behind it, inside the body.
    """
    parts = []
    for x, y in centres:
        if rng.random() < occlusion_prob:
            z0, z1 = front - _FIXTURE_DEPTH, front
        else:
            z0, z1 = front + _PANEL, front + _PANEL + _FIXTURE_DEPTH
        hx, hy = half_size
        parts.append(_Part(_boxes(([x - hx, y - hy, z0], [x + hx, y + hy, z1])), label))
    return parts


def _door(
    rng: np.random.Generator,
    x0: float,
    x1: float,
    y0: float,
    y1: float,
    front: float,
    hinge_left: bool,
    fixtures: int,
    occlusion_prob: float,
) -> list[_Part]:
    """A door on the front cell [x0, x1] x [y0, y1] and its handles near the free edge."""
    px0, px1, py0, py1 = x0 + _GAP, x1 - _GAP, y0 + _GAP, y1 - _GAP
    # Opening outwards (+z) is a positive turn about -y for a left hinge, about +y for a right one.
    hinge_x, axis = (px0, (0.0, -1.0, 0.0)) if hinge_left else (px1, (0.0, 1.0, 0.0))
    door = _Part(
        _boxes(([px0, py0, front], [px1, py1, front + _PANEL])),
        LABEL_IDS["door"],
        JOINT_TYPES["revolute"],
        axis,
        _closest_to_centre((hinge_x, 0.0, front), axis),
        float(rng.uniform(90.0, 120.0)),
    )
    free_x = px1 - 0.07 if hinge_left else px0 + 0.07
    height = py1 - py0
    centres = [(free_x, py0 + height * (j + 1) / (fixtures + 1)) for j in range(fixtures)]
    half = (0.018, min(0.15, 0.3 * height / max(fixtures, 1)))
    return [door, *_fixtures(rng, centres, half, LABEL_IDS["handle"], front, occlusion_prob)]


def _drawer(
    rng: np.random.Generator,
    x0: float,
    x1: float,
    y0: float,
    y1: float,
    front: float,
    back: float,
    fixtures: int,
    occlusion_prob: float,
) -> list[_Part]:
    """A drawer (front panel + tray inside the body) on the front cell and its knobs."""
    px0, px1, py0, py1 = x0 + _GAP, x1 - _GAP, y0 + _GAP, y1 - _GAP
    tray_top = py0 + 0.6 * (py1 - py0)
    axis = (0.0, 0.0, 1.0)
    drawer = _Part(
        _boxes(
            ([px0, py0, front], [px1, py1, front + _PANEL]),  # front panel
            ([px0 + _GAP, py0 + _GAP, back + 0.05], [px1 - _GAP, tray_top, front]),  # tray inside the body
        ),
        LABEL_IDS["drawer"],
        JOINT_TYPES["prismatic"],
        axis,
        _closest_to_centre(((px0 + px1) / 2, (py0 + py1) / 2, front), axis),
        float(rng.uniform(0.2, 0.5)),
    )
    y_mid = (py0 + py1) / 2
    centres = [(px0 + (px1 - px0) * (j + 1) / (fixtures + 1), y_mid) for j in range(fixtures)]
    half = float(rng.uniform(0.025, 0.04))
    return [drawer, *_fixtures(rng, centres, (half, half), LABEL_IDS["knob"], front, occlusion_prob)]


def _sample_parts(rng: np.random.Generator, num_parts: int, occlusion_prob: float) -> list[_Part]:
    """An object with exactly `num_parts` parts (MIN_PARTS..MAX_PARTS), body first."""
    extra = num_parts - 1

    def movable_range(kind: str) -> tuple[int, int]:
        low, high = _MOVABLE_COUNTS[kind]
        return max(low, math.ceil(extra / (1 + _MAX_FIXTURES))), min(high, extra)

    kinds = [kind for kind in _MOVABLE_COUNTS if movable_range(kind)[0] <= movable_range(kind)[1]]
    kind = kinds[rng.integers(len(kinds))]
    low, high = movable_range(kind)
    movable = int(rng.integers(low, high + 1))
    # Spread the handles/knobs over the doors/drawers, at most _MAX_FIXTURES each.
    slots = np.repeat(np.arange(movable), _MAX_FIXTURES)
    fixtures = np.bincount(slots[rng.choice(slots.size, extra - movable, replace=False)], minlength=movable)

    wx, hy, dz = rng.uniform(0.5, 0.85), rng.uniform(0.5, 0.85), rng.uniform(0.3, 0.55)
    body = [([-wx, -hy, -dz], [wx, hy, dz])]
    if rng.random() < 0.5:
        body.append(([-wx - 0.03, hy, -dz], [wx + 0.03, hy + 0.05, dz + 0.03]))
    parts = [_Part(_boxes(*body), LABEL_IDS["base"])]

    if kind == "cabinet":
        rows = [("door", -hy, hy, movable)]
    elif kind == "drawers":
        ys = _edges(rng, hy, -hy, movable)  # top to bottom
        rows = [("drawer", ys[j + 1], ys[j], 1) for j in range(movable)]
    else:
        drawers = int(rng.integers(max(1, movable - 2), min(2, movable - 1) + 1))
        split = hy - 2 * hy * rng.uniform(0.3, 0.45)
        rows = [("drawer", split, hy, drawers), ("door", -hy, split, movable - drawers)]
    counts = iter(fixtures.tolist())
    for what, y0, y1, n in rows:
        xs = _edges(rng, -wx, wx, n)
        for j in range(n):
            if what == "door":
                if n == 1 or 0 < j < n - 1:
                    hinge_left = bool(rng.random() < 0.5)  # a single or middle door: either side
                else:
                    hinge_left = j == 0  # outer doors hinge on the outer edges
                parts += _door(rng, xs[j], xs[j + 1], y0, y1, dz, hinge_left, next(counts), occlusion_prob)
            else:
                parts += _drawer(rng, xs[j], xs[j + 1], y0, y1, dz, -dz, next(counts), occlusion_prob)
    return parts


def _part_colours(rng: np.random.Generator, num_parts: int) -> np.ndarray:
    """Distinct saturated colours, float [K, 3] in [0, 1]: hues spaced 1/K apart."""
    offset = rng.random()
    return np.array(
        [
            colorsys.hsv_to_rgb((offset + k / num_parts) % 1.0, rng.uniform(0.55, 0.85), rng.uniform(0.55, 0.8))
            for k in range(num_parts)
        ]
    )


def _render(
    rng: np.random.Generator, parts: Sequence[_Part], image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthographic ray casting of the parts' boxes: image uint8 [H, W, 3], mask uint8 [H, W]
    and the part colours float [K, 3] in [0, 1]."""
    height, width = image_size
    yaw = math.radians(rng.uniform(20.0, 40.0)) * (1 if rng.random() < 0.5 else -1)
    pitch = math.radians(rng.uniform(15.0, 30.0))
    forward = -np.array([math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
    right = np.array([math.cos(yaw), 0.0, -math.sin(yaw)])
    up = np.cross(right, forward)
    step = 2 * _VIEW_HALF_EXTENT / min(height, width)
    sx = (np.arange(width) + 0.5 - width / 2) * step
    sy = (height / 2 - np.arange(height) - 0.5) * step
    origins = (sx[None, :, None] * right + sy[:, None, None] * up - 5.0 * forward).reshape(-1, 3)

    boxes = np.concatenate([p.boxes for p in parts])  # [B, 2, 3]
    box_part = np.concatenate([np.full(len(p.boxes), k) for k, p in enumerate(parts)])
    inverse = 1.0 / forward  # no zero component: yaw and pitch are never 0
    label = np.zeros(len(origins), dtype=np.int64)
    face = np.zeros(len(origins), dtype=np.int64)
    for start in range(0, len(origins), _RAY_CHUNK):
        o = origins[start : start + _RAY_CHUNK, None, :]  # [P, 1, 3]
        t_lo, t_hi = (boxes[None, :, 0] - o) * inverse, (boxes[None, :, 1] - o) * inverse  # [P, B, 3]
        t_in = np.minimum(t_lo, t_hi)
        near, far = t_in.max(axis=2), np.maximum(t_lo, t_hi).min(axis=2)
        depth = np.where(near <= far, near, np.inf)
        best = depth.argmin(axis=1)
        rows = np.arange(len(best))
        hit = np.isfinite(depth[rows, best])
        label[start : start + len(best)] = np.where(hit, box_part[best] + 1, 0)
        face[start : start + len(best)] = t_in[rows, best].argmax(axis=1)

    part_colours = _part_colours(rng, len(parts))
    colours = np.concatenate([np.array([BACKGROUND]) / 255.0, part_colours])
    shaded = colours[label] * np.where(label > 0, _SHADE[face], 1.0)[:, None]
    image = np.clip(np.rint(shaded * 255.0), 0, 255).astype(np.uint8).reshape(height, width, 3)
    return image, label.astype(np.uint8).reshape(height, width), part_colours


def _occupancy(parts: Sequence[_Part], size: int) -> np.ndarray:
    """bool [K, size, size, size] over [-1, 1]^3, index order [k, x, y, z]: cells touching a box."""
    half = 1.0 / size
    centres = -1.0 + (np.arange(size) + 0.5) * 2.0 * half
    occupancy = np.zeros((len(parts), size, size, size), dtype=bool)
    for k, part in enumerate(parts):
        for lo, hi in part.boxes:
            inside = (centres[None] + half > lo[:, None]) & (centres[None] - half < hi[:, None])  # [3, size]
            occupancy[k] |= inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    return occupancy


def _surface(parts: Sequence[_Part], size: int) -> np.ndarray:
    """bool [K, size, size, size] over [-1, 1]^3, index order [k, x, y, z]: cells that touch a
    box of the part but do not lie strictly inside it (thin boxes are all surface)."""
    half = 1.0 / size
    centres = -1.0 + (np.arange(size) + 0.5) * 2.0 * half
    surface = np.zeros((len(parts), size, size, size), dtype=bool)
    for k, part in enumerate(parts):
        for lo, hi in part.boxes:
            touch = (centres[None] + half > lo[:, None]) & (centres[None] - half < hi[:, None])  # [3, size]
            inner = (centres[None] - half >= lo[:, None]) & (centres[None] + half <= hi[:, None])
            touching = touch[0][:, None, None] & touch[1][None, :, None] & touch[2][None, None, :]
            interior = inner[0][:, None, None] & inner[1][None, :, None] & inner[2][None, None, :]
            surface[k] |= touching & ~interior
    return surface


# Scale of the stand-in voxel features: with it, every channel has a standard deviation of
# 0.6 to 1.0 over a dataset (measured on the tiny preset at G = 32; tests check 0.5..1.5).
VOXEL_FEATURE_SCALE = 1.6
VOXEL_ENCODER_SEED = 5678
_NEIGHBOURS = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), axis=-1).reshape(27, 3)


class StandInVoxelEncoder:
    """Occupied voxels of one row -> structured-latent features [V, C2].

    A voxel's input is its 3x3x3 neighbourhood in the row's occupancy (27 values, 0/1 ->
    -1/+1) and the RGB colour of its part (3 values in [0, 1] -> [-1, 1]); a fixed Gaussian
    projection (unit variance) then tanh times VOXEL_FEATURE_SCALE gives its C2 features.
    It keeps what TRELLIS's SLat encoder puts in a voxel (local geometry and appearance) at
    its shape (64^3 grid, 8 channels), but is a fixed random map, not a learned one.
    """

    def __init__(self, channels: int, seed: int = VOXEL_ENCODER_SEED) -> None:
        rng = np.random.Generator(np.random.PCG64(seed))
        inputs = len(_NEIGHBOURS) + 3
        self.channels = channels
        self._proj = (rng.standard_normal((inputs, channels)) / math.sqrt(inputs)).astype(np.float32)

    def __call__(self, occupancy: np.ndarray, colours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """occupancy: bool [G, G, G]; colours: float [G, G, G, 3], read at occupied cells.

        Returns the occupied cells int64 [V, 3] in (x, y, z) order, sorted, and their
        features float32 [V, C2].
        """
        cells = np.argwhere(occupancy)  # C order: sorted by (x, y, z)
        padded = np.pad(occupancy, 1)
        around = cells[:, None, :] + _NEIGHBOURS[None] + 1  # [V, 27, 3]
        pattern = padded[around[..., 0], around[..., 1], around[..., 2]].astype(np.float32)
        colour = colours[cells[:, 0], cells[:, 1], cells[:, 2]].astype(np.float32)
        inputs = np.concatenate([2.0 * pattern - 1.0, 2.0 * colour - 1.0], axis=1)
        return cells, (np.tanh(inputs @ self._proj) * VOXEL_FEATURE_SCALE).astype(np.float32)


def voxel_sets(surface: np.ndarray, colours: np.ndarray, encoder: StandInVoxelEncoder) -> tuple[np.ndarray, np.ndarray]:
    """The voxel arrays of format.py from per-part occupancy.

    surface: bool [K, G, G, G]; colours: float [K, 3]. Returns voxel_coords int16 [V, 4]
    (row 0 the whole object = the union, row k + 1 part k; canonical order) and
    voxel_feats float16 [V, C2]. A whole-object voxel takes the colour of the first part
    that occupies it.
    """
    owner = np.where(surface.any(axis=0), surface.argmax(axis=0), 0)  # [G, G, G] first occupying part
    rows = [(surface.any(axis=0), colours[owner])]
    rows += [(surface[k], np.broadcast_to(colours[k], surface.shape[1:] + (3,))) for k in range(len(surface))]
    coords, feats = [], []
    for row, (occupancy, colour) in enumerate(rows):
        cells, f = encoder(occupancy, colour)
        coords.append(np.concatenate([np.full((len(cells), 1), row), cells], axis=1))
        feats.append(f)
    return np.concatenate(coords).astype(np.int16), np.concatenate(feats).astype(np.float16)


class SyntheticGenerator:
    """Draws the samples of a synthetic dataset described by `spec` (its num_samples is not used).

    sample(i) depends only on (seed, i) and the settings. A spec with voxels
    (voxel_resolution) adds the voxel arrays to every sample.
    """

    def __init__(
        self, spec: DatasetSpec, *, seed: int, min_parts: int = MIN_PARTS, occlusion_prob: float = 0.0,
        image_encoder: tuple[Any, dict[str, Any]] | None = None,
    ) -> None:
        if not MIN_PARTS <= min_parts <= spec.max_parts <= MAX_PARTS:
            raise ValueError(
                f"parts per object must satisfy {MIN_PARTS} <= min_parts <= max_parts <= {MAX_PARTS}, "
                f"got min_parts {min_parts} and max_parts {spec.max_parts}."
            )
        if not 0.0 <= occlusion_prob <= 1.0:
            raise ValueError(f"occlusion_prob must be in [0, 1], got {occlusion_prob}.")
        self.spec = spec
        self.seed = seed
        self.min_parts = min_parts
        self.occlusion_prob = occlusion_prob
        # image_encoder: (an encoder of the spec's token layout, what dataset.json records of
        # it), e.g. PAct's DINOv2 (dinov2.py); default: the stand-in.
        self.image_encoder, self.encoder_info = image_encoder or (
            StandInImageEncoder(spec.cond_channels, spec.grid, spec.prefix_tokens, patch=spec.patch), None)
        self.structure_encoder = StandInStructureEncoder(spec.resolution, spec.latent_channels)
        self.voxel_encoder = StandInVoxelEncoder(spec.voxel_channels) if spec.has_voxels else None

    @property
    def info(self) -> dict[str, str | int | float]:
        """The `generator` entry of dataset.json."""
        return {
            "name": GENERATOR_NAME,
            "seed": self.seed,
            "min_parts": self.min_parts,
            "occlusion_prob": self.occlusion_prob,
            **({"image_encoder": self.encoder_info} if self.encoder_info else {}),
        }

    def sample(self, index: int) -> dict[str, np.ndarray]:
        """Sample `index` as the arrays of a sample file (format.SAMPLE_DTYPES)."""
        rng = np.random.Generator(np.random.PCG64([self.seed, index]))
        num_parts = int(rng.integers(self.min_parts, self.spec.max_parts + 1))
        parts = _sample_parts(rng, num_parts, self.occlusion_prob)
        image, mask, colours = _render(rng, parts, self.spec.image_size)
        occupancy = _occupancy(parts, self.structure_encoder.occupancy_size)
        sample = {
            "image": image,
            "mask": mask,
            "latents": self.structure_encoder(occupancy),
            "articulation": encode_articulation_batch(
                [p.joint_type for p in parts],
                [p.axis for p in parts],
                [p.origin for p in parts],
                [p.centre for p in parts],
                [p.limit for p in parts],
                [p.label for p in parts],
            ),
            "cond": self.image_encoder(image).astype(np.float16),
            "part_labels": np.array([p.label for p in parts], dtype=np.int64),
            "joint_types": np.array([p.joint_type for p in parts], dtype=np.int64),
        }
        if self.voxel_encoder is not None:
            surface = _surface(parts, self.spec.voxel_resolution)
            sample["voxel_coords"], sample["voxel_feats"] = voxel_sets(surface, colours, self.voxel_encoder)
        return sample


def _prepare_target(out: Path, overwrite: bool) -> None:
    """Refuse to clobber anything but an empty folder, or a dataset when overwrite is set."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder.")
    if not overwrite:
        raise FileExistsError(
            f"{out} already exists and is not empty; pass overwrite=True (--overwrite) to replace it."
        )
    if not (out / DATASET_FILE).is_file():
        raise FileExistsError(f"{out} is not empty and holds no {DATASET_FILE}; refusing to replace it.")


def generate_dataset(
    out_dir: str | os.PathLike,
    num_samples: int,
    *,
    seed: int,
    resolution: int,
    image_size: tuple[int, int],
    grid: tuple[int, int],
    cond_channels: int,
    prefix_tokens: int = 5,
    min_parts: int = MIN_PARTS,
    max_parts: int = MAX_PARTS,
    occlusion_prob: float = 0.0,
    voxel_resolution: int | None = None,
    name: str = "synthetic",
    overwrite: bool = False,
    image_encoder: tuple[Any, dict[str, Any]] | None = None,
) -> DatasetSpec:
    """Generate a dataset folder at `out_dir` and return its spec.

    voxel_resolution: G of the Stage2 voxel sets (with latent-channel features), or None
    for a Stage1-only dataset.

    The folder is built beside `out_dir` and moved into place when complete, so a failure
    leaves nothing half-written. `out_dir` must not exist or be empty, unless `overwrite`
    is set and it holds a dataset (a dataset.json).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
    spec = DatasetSpec(
        name=name,
        resolution=resolution,
        image_size=(int(image_size[0]), int(image_size[1])),
        grid=(int(grid[0]), int(grid[1])),
        cond_channels=cond_channels,
        prefix_tokens=prefix_tokens,
        num_samples=num_samples,
        max_parts=max_parts,
        voxel_resolution=voxel_resolution,
        # Voxels carry as many channels as the structure latents (8, as TRELLIS's SLat).
        voxel_channels=None if voxel_resolution is None else DatasetSpec.latent_channels,
    )
    generator = SyntheticGenerator(spec, seed=seed, min_parts=min_parts, occlusion_prob=occlusion_prob,
                                   image_encoder=image_encoder)
    spec = dataclasses.replace(spec, generator=generator.info)
    out = Path(out_dir)
    _prepare_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    staging.mkdir()
    try:
        for index in range(num_samples):
            write_sample(staging, index, generator.sample(index))
        write_dataset_spec(staging, spec)
        if out.exists():
            old = out.with_name(f".{out.name}.{uuid.uuid4().hex}.old")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return spec


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pact_ray.data.objects.synthetic",
        description="Write a deterministic synthetic articulated-object dataset "
                    "(or: pact-object-data from-pact SRC --out DST to convert PAct's training layout).",
    )
    parser.add_argument("--out", required=True, help="dataset folder to create")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="tiny", help="sizes; the flags below override them"
    )
    parser.add_argument("--resolution", type=int, help="R of the structure latents")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--grid", type=int, nargs=2, metavar=("h", "w"))
    parser.add_argument("--cond-channels", type=int)
    parser.add_argument("--prefix-tokens", type=int, default=5)
    parser.add_argument("--min-parts", type=int, default=MIN_PARTS)
    parser.add_argument("--max-parts", type=int, default=MAX_PARTS)
    parser.add_argument("--occlusion-prob", type=float, default=0.0)
    parser.add_argument("--voxel-resolution", type=int, help="add Stage2 voxel sets at this grid (e.g. 32 for tiny, 64 for pact)")
    parser.add_argument("--name", help="dataset name (default: synthetic-PRESET)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    parser.add_argument("--image-encoder", choices=("stand-in", "dinov2"), default="stand-in",
                        help="cond tokens: stand-in (default) or dinov2 (PAct's DINOv2 at the preset's sizes; "
                             "needs --encoder-weights, no size flags)")
    parser.add_argument("--encoder-weights", metavar="FILE", help="DINOv2 weights (docs/pact_layout.md)")
    parser.add_argument("--encoder-device", default="cpu", help="device of the DINOv2 encoder (default: cpu)")
    return parser



def ensure_synthetic(num_samples: int, seed: int, *, resolution: int, image_size, grid, cond_channels: int,
                     prefix_tokens: int = 5, occlusion_prob: float = 0.2, voxel_resolution: int | None = None,
                     root: Path | None = None) -> Path:
    """Path of the cached synthetic dataset with these settings (:func:`pact_ray.data.cache.cached`),
    generating it once if missing (with Stage2 voxel sets when ``voxel_resolution`` is given)."""
    name = object_set_name(num_samples, seed, resolution=resolution, image_size=image_size, grid=grid, cond_channels=cond_channels,
                           prefix_tokens=prefix_tokens, occlusion_prob=occlusion_prob, voxel_resolution=voxel_resolution)
    return cached(name, OBJECTS_MARKER, lambda out: generate_dataset(
        out, num_samples, seed=seed, resolution=resolution, image_size=tuple(image_size), grid=tuple(grid),
        cond_channels=cond_channels, prefix_tokens=prefix_tokens, occlusion_prob=occlusion_prob,
        voxel_resolution=voxel_resolution), root)


def _image_encoder(args: argparse.Namespace) -> tuple[Any, dict[str, Any]] | None:
    """The (encoder, record) of ``--image-encoder``; None for the stand-in."""
    from pact_ray.data.objects.pact import check_encoder

    info = check_encoder(args.image_encoder, args.encoder_weights, args.preset)
    if args.image_encoder == "stand-in":
        return None
    overridden = [flag for flag in ("resolution", "image_size", "grid", "cond_channels") if getattr(args, flag) is not None]
    if overridden or args.prefix_tokens != 5:
        flags = ", ".join("--" + f.replace("_", "-") for f in overridden or ["prefix_tokens"])
        raise ValueError(f"--image-encoder dinov2 gives the preset's token layout; drop {flags}.")
    from pact_ray.data.objects.dinov2 import Dinov2ImageEncoder, arch_for

    return Dinov2ImageEncoder(args.encoder_weights, arch_for(args.preset), device=args.encoder_device), info


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; user errors end in one line on stderr and exit status 1.

    ``pact-object-data from-pact SRC --out DST [--split FILE]`` converts PAct's training
    layout instead (:func:`pact_ray.data.objects.pact.main`; bad input: exit status 2).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["from-pact"]:
        from pact_ray.data.objects.pact import main as from_pact

        return from_pact(argv[1:])
    args = _parser().parse_args(argv)
    sizes = dict(PRESETS[args.preset])
    for key in ("resolution", "image_size", "grid", "cond_channels"):
        if getattr(args, key) is not None:
            sizes[key] = tuple(getattr(args, key)) if key in ("image_size", "grid") else getattr(args, key)
    start = time.perf_counter()
    try:
        encoder = _image_encoder(args)
        spec = generate_dataset(
            args.out,
            args.num_samples,
            seed=args.seed,
            prefix_tokens=args.prefix_tokens,
            min_parts=args.min_parts,
            max_parts=args.max_parts,
            occlusion_prob=args.occlusion_prob,
            voxel_resolution=args.voxel_resolution,
            name=args.name or f"synthetic-{args.preset}",
            overwrite=args.overwrite,
            image_encoder=encoder,
            **sizes,
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    (height, width), (h, w) = spec.image_size, spec.grid
    print(
        f"wrote {spec.num_samples} samples to {args.out} (R {spec.resolution}, image {height}x{width}, "
        f"grid {h}x{w}, C {spec.cond_channels}) in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
