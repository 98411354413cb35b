"""The 24-number articulation vector of one part (PAct/CAGE layout, see specs/stage2.md).

| slots | content                                  | stored value                          |
|-------|------------------------------------------|---------------------------------------|
| 0:6   | joint type id t (1..5), repeated 6x      | t / 5 - 0.5                           |
| 6:9   | axis direction                           | unit axis x 0.7, pointing positive    |
| 9:12  | axis origin (a point on the axis)        | about [-1, 1]                         |
| 12:18 | range pair (r, l), repeated 3x (tiled)   | [r, l, r, l, r, l]                    |
| 18:24 | semantic label id (0..7), repeated 6x    | label / 5 - 0.8                       |

- Range pair: r = revolute opening in degrees / 360, l = prismatic length (in the
  normalised [-1, 1]^3 object frame). A revolute or continuous joint has l = 0, a
  prismatic joint r = 0, a screw both. The pair is tiled, [r, l, r, l, r, l]: the
  spec says "(pair), repeated 3x" (CAGE's reference encoder writes [r, r, r, l, l, l]
  while its decoder averages x[0:2] + x[2:4] + x[4:6], i.e. the tiled layout).
- "Pointing positive": the first component whose magnitude exceeds AXIS_ZERO_TOL is
  made positive. Flipping the axis negates the range pair too, so the vector still
  describes the same motion (CAGE does the same).
- Fixed joints store zeros in the axis, origin and range slots; `validity_mask` hides
  their axis and origin slots (6:12), so only the zero range is learned for them.
"""

import numpy as np
import torch
from numpy.typing import ArrayLike

ARTICULATION_DIM = 24

SLOT_GROUPS: dict[str, slice] = {
    "type": slice(0, 6),
    "axis": slice(6, 9),
    "origin": slice(9, 12),
    "range": slice(12, 18),
    "label": slice(18, 24),
}

JOINT_TYPES: dict[str, int] = {
    "fixed": 1,
    "revolute": 2,
    "prismatic": 3,
    "screw": 4,
    "continuous": 5,
}
FIXED = JOINT_TYPES["fixed"]
# Slots hidden for fixed joints: axis and origin.
_GEOMETRY = slice(SLOT_GROUPS["axis"].start, SLOT_GROUPS["origin"].stop)

# Semantic label ids: the spec gives only the order (door, drawer, base, handle, wheel,
# knob, shelf, tray); we number them 0..7 in that order, which is also CAGE's `sem_ref`.
# So door = 0, drawer = 1, base = 2, handle = 3, wheel = 4, knob = 5, shelf = 6, tray = 7.
LABELS: tuple[str, ...] = ("door", "drawer", "base", "handle", "wheel", "knob", "shelf", "tray")
LABEL_IDS: dict[str, int] = {name: i for i, name in enumerate(LABELS)}

AXIS_SCALE = 0.7
AXIS_ZERO_TOL = 1e-6
_TYPE_SCALE, _TYPE_SHIFT = 1.0 / 5.0, -0.5
_LABEL_SCALE, _LABEL_SHIFT = 1.0 / 5.0, -0.8
_DEGREES_PER_TURN = 360.0
_MIN_JOINT, _MAX_JOINT = min(JOINT_TYPES.values()), max(JOINT_TYPES.values())

Array = np.ndarray | torch.Tensor


def encode_articulation_batch(
    joint_types: ArrayLike,
    axes: ArrayLike,
    origins: ArrayLike,
    ranges: ArrayLike,
    labels: ArrayLike,
) -> np.ndarray:
    """Encode K parts at once.

    joint_types: [K] ids 1..5; axes: [K, 3] (any length, not zero unless fixed);
    origins: [K, 3]; ranges: [K, 2] as (revolute degrees, prismatic length);
    labels: [K] ids 0..7. Returns float32 [K, 24].
    """
    joint_types = np.asarray(joint_types, dtype=np.int64).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    k = joint_types.shape[0]
    axes = np.asarray(axes, dtype=np.float64).reshape(k, 3)
    origins = np.asarray(origins, dtype=np.float64).reshape(k, 3)
    ranges = np.asarray(ranges, dtype=np.float64).reshape(k, 2)
    if labels.shape != (k,):
        raise ValueError(f"labels has {labels.shape[0]} entries for {k} joint types.")
    if ((joint_types < _MIN_JOINT) | (joint_types > _MAX_JOINT)).any():
        raise ValueError(f"joint types must be ids {_MIN_JOINT}..{_MAX_JOINT}, got {joint_types.tolist()}.")
    if ((labels < 0) | (labels >= len(LABELS))).any():
        raise ValueError(f"labels must be ids 0..{len(LABELS) - 1}, got {labels.tolist()}.")

    moving = joint_types != FIXED
    norms = np.linalg.norm(axes, axis=1)
    if (moving & (norms <= AXIS_ZERO_TOL)).any():
        raise ValueError("a non-fixed joint needs a non-zero axis direction.")
    unit = axes / np.where(moving, norms, 1.0)[:, None]
    # Sign of the first clearly non-zero component; flipping negates the range as well.
    significant = np.abs(unit) > AXIS_ZERO_TOL
    first = np.take_along_axis(unit, significant.argmax(axis=1)[:, None], axis=1)[:, 0]
    sign = np.where(first < 0, -1.0, 1.0)[:, None]
    keep = moving[:, None]
    unit = np.where(keep, unit * sign, 0.0)
    origins = np.where(keep, origins, 0.0)
    ranges = np.where(keep, ranges * sign, 0.0) / np.array([_DEGREES_PER_TURN, 1.0])

    vec = np.empty((k, ARTICULATION_DIM), dtype=np.float64)
    vec[:, SLOT_GROUPS["type"]] = (joint_types * _TYPE_SCALE + _TYPE_SHIFT)[:, None]
    vec[:, SLOT_GROUPS["axis"]] = unit * AXIS_SCALE
    vec[:, SLOT_GROUPS["origin"]] = origins
    vec[:, SLOT_GROUPS["range"]] = np.tile(ranges, (1, 3))
    vec[:, SLOT_GROUPS["label"]] = (labels * _LABEL_SCALE + _LABEL_SHIFT)[:, None]
    return vec.astype(np.float32)


def encode_articulation(
    joint_type: int,
    axis: ArrayLike,
    origin: ArrayLike,
    range_: ArrayLike,
    label: int,
) -> np.ndarray:
    """Encode one part: float32 [24]. axis, origin: [3]; range_: (revolute degrees, prismatic length)."""
    return encode_articulation_batch([joint_type], [axis], [origin], [range_], [label])[0]


def _round_ids(x: Array, low: int, high: int) -> Array:
    """Round to the nearest integer id and clamp to [low, high]; int64 result."""
    if isinstance(x, torch.Tensor):
        return torch.round(x).clamp(low, high).long()
    return np.clip(np.rint(x), low, high).astype(np.int64)


def decode_articulation(vec: Array) -> dict[str, Array]:
    """Decode articulation vectors [..., 24] (numpy array or torch tensor).

    Repeated slots are averaged and discrete ones rounded and clamped to valid ids.
    Returns (same array kind as the input):
      joint_type [...] int64 in 1..5, axis [..., 3] unit length (zero stays zero),
      origin [..., 3], range [..., 2] as (revolute degrees, prismatic length),
      label [...] int64 in 0..7.
    """
    if vec.shape[-1] != ARTICULATION_DIM:
        raise ValueError(f"articulation vectors need {ARTICULATION_DIM} numbers, got shape {tuple(vec.shape)}.")
    type_value = vec[..., SLOT_GROUPS["type"]].mean(-1)
    label_value = vec[..., SLOT_GROUPS["label"]].mean(-1)
    axis = vec[..., SLOT_GROUPS["axis"]] / AXIS_SCALE
    norm = (axis * axis).sum(-1, keepdims=True) ** 0.5
    range_pair = vec[..., SLOT_GROUPS["range"]].reshape(tuple(vec.shape[:-1]) + (3, 2)).mean(-2)
    range_pair[..., 0] *= _DEGREES_PER_TURN
    return {
        "joint_type": _round_ids((type_value - _TYPE_SHIFT) / _TYPE_SCALE, _MIN_JOINT, _MAX_JOINT),
        "axis": axis / norm.clip(min=AXIS_ZERO_TOL),
        "origin": vec[..., SLOT_GROUPS["origin"]],
        "range": range_pair,
        "label": _round_ids((label_value - _LABEL_SHIFT) / _LABEL_SCALE, 0, len(LABELS) - 1),
    }


def validity_mask(joint_type: int | Array) -> Array:
    """Slots that carry information: bool [..., 24]; axis and origin (6:12) of fixed joints are False.

    Takes an int or ids of shape [...] (numpy or torch; a tensor gives a tensor on its device).
    """
    if isinstance(joint_type, torch.Tensor):
        mask = torch.ones(joint_type.shape + (ARTICULATION_DIM,), dtype=torch.bool, device=joint_type.device)
        mask[..., _GEOMETRY] = (joint_type != FIXED).unsqueeze(-1)
        return mask
    ids = np.asarray(joint_type)
    mask = np.ones(ids.shape + (ARTICULATION_DIM,), dtype=bool)
    mask[..., _GEOMETRY] = (ids != FIXED)[..., None]
    return mask
