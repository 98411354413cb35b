"""LeRobot-style recorded episodes: the on-disk format, a writer and a validating reader.

A dataset folder (LeRobot v2.x; frames as images, as arrays, or as the videos LeRobot
publishes)::

    DATASET/
      meta/info.json       fps, robot_type, features (names of the state and action entries, the
                           camera key and its frame shape), total_episodes, data_path, image_path
      meta/episodes.jsonl  one line per episode: episode_index, length, tasks
      data/chunk-000/episode_000000.parquet
                           one row per frame: observation.state (list of D floats), action
                           (D floats), episode_index, frame_index (0, 1, ... within the
                           episode), timestamp (seconds; optional), index, task_index
      images/<camera>/episode_000000/frame_000000.png
                           the frames, one file per frame (.png or .npy, [H, W, 3] uint8) ...
      images/<camera>/episode_000000.npy | .npz
                           ... or one array per episode ([T, H, W, 3] uint8; .npz key "frames")
      videos/chunk-000/<camera>/episode_000000.mp4
                           ... or one video per episode (info.json's ``video_path``, this
                           default when it has none; any codec FFmpeg decodes, e.g. LeRobot's
                           AV1 or H.264), decoded with PyAV; its frame count must equal the
                           episode's rows in the parquet table

Every parquet file under ``data/`` is read, so a single ``data/*.parquet`` table of all
episodes works too. Without ``meta/info.json`` the camera is the only folder under
``images/`` (else under ``videos/chunk-*/``).

The reader checks everything a recording can get wrong (missing columns, ragged vectors,
frame-index gaps, missing or mis-shaped frames) and raises :class:`DataError` with one
sentence that names the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pact_ray.errors import DataError, first_line

STATE, ACTION = "observation.state", "action"
EPISODE_INDEX, FRAME_INDEX, TIMESTAMP = "episode_index", "frame_index", "timestamp"
REQUIRED_COLUMNS = (STATE, ACTION, EPISODE_INDEX, FRAME_INDEX)
IMAGE_PREFIX = "observation.images."
DEFAULT_CAMERA = IMAGE_PREFIX + "top"
INFO_FILE = "meta/info.json"
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
IMAGE_PATH = "images/{image_key}/episode_{episode_index:06d}/frame_{frame_index:06d}.png"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"  # LeRobot v2's
CHUNK_SIZE = 1000  # episodes per data chunk folder (LeRobot's default)
FRAME_FORMATS = ("png", "npy", "npz", "mp4")  # how write_lerobot stores frames (mp4: lossless H.264 RGB)


@dataclass
class Episode:
    """One recorded episode, frames in time order.

    index: the episode_index; frame_index: [T] int64 (0..T-1); timestamp: [T] float32
    seconds, or None when the table has no timestamp column; state, action: [T, D] float32
    (joint positions and commanded joint positions, degrees for an SO-100 arm);
    frames: [T, H, W, 3] uint8 camera images.
    """

    index: int
    frame_index: np.ndarray
    timestamp: np.ndarray | None
    state: np.ndarray
    action: np.ndarray
    frames: np.ndarray

    def __len__(self) -> int:
        return len(self.frame_index)


@dataclass(frozen=True)
class LeRobotInfo:
    """What a dataset folder says about itself (from meta/info.json where there is one)."""

    folder: Path
    camera: str  # the image key, e.g. observation.images.top
    fps: float | None
    joint_names: tuple[str, ...]  # names of the observation.state entries ("" if unnamed)
    robot_type: str
    video_path: str | None = None  # the camera's video files (a VIDEO_PATH-like template), None: images/
    chunks_size: int = CHUNK_SIZE  # episodes per chunk folder


# --------------------------------------------------------------------- writing

def write_lerobot(
    folder: str | os.PathLike,
    episodes: Sequence[Episode],
    *,
    fps: float,
    joint_names: Sequence[str],
    camera: str = DEFAULT_CAMERA,
    frame_format: str = "png",
    robot_type: str = "so100",
    task: str = "",
) -> Path:
    """Write ``episodes`` as a LeRobot-style folder at ``folder`` (which must not hold one yet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    if frame_format not in FRAME_FORMATS:
        raise ValueError(f"frame_format must be one of {FRAME_FORMATS}, got {frame_format!r}")
    root = Path(folder)
    if (root / INFO_FILE).exists():
        raise FileExistsError(f"{root} already holds a LeRobot dataset")
    dims = len(joint_names)
    frame_shape = list(episodes[0].frames.shape[1:]) if episodes else [0, 0, 3]
    cam_dir = root / "images" / camera
    video = frame_format == "mp4"
    start = 0
    for ep in episodes:
        n = len(ep)
        table = pa.table({
            STATE: pa.array(list(ep.state.astype(np.float32)), type=pa.list_(pa.float32(), dims)),
            ACTION: pa.array(list(ep.action.astype(np.float32)), type=pa.list_(pa.float32(), dims)),
            TIMESTAMP: pa.array(ep.timestamp if ep.timestamp is not None else ep.frame_index / fps, type=pa.float32()),
            FRAME_INDEX: pa.array(ep.frame_index, type=pa.int64()),
            EPISODE_INDEX: pa.array(np.full(n, ep.index), type=pa.int64()),
            "index": pa.array(np.arange(start, start + n), type=pa.int64()),
            "task_index": pa.array(np.zeros(n, dtype=np.int64), type=pa.int64()),
        })
        start += n
        path = root / DATA_PATH.format(episode_chunk=ep.index // CHUNK_SIZE, episode_index=ep.index)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        if video:
            path = root / VIDEO_PATH.format(episode_chunk=ep.index // CHUNK_SIZE, video_key=camera, episode_index=ep.index)
            _write_video(path, ep.frames, fps)
        elif frame_format == "png":
            for f, frame in zip(ep.frame_index, ep.frames):
                path = root / IMAGE_PATH.format(image_key=camera, episode_index=ep.index, frame_index=int(f))
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(frame).save(path, optimize=False)
        else:
            cam_dir.mkdir(parents=True, exist_ok=True)
            array_path = cam_dir / f"episode_{ep.index:06d}.{frame_format}"
            if frame_format == "npy":
                np.save(array_path, ep.frames)
            else:
                np.savez_compressed(array_path, frames=ep.frames)
    vector = {"dtype": "float32", "shape": [dims], "names": list(joint_names)}
    info = {
        "codebase_version": "v2.1", "robot_type": robot_type, "fps": fps,
        "total_episodes": len(episodes), "total_frames": start, "chunks_size": CHUNK_SIZE,
        "data_path": DATA_PATH, "image_path": IMAGE_PATH if frame_format == "png" else None,
        "video_path": VIDEO_PATH if video else None,
        "features": {
            STATE: vector, ACTION: vector,
            camera: {"dtype": "video" if video else "image", "shape": frame_shape, "names": ["height", "width", "channels"]},
            TIMESTAMP: {"dtype": "float32", "shape": [1], "names": None},
            FRAME_INDEX: {"dtype": "int64", "shape": [1], "names": None},
            EPISODE_INDEX: {"dtype": "int64", "shape": [1], "names": None},
        },
    }
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / INFO_FILE).write_text(json.dumps(info, indent=1))
    lines = [json.dumps({"episode_index": ep.index, "length": len(ep), "tasks": [task] if task else []}) for ep in episodes]
    (root / "meta" / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _write_video(path: Path, frames: np.ndarray, fps: float) -> None:
    """[T, H, W, 3] uint8 frames as a lossless H.264 RGB video (libx264rgb, crf 0): decoding
    gives the frames back exactly."""
    from fractions import Fraction

    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


# --------------------------------------------------------------------- reading

def read_info(folder: str | os.PathLike, camera: str | None = None) -> LeRobotInfo:
    """The dataset's camera key, fps and joint names (meta/info.json, else the images/ folder)."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    info_path = root / INFO_FILE
    info: dict = {}
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{info_path} is not readable JSON ({e})") from None
    features = info.get("features", {}) if isinstance(info.get("features"), dict) else {}
    if camera is None:
        cameras = [k for k, v in features.items() if k.startswith(IMAGE_PREFIX) and isinstance(v, dict) and v.get("dtype") in ("image", "video")]
        if not cameras and (root / "images").is_dir():
            cameras = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
        if not cameras and (root / "videos").is_dir():
            cameras = sorted({p.name for p in (root / "videos").glob("chunk-*/*") if p.is_dir()})
        if not cameras:
            raise DataError(f"dataset {root} has no camera frames under images/ or videos/")
        camera = cameras[0]
    names = features.get(STATE, {}).get("names") if isinstance(features.get(STATE), dict) else None
    feature = features.get(camera) if isinstance(features.get(camera), dict) else {}
    video = feature.get("dtype") == "video" or (not (root / "images" / camera).is_dir() and (root / "videos").is_dir())
    return LeRobotInfo(folder=root, camera=camera, fps=info.get("fps"), joint_names=tuple(names or ()),
                       robot_type=str(info.get("robot_type", "")),
                       video_path=(info.get("video_path") or VIDEO_PATH) if video else None,
                       chunks_size=int(info.get("chunks_size") or CHUNK_SIZE))


def _read_table(root: Path) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((root / "data").rglob("*.parquet")) if (root / "data").is_dir() else []
    if not files:
        raise DataError(f"dataset {root} has no parquet table under data/")
    columns: dict[str, list[np.ndarray]] = {c: [] for c in (*REQUIRED_COLUMNS, TIMESTAMP)}
    has_timestamp = True
    for path in files:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path} is not a readable parquet table ({first_line(e)})") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise DataError(f"{path} lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        has_timestamp &= TIMESTAMP in table.column_names
        for c in (STATE, ACTION):
            try:
                rows = table.column(c).to_pylist()
                columns[c].append(np.asarray(rows, dtype=np.float32).reshape(len(rows), -1))
            except (TypeError, ValueError):
                raise DataError(f"{path}: column {c} does not hold vectors of one length of numbers") from None
        for c in (EPISODE_INDEX, FRAME_INDEX):
            columns[c].append(np.asarray(table.column(c).to_numpy(zero_copy_only=False)).astype(np.int64))
        if has_timestamp:
            columns[TIMESTAMP].append(np.asarray(table.column(TIMESTAMP).to_numpy(zero_copy_only=False), dtype=np.float32))
    out: dict[str, np.ndarray] = {}
    for c, parts in columns.items():
        if c == TIMESTAMP and not has_timestamp:
            continue
        if c in (STATE, ACTION) and len({p.shape[1] for p in parts}) > 1:
            raise DataError(f"dataset {root}: {c} has a different length in different parquet files")
        out[c] = np.concatenate(parts)
    if out[STATE].shape[1] != out[ACTION].shape[1]:
        raise DataError(f"dataset {root}: {STATE} has {out[STATE].shape[1]} entries but {ACTION} has {out[ACTION].shape[1]}")
    if not (np.isfinite(out[STATE]).all() and np.isfinite(out[ACTION]).all()):
        raise DataError(f"dataset {root}: {STATE} or {ACTION} holds NaN or infinite values")
    return out


def _load_array(path: Path) -> np.ndarray:
    """The frame array of a .npy file or of an .npz file's ``frames`` entry."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return np.asarray(data["frames"])
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise DataError(f"{path} is not a readable frame array ({first_line(e)})") from None


def _read_frame_file(stem: Path) -> np.ndarray:
    """One [H, W, 3] frame from ``stem.png`` or ``stem.npy``."""
    from PIL import Image, UnidentifiedImageError

    png, npy = stem.with_suffix(".png"), stem.with_suffix(".npy")
    if png.is_file():
        try:
            with Image.open(png) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{png} is not a readable image ({first_line(e)})") from None
    if npy.is_file():
        return _check_frames(npy, _load_array(npy)[None])[0]
    raise DataError(f"frame {png} is missing (no .png or .npy file)")


def _check_frames(path: Path, frames: np.ndarray) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise DataError(f"{path} holds frames of shape {frames.shape[1:]}, expected [H, W, 3]")
    if frames.dtype != np.uint8:
        raise DataError(f"{path} holds {frames.dtype} frames, expected uint8")
    return frames


def _read_frames(root: Path, camera: str, episode: int, frame_index: np.ndarray) -> np.ndarray:
    """[T, H, W, 3] uint8 frames of one episode: per-episode .npy/.npz or per-frame .png/.npy files."""
    cam_dir = root / "images" / camera
    for suffix in (".npy", ".npz"):
        path = cam_dir / f"episode_{episode:06d}{suffix}"
        if path.is_file():
            frames = _check_frames(path, _load_array(path))
            if frames.shape[0] != len(frame_index):
                raise DataError(f"{path} holds {frames.shape[0]} frames but the table has {len(frame_index)} for episode {episode}")
            return frames
    frames = [_read_frame_file(cam_dir / f"episode_{episode:06d}" / f"frame_{int(f):06d}") for f in frame_index]
    shapes = sorted({fr.shape for fr in frames})
    if len(shapes) > 1:
        raise DataError(f"episode {episode} under {cam_dir} has frames of different sizes {shapes}")
    return np.stack(frames)


def _read_video(path: Path, episode: int, count: int) -> np.ndarray:
    """[T, H, W, 3] uint8 frames of one episode's video, decoded with PyAV; T must be the
    episode's row count in the parquet table."""
    import av

    if not path.is_file():
        raise DataError(f"video {path} of episode {episode} is missing")
    try:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, OSError, IndexError, ValueError) as e:
        raise DataError(f"{path} is not a readable video ({first_line(e)})") from None
    if len(frames) != count:
        raise DataError(f"{path} holds {len(frames)} frames but the table has {count} for episode {episode}")
    return np.stack(frames)


def _resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[T, H, W, 3] uint8 -> [T, h, w, 3] uint8 (anti-aliased; unchanged when already that size)."""
    if frames.shape[1:3] == tuple(size):
        return frames
    from skimage.transform import resize

    out = resize(frames, (frames.shape[0], *size, 3), order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def read_lerobot(folder: str | os.PathLike, camera: str | None = None,
                 frame_size: tuple[int, int] | None = None) -> tuple[LeRobotInfo, list[Episode]]:
    """Every episode of a LeRobot-style folder, sorted by episode index.

    camera: the image key (default: meta/info.json's first camera, else the one folder
    under images/); frame_size: (h, w) to resize the frames to (None: as stored).
    Raises DataError naming the file for a missing column, a frame-index gap, a missing
    or unreadable frame, or frames of the wrong shape.
    """
    info = read_info(folder, camera)
    root = info.folder
    if info.video_path is None and not (root / "images" / info.camera).is_dir():
        raise DataError(f"dataset {root} has no folder images/{info.camera} for camera {info.camera!r}")
    table = _read_table(root)
    episodes = []
    for e in np.unique(table[EPISODE_INDEX]):
        rows = np.flatnonzero(table[EPISODE_INDEX] == e)
        rows = rows[np.argsort(table[FRAME_INDEX][rows], kind="stable")]
        frame_index = table[FRAME_INDEX][rows]
        if not np.array_equal(frame_index, np.arange(len(rows))):
            raise DataError(f"dataset {root}: episode {int(e)} has frame_index {_show_gap(frame_index)}, expected 0..{len(rows) - 1} without gaps")
        if info.video_path is not None:
            path = root / info.video_path.format(episode_chunk=int(e) // info.chunks_size, video_key=info.camera, episode_index=int(e))
            frames = _read_video(path, int(e), len(rows))
        else:
            frames = _read_frames(root, info.camera, int(e), frame_index)
        episodes.append(Episode(
            index=int(e), frame_index=frame_index,
            timestamp=table[TIMESTAMP][rows] if TIMESTAMP in table else None,
            state=table[STATE][rows], action=table[ACTION][rows],
            frames=_resize(frames, frame_size) if frame_size is not None else frames,
        ))
    return info, episodes


def _show_gap(frame_index: np.ndarray) -> str:
    """The first place where ``frame_index`` stops counting 0, 1, 2, ..."""
    bad = int(np.flatnonzero(frame_index != np.arange(len(frame_index)))[0])
    return f"{int(frame_index[bad])} at position {bad}"
