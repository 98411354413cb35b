"""An SO-100-style arm for the world model: joints, the motor strip, a synthetic episode
generator, and the model's samples (context frames + action -> next frame).

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

**Synthetic episodes.** A side-and-above orthographic view of the arm from its forward
kinematics (base column, upper arm, forearm, wrist, two gripper fingers whose spread is
J5 and whose plane turns with J4), rendered with anti-aliased capsules. An episode holds
actions for 3 to 8 frames at a time; MOVE+/MOVE- turn the pan by ``move_speed`` degrees per
frame, STAY holds it; the pan also gets Gaussian noise, and the other joints drift in a
slow random walk. Episode e is drawn from ``np.random.default_rng([seed, e])``. The data
set is written in the LeRobot-style format of :mod:`pact_ray.data.lerobot` (``action`` =
the commanded joint positions), exactly what recorded data looks like, and read back
through the same loader.

CLI: ``python -m pact_ray.data.arm --out DIR [--episodes 24] [--length 24] [--seed 0]``
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from pact_ray.data.format import DataError
from pact_ray.data.lerobot import Episode, read_lerobot, write_lerobot

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
DEFAULT_CAMERA_SIZE = (56, 64)  # (H, W) of the synthetic camera image; + STRIP_ROWS = 64 x 64 frames
DEFAULT_FPS = 10.0


# ------------------------------------------------------------------ motor strip

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


# ------------------------------------------------------------------ rendering

UPPER, FORE, WRIST, FINGER = 0.12, 0.12, 0.05, 0.035  # link lengths (m)
SHOULDER_HEIGHT = 0.06
ELEVATION = math.radians(35.0)  # camera elevation above the table
VIEW_X = (-0.1, 0.276)  # projected extent shown (m): the arm reaches to the right at pan 0
VIEW_TOP = 0.2
WALL, TABLE = np.array([0.86, 0.88, 0.91]), np.array([0.74, 0.69, 0.6])
COLOURS = {
    "plate": (0.28, 0.28, 0.31), "column": (0.36, 0.36, 0.4), "upper": (0.95, 0.52, 0.1), "fore": (0.97, 0.72, 0.18),
    "wrist": (0.2, 0.45, 0.85), "finger": (0.12, 0.12, 0.14), "joint": (0.1, 0.1, 0.1),
}


def forward_kinematics(joints: Sequence[float]) -> dict[str, np.ndarray]:
    """Joint angles (degrees, [6]) -> 3D points (m, x right, y away from the camera, z up) of
    the base, shoulder, elbow, wrist, gripper root and the two finger tips."""
    pan, lift, elbow, wrist, roll, grip = np.radians(np.asarray(joints, np.float64))
    radial = np.array([math.cos(pan), math.sin(pan), 0.0])
    up = np.array([0.0, 0.0, 1.0])
    side = np.cross(up, radial)
    a1 = math.pi / 2 + lift / 2  # upper-arm elevation: 45 degrees at lift -90
    a2 = a1 - elbow
    a3 = a2 - wrist

    def step(p: np.ndarray, angle: float, length: float) -> np.ndarray:
        return p + length * (math.cos(angle) * radial + math.sin(angle) * up)

    base = np.zeros(3)
    shoulder = base + SHOULDER_HEIGHT * up
    elbow_p = step(shoulder, a1, UPPER)
    wrist_p = step(elbow_p, a2, FORE)
    root = step(wrist_p, a3, WRIST)
    normal = -math.sin(a3) * radial + math.cos(a3) * up  # in the arm plane, across the gripper axis
    spread = (0.004 + 0.018 * np.clip(np.degrees(grip), 0, 100) / 100) * (math.cos(roll) * normal + math.sin(roll) * side)
    tip = step(root, a3, FINGER)
    return {"base": base, "shoulder": shoulder, "elbow": elbow_p, "wrist": wrist_p, "root": root,
            "tip_a": tip + spread, "tip_b": tip - spread, "root_a": root + spread, "root_b": root - spread}


def _project(p: np.ndarray) -> tuple[float, float, float]:
    """3D point -> (image x, image y up, depth away from the camera), orthographic."""
    return p[0], p[1] * math.sin(ELEVATION) + p[2] * math.cos(ELEVATION), p[1] * math.cos(ELEVATION) - p[2] * math.sin(ELEVATION)


class ArmRenderer:
    """Renders joint angles to [H, W, 3] uint8 camera images (anti-aliased capsules, painter's order)."""

    def __init__(self, size: tuple[int, int] = DEFAULT_CAMERA_SIZE):
        self.height, self.width = size
        self.scale = self.width / (VIEW_X[1] - VIEW_X[0])  # pixels per metre
        ys, xs = np.mgrid[0 : self.height, 0 : self.width].astype(np.float64) + 0.5
        self.pixels = np.stack([xs, ys], axis=-1)  # [H, W, 2] pixel centres
        horizon = self._to_pixel(0.0, 0.12)[1]
        t = np.clip((ys - horizon) / self.height + 0.5, 0, 1)[..., None]
        self.background = np.where(ys[..., None] < horizon, WALL, TABLE * (0.9 + 0.2 * t))

    def _to_pixel(self, x: float, y_up: float) -> np.ndarray:
        return np.array([(x - VIEW_X[0]) * self.scale, (VIEW_TOP - y_up) * self.scale])

    def _capsule(self, img: np.ndarray, a: np.ndarray, b: np.ndarray, radius_m: float, colour) -> None:
        pa, pb = self._to_pixel(*_project(a)[:2]), self._to_pixel(*_project(b)[:2])
        d = pb - pa
        t = np.clip(((self.pixels - pa) @ d) / max(float(d @ d), 1e-12), 0, 1)
        dist = np.linalg.norm(self.pixels - (pa + t[..., None] * d), axis=-1)
        cover = np.clip(radius_m * self.scale + 0.5 - dist, 0, 1)[..., None]
        img *= 1 - cover
        img += cover * np.asarray(colour)

    def render(self, joints: Sequence[float]) -> np.ndarray:
        """joints: [6] degrees -> [H, W, 3] uint8."""
        p = forward_kinematics(joints)
        img = self.background.copy()
        # The base plate: a disc on the table, seen as an ellipse.
        centre = self._to_pixel(0.0, 0.0)
        r = 0.035 * self.scale
        e = ((self.pixels[..., 0] - centre[0]) / r) ** 2 + ((self.pixels[..., 1] - centre[1]) / (r * math.sin(ELEVATION))) ** 2
        cover = np.clip((1 - e) * r / 2, 0, 1)[..., None]
        img = img * (1 - cover) + cover * np.asarray(COLOURS["plate"])
        parts = [
            (p["base"], p["shoulder"], 0.016, "column"), (p["shoulder"], p["elbow"], 0.011, "upper"),
            (p["elbow"], p["wrist"], 0.009, "fore"), (p["wrist"], p["root"], 0.008, "wrist"),
            (p["root_a"], p["tip_a"], 0.004, "finger"), (p["root_b"], p["tip_b"], 0.004, "finger"),
            (p["root_a"], p["root_b"], 0.004, "finger"),
        ]
        parts.sort(key=lambda s: -(_project(s[0])[2] + _project(s[1])[2]))  # far first
        for a, b, radius, name in parts:
            self._capsule(img, a, b, radius, COLOURS[name])
        for name in ("shoulder", "elbow", "wrist"):
            self._capsule(img, p[name], p[name], 0.006, COLOURS["joint"])
        return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ episodes

@dataclass(frozen=True)
class ArmEpisodeConfig:
    """How synthetic episodes are drawn (the generator settings a data set records)."""

    length: int = 24  # frames per episode
    move_speed: float = 4.0  # pan degrees per frame of MOVE+ / MOVE-
    pan_noise: float = 0.2  # std of the pan's per-frame noise (degrees)
    drift: float = 0.3  # std of the per-frame velocity kicks of the other joints (degrees)
    hold: tuple[int, int] = (3, 8)  # an action is held for this many frames (inclusive range)
    pan_limit: float = 80.0  # a move that would pass +-pan_limit turns back


def simulate_episode(rng: np.random.Generator, cfg: ArmEpisodeConfig = ArmEpisodeConfig()) -> tuple[np.ndarray, np.ndarray]:
    """One episode's (state, action): [T, 6] joint positions and commanded positions (degrees).

    The action of frame t (taken after frame t is seen) commands the pan to
    ``state[t, 0] + {0, +speed, -speed}``; the other joints are commanded to stay.
    """
    T = cfg.length
    state = np.zeros((T, NUM_JOINTS))
    action = np.zeros((T, NUM_JOINTS))
    pos = np.array([rng.uniform(-60, 60), -90 + rng.normal(0, 3), 70 + rng.normal(0, 6),
                    39 + rng.normal(0, 2), 8.5 + rng.normal(0, 1), 10 + rng.normal(0, 1)])
    vel = np.zeros(NUM_JOINTS)
    current, held = STAY, 0
    for t in range(T):
        state[t] = pos
        if held == 0:
            current, held = int(rng.integers(3)), int(rng.integers(cfg.hold[0], cfg.hold[1] + 1))
        if current == MOVE_POS and pos[PAN] + cfg.move_speed > cfg.pan_limit:
            current = MOVE_NEG
        elif current == MOVE_NEG and pos[PAN] - cfg.move_speed < -cfg.pan_limit:
            current = MOVE_POS
        held -= 1
        command = (0.0, cfg.move_speed, -cfg.move_speed)[current]
        action[t] = pos
        action[t, PAN] = pos[PAN] + command
        vel = 0.8 * vel + rng.normal(0, cfg.drift, NUM_JOINTS)
        vel[PAN] = command + rng.normal(0, cfg.pan_noise)
        pos = pos + vel
        pos[-1] = np.clip(pos[-1], 0, 100)  # the gripper's opening
    return state, action


def generate_arm_dataset(
    out: str | os.PathLike,
    episodes: int = 24,
    seed: int = 0,
    cfg: ArmEpisodeConfig = ArmEpisodeConfig(),
    camera_size: tuple[int, int] = DEFAULT_CAMERA_SIZE,
    fps: float = DEFAULT_FPS,
    frame_format: str = "png",
) -> Path:
    """Write ``episodes`` synthetic episodes as a LeRobot-style folder at ``out``.

    The folder is built beside ``out`` and renamed into place when complete: a failure
    leaves nothing half-written, and ``out`` must not exist yet.
    """
    out = Path(out)
    if episodes < 2:
        raise ValueError(f"episodes must be >= 2 (one for training, one for validation), got {episodes}")
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    renderer = ArmRenderer(camera_size)
    eps = []
    for e in range(episodes):
        state, action = simulate_episode(np.random.default_rng([seed, e]), cfg)
        frames = np.stack([renderer.render(s) for s in state])
        eps.append(Episode(index=e, frame_index=np.arange(cfg.length), timestamp=None,
                           state=state.astype(np.float32), action=action.astype(np.float32), frames=frames))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_lerobot(tmp, eps, fps=fps, joint_names=JOINT_NAMES, frame_format=frame_format,
                      task="move the shoulder pan: stay, move+ or move-")
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_arm_dataset(episodes: int, length: int, seed: int, root: Path | None = None) -> Path:
    """The cached synthetic data set with these settings, generated once per machine
    (``$PACT_RAY_DATA_CACHE``, like the Stage1 data; concurrent trials share one copy)."""
    from pact_ray.data.cache import cache_root

    root = Path(root) if root is not None else cache_root()
    final = root / f"arm-e{episodes}-t{length}-s{seed}"
    if (final / "meta" / "info.json").is_file():
        return final
    tmp = root / f".{final.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate_arm_dataset(tmp, episodes, seed, ArmEpisodeConfig(length=length))
    try:
        os.rename(tmp, final)
    except OSError:  # another trial won the race: both copies are identical
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "meta" / "info.json").is_file():
            raise
    return final


# ------------------------------------------------------------------ samples

@dataclass
class ArmEpisode:
    """One episode ready for the model.

    frames: [T, 3, H, W] uint8 (camera rows, then the strip of the joints' positions and
    velocities); actions: [T] int64, the action taken after frame t.
    """

    index: int
    frames: torch.Tensor
    actions: np.ndarray


@dataclass
class WorldModelBatch:
    """A batch of samples: context frames and the action -> the next frame.

    context: [N, C, 3, H, W] float in [0, 1] (oldest first); action: [N] long;
    target: [N, 3, H, W] float in [0, 1]; episode, frame: [N] where the target comes from.
    """

    context: torch.Tensor
    action: torch.Tensor
    target: torch.Tensor
    episode: np.ndarray
    frame: np.ndarray

    def to(self, device: torch.device) -> WorldModelBatch:
        return WorldModelBatch(self.context.to(device), self.action.to(device), self.target.to(device), self.episode, self.frame)


class SampleSet:
    """The samples of some episodes: every target frame t + 1 with ``context`` frames before it."""

    def __init__(self, episodes: Sequence[ArmEpisode], context: int):
        self.episodes = list(episodes)
        self.context = context
        self.index = np.array([(i, t) for i, ep in enumerate(self.episodes) for t in range(context - 1, len(ep.actions) - 1)],
                              dtype=np.int64).reshape(-1, 2)  # (episode position, last context frame)

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, ids: Sequence[int] | np.ndarray) -> WorldModelBatch:
        """The samples ``ids`` (positions in this set)."""
        rows = self.index[np.asarray(ids, dtype=np.int64)]
        ctx, tgt, act = [], [], []
        for i, t in rows:
            ep = self.episodes[i]
            ctx.append(ep.frames[t - self.context + 1 : t + 1])
            tgt.append(ep.frames[t + 1])
            act.append(int(ep.actions[t]))
        return WorldModelBatch(
            context=torch.stack(ctx).float() / 255, action=torch.tensor(act),
            target=torch.stack(tgt).float() / 255,
            episode=np.array([self.episodes[i].index for i in rows[:, 0]]), frame=rows[:, 1] + 1,
        )


class WorldModelData:
    """A LeRobot-style folder as world-model samples, split into train and validation by episode.

    image_size: H = W of the model's frames (camera rows resized to H - strip_rows, then
    the strip); context: frames before the target; val_fraction of the episodes (at least
    one, at most all but one) go to validation, chosen by ``split_seed``.
    """

    def __init__(self, folder: str | os.PathLike, image_size: int = 64, context: int = 2, val_fraction: float = 0.25,
                 split_seed: int = 0, strip_rows: int = STRIP_ROWS, camera: str | None = None,
                 deadband: float = ACTION_DEADBAND):
        self.folder = Path(folder)
        self.strip = MotorStrip(image_size, strip_rows)
        self.image_size = image_size
        self.context = context
        info, raw = read_lerobot(self.folder, camera, frame_size=(image_size - strip_rows, image_size))
        self.info = info
        if len(raw) < 2:
            raise DataError(f"dataset {self.folder} has {len(raw)} episode(s); the train/validation split needs at least 2")
        if raw[0].state.shape[1] != NUM_JOINTS:
            raise DataError(f"dataset {self.folder}: observation.state has {raw[0].state.shape[1]} entries, expected {NUM_JOINTS} joints")
        self.episodes = [self._episode(ep) for ep in raw]
        short = [ep.index for ep in self.episodes if len(ep.actions) < context + 1]
        if short:
            raise DataError(f"dataset {self.folder}: episode {short[0]} has fewer than {context + 1} frames (context {context} + target)")
        order = np.random.default_rng(split_seed).permutation(len(self.episodes))
        n_val = min(len(order) - 1, max(1, round(val_fraction * len(order))))
        self.val_episodes = sorted(self.episodes[i].index for i in order[:n_val])
        self.train = SampleSet([ep for ep in self.episodes if ep.index not in self.val_episodes], context)
        self.val = SampleSet([ep for ep in self.episodes if ep.index in self.val_episodes], context)

    def _episode(self, ep: Episode) -> ArmEpisode:
        positions = ep.state.astype(np.float64)
        velocities = velocities_of(positions)
        strip = np.repeat(self.strip.encode(positions, velocities)[..., None], 3, axis=-1)  # [T, rows, W, 3]
        frames = np.concatenate([ep.frames, strip], axis=1)  # [T, H, W, 3]
        return ArmEpisode(index=ep.index, frames=torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2))),
                          actions=action_ids(ep.state, ep.action))

    def validate_all(self) -> WorldModelData:
        """The sweep harness's pre-flight check: the constructor already read and checked
        every table row and frame, and both splits hold samples."""
        return self


def main(argv: list[str] | None = None) -> int:
    from pact_ray.cli import OneLineParser

    p = OneLineParser(description="Write a synthetic SO-100-style arm data set (LeRobot-style folder).")
    p.add_argument("--out", required=True, help="the folder to create")
    p.add_argument("--episodes", type=int, default=24)
    p.add_argument("--length", type=int, default=24, help="frames per episode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frame-format", default="png", choices=["png", "npy", "npz"])
    args = p.parse_args(argv)
    try:
        path = generate_arm_dataset(args.out, args.episodes, args.seed, ArmEpisodeConfig(length=args.length),
                                    frame_format=args.frame_format)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
