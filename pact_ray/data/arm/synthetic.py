"""Synthetic episodes of the SO-100-style arm (:mod:`pact_ray.data.arm.strip` has its
joints), written as a LeRobot-style data set.

**Synthetic episodes.** A side-and-above orthographic view of the arm from its forward
kinematics (base column, upper arm, forearm, wrist, two gripper fingers whose spread is
J5 and whose plane turns with J4), rendered with anti-aliased capsules. An episode holds
actions for 3 to 8 frames at a time; MOVE+/MOVE- turn the pan by ``move_speed`` degrees per
frame, STAY holds it; the pan also gets Gaussian noise, and the other joints drift in a
slow random walk. Episode e is drawn from ``np.random.default_rng([seed, e])``. The data
set is written in the LeRobot-style format of :mod:`pact_ray.data.lerobot` (``action`` =
the commanded joint positions), exactly what recorded data looks like, and read back
through the same loader.

CLI: ``python -m pact_ray.data.arm.synthetic --out DIR [--episodes 24] [--length 24] [--seed 0]``
(also ``pact-arm-data``).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pact_ray.data.arm.lerobot import Episode, write_lerobot
from pact_ray.data.arm.strip import JOINT_NAMES, MOVE_NEG, MOVE_POS, NUM_JOINTS, PAN, STAY
from pact_ray.data.cache import ARM_MARKER, arm_set_name, cached

DEFAULT_CAMERA_SIZE = (56, 64)  # (H, W) of the synthetic camera image; + STRIP_ROWS = 64 x 64 frames
DEFAULT_FPS = 10.0


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
    """The cached synthetic data set with these settings (:func:`pact_ray.data.cache.cached`),
    generated once per machine (``$PACT_RAY_DATA_CACHE``; concurrent trials share one copy)."""
    return cached(arm_set_name(episodes, length, seed), ARM_MARKER,
                  lambda out: generate_arm_dataset(out, episodes, seed, ArmEpisodeConfig(length=length)), root)


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
