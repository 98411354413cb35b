"""The 24-number articulation vector of one part, exactly as PAct's loader computes it.

PAct-project/PAct d974309, ``modules/pact/datasets/components.py`` ``_prepare_node_data``
(l.214, an identical copy in ``Arti_SLat``); ../shared/fixtures/pact_layout_tiny/README.md
section 4 states every slot. Values are computed in float32, as PAct does.

| slots | content                                   | stored value                              |
|-------|-------------------------------------------|-------------------------------------------|
| 0:6   | joint type id t (1..5), repeated 6x       | t / 5 - 0.5                               |
| 6:9   | axis direction d (as given, not normalised) | 0.7 d; zero for fixed joints            |
| 9:12  | pivot: the axis origin for revolute and   | origin or aabb centre                     |
|       | continuous joints and for prismatic/screw |                                           |
|       | *doors* (sliding doors), the part's aabb  |                                           |
|       | centre for every other part (fixed too)   |                                           |
| 12:15 | r = limit / 360 (revolute, continuous)    | [r, r, r], else 0                         |
| 15:18 | l = limit (prismatic, screw; raw units)   | [l, l, l], else 0                         |
| 18:24 | semantic label id (0..7), repeated 6x     | label / 5 - 0.8                           |

- ``limit`` is the joint's upper limit, PAct's ``joint.range[1]``: degrees for rotational
  joints, a length for prismatic and screw joints (a screw joint stores no turn).
- Flip rule (moving joints only): when the 0.7-scaled direction has more negative than
  positive components (zeros not counted; a tie is not flipped), the direction and both
  range slots are negated. The pivot is not.
- `validity_mask` hides the axis and pivot slots (6:12) of fixed joints (PAct's
  ``x_0_arti_mask``); their zero range slots stay visible, as in PAct.

ENCODING names this layout. format.py (format_version 2) and trial checkpoints record it:
datasets and checkpoints of the project's first encoding (range pair tiled as
[r, l, r, l, r, l], first significant axis component made positive, unit axis, zero
pivot for fixed parts) are refused rather than misread.
"""

import numpy as np
import torch
from numpy.typing import ArrayLike

ARTICULATION_DIM = 24
# The layout above (PAct d974309); format.py and trial checkpoints record it.
ENCODING = "pact-d974309"

SLOT_GROUPS: dict[str, slice] = {
    "type": slice(0, 6),
    "axis": slice(6, 9),
    "origin": slice(9, 12),
    "range": slice(12, 18),
    "label": slice(18, 24),
}
_TURNS = slice(12, 15)  # r = limit / 360 of rotational joints
_LENGTH = slice(15, 18)  # l = limit of prismatic and screw joints

JOINT_TYPES: dict[str, int] = {
    "fixed": 1,
    "revolute": 2,
    "prismatic": 3,
    "screw": 4,
    "continuous": 5,
}
FIXED = JOINT_TYPES["fixed"]
ROTATIONAL = (JOINT_TYPES["revolute"], JOINT_TYPES["continuous"])  # limits in degrees
SLIDING = (JOINT_TYPES["prismatic"], JOINT_TYPES["screw"])  # limits in length units
# Slots hidden for fixed joints: axis and origin.
_GEOMETRY = slice(SLOT_GROUPS["axis"].start, SLOT_GROUPS["origin"].stop)

# Semantic label ids: PAct's `sem_ref` (door, drawer, base, handle, wheel, knob, shelf, tray).
# So door = 0, drawer = 1, base = 2, handle = 3, wheel = 4, knob = 5, shelf = 6, tray = 7.
LABELS: tuple[str, ...] = ("door", "drawer", "base", "handle", "wheel", "knob", "shelf", "tray")
LABEL_IDS: dict[str, int] = {name: i for i, name in enumerate(LABELS)}
DOOR = LABEL_IDS["door"]

AXIS_SCALE = 0.7
AXIS_ZERO_TOL = 1e-6
_TYPE_SCALE, _TYPE_SHIFT = 1.0 / 5.0, -0.5
_LABEL_SCALE, _LABEL_SHIFT = 1.0 / 5.0, -0.8
_DEGREES_PER_TURN = 360.0
_MIN_JOINT, _MAX_JOINT = min(JOINT_TYPES.values()), max(JOINT_TYPES.values())

Array = np.ndarray | torch.Tensor


def uses_origin(joint_types: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """bool [K]: whether slots 9:12 hold the axis origin (True) or the aabb centre (False):
    rotational joints, and sliding joints of doors (PAct's ``name != "door"`` test)."""
    joint_types, labels = np.asarray(joint_types), np.asarray(labels)
    return np.isin(joint_types, ROTATIONAL) | (np.isin(joint_types, SLIDING) & (labels == DOOR))


def encode_articulation_batch(
    joint_types: ArrayLike,
    axes: ArrayLike,
    origins: ArrayLike,
    centres: ArrayLike,
    limits: ArrayLike,
    labels: ArrayLike,
) -> np.ndarray:
    """Encode K parts at once, as PAct does (module docstring).

    joint_types: [K] ids 1..5; axes: [K, 3] joint directions (used as given: PAct scales
    but does not normalise them; ignored for fixed joints); origins: [K, 3] axis origins;
    centres: [K, 3] aabb centres; limits: [K] upper joint limits (degrees for revolute and
    continuous, lengths for prismatic and screw, ignored for fixed); labels: [K] ids 0..7.
    Returns float32 [K, 24].
    """
    joint_types = np.asarray(joint_types, dtype=np.int64).reshape(-1)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    k = joint_types.shape[0]
    axes, origins, centres = (np.reshape(a, (k, 3)) for a in (axes, origins, centres))
    limits = np.reshape(limits, (k,))
    if labels.shape != (k,):
        raise ValueError(f"labels has {labels.shape[0]} entries for {k} joint types.")
    if ((joint_types < _MIN_JOINT) | (joint_types > _MAX_JOINT)).any():
        raise ValueError(f"joint types must be ids {_MIN_JOINT}..{_MAX_JOINT}, got {joint_types.tolist()}.")
    if ((labels < 0) | (labels >= len(LABELS))).any():
        raise ValueError(f"labels must be ids 0..{len(LABELS) - 1}, got {labels.tolist()}.")

    # PAct's arithmetic is float32 throughout (e.g. the prismatic code 3/5 - 0.5 is 0.10000002).
    f32 = np.float32
    axes, origins, centres, limits = (np.asarray(a, dtype=f32) for a in (axes, origins, centres, limits))
    moving = joint_types != FIXED
    direction = np.where(moving[:, None], axes * f32(AXIS_SCALE), f32(0))
    flip = moving & ((direction > 0).sum(1) < (direction < 0).sum(1))
    sign = np.where(flip, f32(-1), f32(1))
    turns = np.where(np.isin(joint_types, ROTATIONAL), limits / f32(_DEGREES_PER_TURN), f32(0)) * sign
    length = np.where(np.isin(joint_types, SLIDING), limits, f32(0)) * sign

    vec = np.empty((k, ARTICULATION_DIM), dtype=f32)
    vec[:, SLOT_GROUPS["type"]] = (joint_types.astype(f32) * f32(_TYPE_SCALE) + f32(_TYPE_SHIFT))[:, None]
    vec[:, SLOT_GROUPS["axis"]] = direction * sign[:, None]
    vec[:, SLOT_GROUPS["origin"]] = np.where(uses_origin(joint_types, labels)[:, None], origins, centres)
    vec[:, _TURNS] = turns[:, None]
    vec[:, _LENGTH] = length[:, None]
    vec[:, SLOT_GROUPS["label"]] = (labels.astype(f32) * f32(_LABEL_SCALE) + f32(_LABEL_SHIFT))[:, None]
    return vec


def encode_articulation(
    joint_type: int,
    axis: ArrayLike,
    origin: ArrayLike,
    centre: ArrayLike,
    limit: float,
    label: int,
) -> np.ndarray:
    """Encode one part: float32 [24]. axis, origin, centre: [3]; limit: the upper joint limit."""
    return encode_articulation_batch([joint_type], [axis], [origin], [centre], [limit], [label])[0]


def _round_ids(x: Array, low: int, high: int) -> Array:
    """Round to the nearest integer id and clamp to [low, high]; int64 result."""
    if isinstance(x, torch.Tensor):
        return torch.round(x).clamp(low, high).long()
    return np.clip(np.rint(x), low, high).astype(np.int64)


def decode_articulation(vec: Array) -> dict[str, Array]:
    """Decode articulation vectors [..., 24] (numpy array or torch tensor).

    Repeated slots are averaged and discrete ones rounded and clamped to valid ids.
    Returns (same array kind as the input):
      joint_type [...] int64 in 1..5, axis [..., 3] unit length (zero stays zero; the
      stored, possibly flipped, direction), origin [..., 3] (the pivot slots: the axis
      origin or the aabb centre, see `uses_origin`), range [..., 2] as (revolute degrees
      r * 360, prismatic length l), label [...] int64 in 0..7.
    """
    if vec.shape[-1] != ARTICULATION_DIM:
        raise ValueError(f"articulation vectors need {ARTICULATION_DIM} numbers, got shape {tuple(vec.shape)}.")
    type_value = vec[..., SLOT_GROUPS["type"]].mean(-1)
    label_value = vec[..., SLOT_GROUPS["label"]].mean(-1)
    axis = vec[..., SLOT_GROUPS["axis"]] / AXIS_SCALE
    norm = (axis * axis).sum(-1, keepdims=True) ** 0.5
    turns, length = vec[..., _TURNS].mean(-1), vec[..., _LENGTH].mean(-1)
    stack = torch.stack if isinstance(vec, torch.Tensor) else np.stack
    return {
        "joint_type": _round_ids((type_value - _TYPE_SHIFT) / _TYPE_SCALE, _MIN_JOINT, _MAX_JOINT),
        "axis": axis / norm.clip(min=AXIS_ZERO_TOL),
        "origin": vec[..., SLOT_GROUPS["origin"]],
        "range": stack([turns * _DEGREES_PER_TURN, length], -1),
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
