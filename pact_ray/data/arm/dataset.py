"""The world model's samples from a LeRobot-style arm data set (recorded or synthetic):
each frame is the camera image with the motor strip (:mod:`pact_ray.data.arm.strip`)
appended; a sample is ``context`` frames and the action taken after the last -> the next
frame; the episodes are split into training and validation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pact_ray.data.arm.lerobot import Episode, read_lerobot
from pact_ray.data.arm.strip import ACTION_DEADBAND, NUM_JOINTS, STRIP_ROWS, MotorStrip, action_ids, velocities_of
from pact_ray.errors import DataError


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
