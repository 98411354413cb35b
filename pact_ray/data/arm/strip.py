"""The SO-100-style arm's joints and the motor strip: how the world model's frames carry
the joint positions and velocities, and the action ids of the single-action data set.

Joints (degrees): J0 shoulder pan, J1 shoulder lift, J2 elbow flex, J3 wrist flex,
J4 wrist roll, J5 gripper. Actions of the single-action data set move the shoulder pan:
STAY (0), MOVE+ (1), MOVE- (2).

**Motor strip.** The model's frame is the camera image with ``strip_rows`` rows appended
at the bottom. The strip's upper half encodes each joint's position, its lower half each
joint's velocity (degrees per frame: the position change since the previous frame, 0 at
an episode's first frame). Each half is cut into six cells, joint j owning the columns
``[j*W//6, (j+1)*W//6)``. A value x of range [lo, hi] becomes ``u = (x - lo) / (hi - lo)``
(clipped to [0, 1]) and the integer total ``T = round(255 * n * u)`` over the cell's n
pixels, spread as evenly as uint8 allows: every pixel gets ``T // n`` and the first
``T % n`` pixels (raster order) one level more, identically in the three channels. The
cell's mean intensity is then exactly ``T / (255 n)``, so decoding (the mean mapped back
to [lo, hi]) returns the quantised value exactly, with a quantum of ``(hi - lo) / (255 n)``
(0.02 degree for a position cell of a 64-pixel wide frame). Decoding a predicted frame
is the same mean: it is linear in the pixels, so a blurred prediction decodes to the
blurred value rather than to noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

NUM_JOINTS = 6
JOINT_NAMES = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
JOINT_LABELS = tuple(f"J{j}" for j in range(NUM_JOINTS))
PAN = 0  # the joint the actions move
ACTIONS = ("STAY", "MOVE+", "MOVE-")
STAY, MOVE_POS, MOVE_NEG = range(3)
# Encoding ranges of the motor strip (degrees, degrees per frame).
POSITION_RANGES = np.array([(-120.0, 120.0)] * 4 + [(-180.0, 180.0), (-10.0, 110.0)])
VELOCITY_RANGE = (-10.0, 10.0)
STRIP_ROWS = 8
ACTION_DEADBAND = 1.0  # degrees: |commanded pan change| above this is a MOVE


@dataclass(frozen=True)
class MotorStrip:
    """The codec of the strip at the bottom of ``width``-pixel wide frames (see the module docstring)."""

    width: int
    rows: int = STRIP_ROWS

    def __post_init__(self) -> None:
        if self.rows < 2 or self.rows % 2:
            raise ValueError(f"strip rows must be an even number >= 2, got {self.rows}")
        if self.width < NUM_JOINTS:
            raise ValueError(f"frames must be at least {NUM_JOINTS} pixels wide for the strip, got {self.width}")

    @cached_property
    def edges(self) -> tuple[int, ...]:
        """Column edges of the joint cells: cell j is ``[edges[j], edges[j + 1])``."""
        return tuple(j * self.width // NUM_JOINTS for j in range(NUM_JOINTS + 1))

    def _cells(self):
        """(joint, half, rows slice, column slice, pixel count, lo, hi) of every cell."""
        half = self.rows // 2
        for half_index, (lo_hi, r) in enumerate(((None, slice(0, half)), (VELOCITY_RANGE, slice(half, self.rows)))):
            for j in range(NUM_JOINTS):
                lo, hi = POSITION_RANGES[j] if lo_hi is None else lo_hi
                cols = slice(self.edges[j], self.edges[j + 1])
                yield j, half_index, r, cols, half * (cols.stop - cols.start), float(lo), float(hi)

    def encode(self, positions: np.ndarray, velocities: np.ndarray) -> np.ndarray:
        """positions, velocities: [..., 6] -> strip pixels [..., rows, width] uint8."""
        positions, velocities = np.asarray(positions, np.float64), np.asarray(velocities, np.float64)
        lead = positions.shape[:-1]
        out = np.zeros((*lead, self.rows, self.width), dtype=np.uint8)
        for j, half, r, cols, n, lo, hi in self._cells():
            value = (positions if half == 0 else velocities)[..., j]
            total = _level_total(value, lo, hi, n)
            k = np.arange(n)
            cell = total[..., None] // n + (k < (total % n)[..., None])
            out[..., r, cols] = cell.reshape(*lead, r.stop - r.start, cols.stop - cols.start).astype(np.uint8)
        return out

    def quantize(self, positions: np.ndarray, velocities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The values :meth:`decode` returns for a frame encoded from these ([..., 6] each)."""
        out = (np.empty(np.shape(positions)), np.empty(np.shape(velocities)))
        for j, half, _, _, n, lo, hi in self._cells():
            value = np.asarray((positions, velocities)[half], np.float64)[..., j]
            out[half][..., j] = lo + (_level_total(value, lo, hi, n) / (255.0 * n)) * (hi - lo)
        return out

    def decode(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """frames: [..., H, W, C] (uint8, or float in [0, 1]) -> (positions, velocities), [..., 6] each.

        Exact (bit for bit equal to :meth:`quantize`) on uint8 frames made by :meth:`encode`.
        """
        frames = np.asarray(frames)
        if frames.shape[-2] != self.width:
            raise ValueError(f"frames are {frames.shape[-2]} pixels wide, the strip is {self.width}")
        strip = frames[..., -self.rows:, :, :]
        channels = frames.shape[-1]
        lead = frames.shape[:-3]
        out = (np.empty((*lead, NUM_JOINTS)), np.empty((*lead, NUM_JOINTS)))
        for j, half, r, cols, n, lo, hi in self._cells():
            cell = strip[..., r, cols, :]
            if frames.dtype == np.uint8:  # integer sum: the exact T of the encoder, times the channels
                mean = cell.sum(axis=(-3, -2, -1), dtype=np.int64) / (255.0 * n * channels)
            else:
                mean = cell.sum(axis=(-3, -2, -1), dtype=np.float64) / (n * channels)
            out[half][..., j] = lo + mean * (hi - lo)
        return out

    def quantum(self) -> tuple[np.ndarray, np.ndarray]:
        """The decoding resolution of each joint's position and velocity ([6] each)."""
        out = (np.empty(NUM_JOINTS), np.empty(NUM_JOINTS))
        for j, half, _, _, n, lo, hi in self._cells():
            out[half][j] = (hi - lo) / (255.0 * n)
        return out


def _level_total(value: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray:
    """T = round(255 n u) with u the value's position in [lo, hi], clipped to [0, 1]."""
    u = np.clip((np.asarray(value, np.float64) - lo) / (hi - lo), 0.0, 1.0)
    return np.rint(u * 255.0 * n).astype(np.int64)


def velocities_of(positions: np.ndarray) -> np.ndarray:
    """[T, 6] positions of one episode -> [T, 6] velocities (position change per frame; 0 at t = 0)."""
    return np.concatenate([np.zeros_like(positions[:1]), np.diff(positions, axis=0)])


def action_ids(state: np.ndarray, action: np.ndarray, deadband: float = ACTION_DEADBAND) -> np.ndarray:
    """[T, 6] state and commanded positions -> [T] action ids: MOVE+/MOVE- where the commanded
    pan change exceeds ``deadband`` degrees, else STAY."""
    delta = action[:, PAN].astype(np.float64) - state[:, PAN]
    return np.where(delta > deadband, MOVE_POS, np.where(delta < -deadband, MOVE_NEG, STAY)).astype(np.int64)
