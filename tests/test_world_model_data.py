"""The world model's data: the motor strip codec, the synthetic arm generator, the
LeRobot-style format and loader, samples and the split, and the loader's errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import rounding_bound

from pact_ray.data.arm.dataset import WorldModelData
from pact_ray.data.arm.lerobot import IMAGE_PATH, INFO_FILE, REQUIRED_COLUMNS, Episode, read_lerobot, write_lerobot
from pact_ray.data.arm.strip import (
    ACTIONS,
    JOINT_NAMES,
    MOVE_NEG,
    MOVE_POS,
    NUM_JOINTS,
    POSITION_RANGES,
    STAY,
    VELOCITY_RANGE,
    MotorStrip,
    action_ids,
    velocities_of,
)
from pact_ray.data.arm.synthetic import ArmEpisodeConfig, ensure_arm_dataset, generate_arm_dataset, simulate_episode
from pact_ray.errors import DataError

SHORT = ArmEpisodeConfig(length=8)


@pytest.fixture(scope="module")
def arm_folder(tmp_path_factory) -> Path:
    return generate_arm_dataset(tmp_path_factory.mktemp("arm") / "data", episodes=4, seed=3, cfg=SHORT)


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


# ------------------------------------------------------------------ motor strip

joint_values = st.lists(st.floats(-200, 200, allow_nan=False), min_size=NUM_JOINTS, max_size=NUM_JOINTS)


@settings(max_examples=60, deadline=None)
@given(positions=st.lists(joint_values, min_size=1, max_size=3), velocities=st.lists(joint_values, min_size=1, max_size=3),
       width=st.sampled_from([16, 64, 65, 100]), rows=st.sampled_from([2, 8]))
def test_strip_decode_is_exact_on_encoded_frames(positions, velocities, width, rows):
    n = min(len(positions), len(velocities))
    pos, vel = np.array(positions[:n]), np.array(velocities[:n]) / 10
    strip = MotorStrip(width, rows)
    pixels = strip.encode(pos, vel)  # [n, rows, W]
    frames = np.concatenate([np.full((n, 5, width), 77, np.uint8), pixels], axis=1)
    frames = np.repeat(frames[..., None], 3, axis=-1)  # camera rows above the strip
    got_pos, got_vel = strip.decode(frames)
    want_pos, want_vel = strip.quantize(pos, vel)
    np.testing.assert_array_equal(got_pos, want_pos)  # bit-exact
    np.testing.assert_array_equal(got_vel, want_vel)
    q_pos, q_vel = strip.quantum()
    clipped_pos = np.clip(pos, POSITION_RANGES[:, 0], POSITION_RANGES[:, 1])
    clipped_vel = np.clip(vel, *VELOCITY_RANGE)
    # Rounding to the quantum, plus the float64 arithmetic of the two sides (a few operations
    # on values of the range's size).
    span = float(np.ptp(POSITION_RANGES, axis=1).max())
    f64 = rounding_bound(span, 8, torch.float64)
    assert np.all(np.abs(got_pos - clipped_pos) <= q_pos / 2 + f64)
    assert np.all(np.abs(got_vel - clipped_vel) <= q_vel / 2 + f64)
    # The float frames a model sees decode to the same values up to float rounding: each pixel
    # k/255 carries one float32 rounding (u of it); the decoder sums a cell's pixels in float64
    # and scales the mean by the range, so the error is at most u of the range (plus float64's).
    float_pos, _ = strip.decode(frames.astype(np.float32) / 255)
    assert np.abs(float_pos - want_pos).max() <= rounding_bound(span, 1, torch.float32) + f64


def test_strip_decoding_is_linear_in_the_pixels():
    """A blend of two strips decodes to the blend of their values (so a blurred prediction
    decodes to the blurred value, not to noise)."""
    strip = MotorStrip(64)
    a = np.array([[-40.0, -90, 70, 39, 8, 10]])
    b = a + np.array([[10.0, 2, -4, 0, 3, 20]])
    fa = np.repeat(strip.encode(a, np.zeros_like(a))[..., None], 3, -1) / 255
    fb = np.repeat(strip.encode(b, np.zeros_like(b))[..., None], 3, -1) / 255
    pos, _ = strip.decode(0.25 * fa + 0.75 * fb)
    # Each of a and b was rounded to the strip's quantum (<= q / 2) when encoded; the blend
    # inherits at most q / 2 from them (float64 arithmetic adds far less).
    q_pos, _ = strip.quantum()
    assert np.all(np.abs(pos - (0.25 * a + 0.75 * b)) <= q_pos / 2 + rounding_bound(360.0, 64, torch.float64))


def test_strip_rejects_bad_geometry():
    with pytest.raises(ValueError, match="even number"):
        MotorStrip(64, rows=3)
    with pytest.raises(ValueError, match="pixels wide"):
        MotorStrip(64).decode(np.zeros((64, 32, 3), np.uint8))


def test_velocities_and_action_ids():
    pos = np.cumsum(np.ones((4, NUM_JOINTS)), axis=0)
    np.testing.assert_array_equal(velocities_of(pos), np.r_[np.zeros((1, NUM_JOINTS)), np.ones((3, NUM_JOINTS))])
    state = np.zeros((3, NUM_JOINTS))
    action = state.copy()
    action[:, 0] = [0.5, 4.0, -4.0]  # within the dead band, MOVE+, MOVE-
    np.testing.assert_array_equal(action_ids(state, action), [STAY, MOVE_POS, MOVE_NEG])


# ------------------------------------------------------------------ generator and format

def test_generator_is_deterministic_per_seed(tmp_path, arm_folder):
    again = generate_arm_dataset(tmp_path / "again", episodes=4, seed=3, cfg=SHORT)
    files = sorted(p.relative_to(arm_folder) for p in arm_folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".png":
            assert (arm_folder / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = generate_arm_dataset(tmp_path / "other", episodes=4, seed=4, cfg=SHORT)
    _, a = read_lerobot(arm_folder)
    _, b = read_lerobot(again)
    _, c = read_lerobot(other)
    assert all(np.array_equal(x.state, y.state) and np.array_equal(x.frames, y.frames) for x, y in zip(a, b))
    assert not np.array_equal(a[0].state, c[0].state)


def test_generated_folder_has_the_lerobot_layout(arm_folder):
    info = json.loads((arm_folder / INFO_FILE).read_text())
    assert info["features"]["observation.state"]["names"] == list(JOINT_NAMES)
    assert info["features"]["observation.images.top"]["dtype"] == "image" and info["total_episodes"] == 4
    table = pq.read_table(arm_folder / "data" / "chunk-000" / "episode_000001.parquet")
    assert set(REQUIRED_COLUMNS) | {"timestamp", "index"} <= set(table.column_names)
    assert table.num_rows == SHORT.length and table.column("episode_index").to_pylist() == [1] * SHORT.length
    png = arm_folder / IMAGE_PATH.format(image_key="observation.images.top", episode_index=1, frame_index=7)
    assert png.is_file()
    assert len((arm_folder / "meta" / "episodes.jsonl").read_text().splitlines()) == 4


def test_episodes_move_the_pan_as_the_actions_say():
    state, action = simulate_episode(np.random.default_rng([0, 0]), ArmEpisodeConfig(length=200))
    ids = action_ids(state, action)
    step = np.diff(state[:, 0])
    for k, sign in ((STAY, 0), (MOVE_POS, 1), (MOVE_NEG, -1)):
        moves = step[ids[:-1] == k]
        assert len(moves) > 10, ACTIONS[k]
        assert abs(moves.mean() - 4.0 * sign) < 0.3
    assert np.all(np.abs(state[:, 0]) < 90)  # moves turn back before the limit
    assert 0 < np.abs(np.diff(state[:, 1:], axis=0)).mean() < 1.5  # the other joints drift a little


def test_ensure_arm_dataset_generates_once(tmp_path):
    first = ensure_arm_dataset(3, 5, 0, root=tmp_path)
    stamp = (first / INFO_FILE).stat().st_mtime_ns
    assert ensure_arm_dataset(3, 5, 0, root=tmp_path) == first and (first / INFO_FILE).stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left


@pytest.mark.parametrize("frame_format", ["npy", "npz", "mp4"])
def test_array_frames_read_like_png_frames(tmp_path, arm_folder, frame_format):
    """Arrays, and LeRobot's per-episode videos (a real MP4, lossless H.264 RGB, decoded with PyAV)."""
    _, episodes = read_lerobot(arm_folder)
    write_lerobot(tmp_path / frame_format, episodes, fps=10, joint_names=JOINT_NAMES, frame_format=frame_format)
    _, again = read_lerobot(tmp_path / frame_format)
    for a, b in zip(episodes, again):
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.state, b.state)


def test_recorded_frames_of_another_size_are_resized(tmp_path):
    rng = np.random.default_rng(0)
    episodes = [Episode(index=e, frame_index=np.arange(5), timestamp=None, state=rng.normal(size=(5, 6)).astype(np.float32),
                        action=rng.normal(size=(5, 6)).astype(np.float32), frames=rng.integers(0, 255, (5, 120, 160, 3), dtype=np.uint8))
                for e in range(3)]
    write_lerobot(tmp_path / "rec", episodes, fps=30, joint_names=JOINT_NAMES, camera="observation.images.wrist")
    data = WorldModelData(tmp_path / "rec", image_size=32, context=2)
    assert data.info.camera == "observation.images.wrist" and data.info.fps == 30
    assert tuple(data.episodes[0].frames.shape) == (5, 3, 32, 32)


# ------------------------------------------------------------------ samples

def test_samples_pair_context_and_action_with_the_next_frame(arm_folder):
    data = WorldModelData(arm_folder, image_size=64, context=2, val_fraction=0.25, split_seed=0)
    assert len(data.val_episodes) == 1
    train_eps = {ep.index for ep in data.train.episodes}
    assert train_eps.isdisjoint(data.val_episodes) and train_eps | set(data.val_episodes) == {0, 1, 2, 3}
    assert len(data.train) == 3 * (SHORT.length - 2) and len(data.val) == SHORT.length - 2
    _, raw = read_lerobot(arm_folder)
    b = data.train.batch([0, 5])
    assert b.context.shape == (2, 2, 3, 64, 64) and b.target.shape == (2, 3, 64, 64)
    for n, (e, f) in enumerate(zip(b.episode, b.frame)):
        ep = raw[e]
        np.testing.assert_array_equal((b.target[n, :, :56].permute(1, 2, 0).numpy() * 255).round(), ep.frames[f])
        np.testing.assert_array_equal((b.context[n, -1, :, :56].permute(1, 2, 0).numpy() * 255).round(), ep.frames[f - 1])
        assert int(b.action[n]) == action_ids(ep.state, ep.action)[f - 1]
    # Every frame's strip decodes to its state and velocity exactly.
    for ep, rec in zip(data.episodes, raw):
        frames = ep.frames.permute(0, 2, 3, 1).numpy()
        pos, vel = data.strip.decode(frames)
        want_pos, want_vel = data.strip.quantize(rec.state.astype(np.float64), velocities_of(rec.state.astype(np.float64)))
        np.testing.assert_array_equal(pos, want_pos)
        np.testing.assert_array_equal(vel, want_vel)


# ------------------------------------------------------------------ errors

def test_missing_column_is_named(tmp_path, arm_folder):
    folder = _copy(arm_folder, tmp_path)
    path = folder / "data" / "chunk-000" / "episode_000002.parquet"
    pq.write_table(pq.read_table(path).drop(["action"]), path)
    with pytest.raises(DataError, match=r"episode_000002\.parquet lacks the column action$"):
        WorldModelData(folder)


def test_missing_frame_is_named(tmp_path, arm_folder):
    folder = _copy(arm_folder, tmp_path)
    (folder / IMAGE_PATH.format(image_key="observation.images.top", episode_index=3, frame_index=4)).unlink()
    with pytest.raises(DataError, match=r"frame .*episode_000003/frame_000004\.png is missing"):
        WorldModelData(folder)


def test_frame_index_gap_is_named(tmp_path, arm_folder):
    folder = _copy(arm_folder, tmp_path)
    path = folder / "data" / "chunk-000" / "episode_000000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.filter(np.arange(table.num_rows) != 3), path)
    with pytest.raises(DataError, match="episode 0 has frame_index 4 at position 3"):
        WorldModelData(folder)


def test_wrong_joint_count_and_video_only_folders(tmp_path, arm_folder):
    _, episodes = read_lerobot(arm_folder)
    for ep in episodes:
        ep.state, ep.action = ep.state[:, :5], ep.action[:, :5]
    write_lerobot(tmp_path / "five", episodes, fps=10, joint_names=JOINT_NAMES[:5])
    with pytest.raises(DataError, match="observation.state has 5 entries, expected 6 joints"):
        WorldModelData(tmp_path / "five")
    video = tmp_path / "video"
    (video / "videos" / "chunk-000").mkdir(parents=True)
    with pytest.raises(DataError, match="has no camera frames under images/ or videos/"):
        WorldModelData(video)
    with pytest.raises(DataError, match="does not exist"):
        WorldModelData(tmp_path / "nowhere")


def test_video_frames_are_checked_against_the_table(tmp_path, arm_folder):
    """A LeRobot v2 folder with videos: the frame count of each MP4 must match the parquet
    rows of its episode; a missing or short video is named."""
    from pact_ray.data.arm.lerobot import VIDEO_PATH, _write_video

    _, episodes = read_lerobot(arm_folder)
    folder = write_lerobot(tmp_path / "mp4", episodes, fps=30, joint_names=JOINT_NAMES, frame_format="mp4")
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["features"]["observation.images.top"]["dtype"] == "video" and not (folder / "images").exists()
    # A lossy 4:2:0 H.264 video, as LeRobot publishes them: decoded, counted and sized.
    short = folder / VIDEO_PATH.format(episode_chunk=0, video_key="observation.images.top", episode_index=2)
    import av

    with av.open(str(short), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = episodes[2].frames.shape[2], episodes[2].frames.shape[1], "yuv420p"
        for frame in episodes[2].frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    _, again = read_lerobot(folder)
    assert again[2].frames.shape == episodes[2].frames.shape and again[2].frames.dtype == np.uint8
    _write_video(short, episodes[2].frames[:-1], 30)
    with pytest.raises(DataError, match=rf"episode_000002\.mp4 holds {SHORT.length - 1} frames but the table has {SHORT.length} for episode 2$"):
        read_lerobot(folder)
    short.unlink()
    with pytest.raises(DataError, match=r"video .*episode_000002\.mp4 of episode 2 is missing"):
        WorldModelData(folder)
