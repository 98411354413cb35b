"""Where a sweep keeps its files: a local or shared folder, or an object store.

``--storage-path`` is an absolute folder (``/shared/runs``) or a URI that pyarrow's
filesystems open, the same ones Ray's storage uses: ``s3://bucket/runs`` (AWS, or an
S3-compatible server with ``?endpoint_override=host:port&scheme=http``), ``gs://bucket/runs``.
Ray gets the opened filesystem, and the harness does its own small I/O through it here:
the manifest, an existence check before a sweep starts, and the summary folder. Credentials
come from each client's usual environment (``AWS_ACCESS_KEY_ID`` ..., ``GOOGLE_APPLICATION_CREDENTIALS``).

On a Ray cluster of several nodes a local folder is only usable when every node sees it (a
network file system mounted at the same path): :func:`check_visible_on_every_node` asks each
node before anything is created.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.fs as pafs

from pact_ray.errors import first_line
from pact_ray.fileio import write_json_atomic


class StorageError(ValueError):
    """A storage path or URI that cannot be used (one-sentence message)."""


def is_uri(text: str) -> bool:
    return "://" in text


def join(location: str, *names: str) -> str:
    """``location`` (a folder or URI) with ``names`` appended to its path; a URI keeps its query
    (``s3://b/runs?endpoint_override=h:9000`` + ``x`` -> ``s3://b/runs/x?endpoint_override=h:9000``)."""
    base, sep, query = location.partition("?")
    return "/".join([base.rstrip("/"), *names]) + sep + query


@dataclass(frozen=True)
class Storage:
    """One folder on a filesystem: ``uri`` as the user names it, ``fs`` and ``path`` as pyarrow reads it."""

    uri: str
    fs: pafs.FileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, *names: str) -> "Storage":
        return Storage(join(self.uri, *names), self.fs, "/".join([self.path.rstrip("/"), *names]))

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def read_json(self, name: str) -> Any | None:
        """The JSON file ``name`` in this folder; None when there is none."""
        path = self.child(name).path
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8"))

    def write_json(self, name: str, obj: Any) -> None:
        """``obj`` as indented, key-sorted JSON; never seen half-written (an object-store PUT is
        atomic by itself; a local file is written beside and renamed)."""
        if self.is_local:
            write_json_atomic(Path(self.path) / name, obj)
            return
        with self.fs.open_output_stream(self.child(name).path) as f:
            f.write(json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))

    def create(self) -> None:
        """Create the folder; a local one must not exist yet (two sweeps never share a folder)."""
        if self.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=False)
        else:
            self.fs.create_dir(self.path)  # object stores have no folders: a no-op past the bucket

    def put_folder(self, local: Path) -> None:
        """Copy the files of the local folder ``local`` into this folder."""
        pafs.copy_files(str(local), self.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def fetch_results(self, local: Path) -> None:
        """Copy what :func:`pact_ray.tune.sweep.replay_results` reads of a Ray experiment folder
        (Ray's experiment state, each trial's params.json and result.json) into ``local``."""
        base = self.path.rstrip("/") + "/"
        for info in self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True)):
            rel = info.path[len(base):] if info.path.startswith(base) else ""
            parts = rel.split("/")
            wanted = (len(parts) == 1 and parts[0].startswith("experiment_state-")) or (
                len(parts) == 2 and parts[1] in ("params.json", "result.json"))
            if info.type == pafs.FileType.File and wanted:
                target = local.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(info.path) as f:
                    target.write_bytes(f.read())

    @property
    def ray_filesystem(self) -> pafs.FileSystem | None:
        """The ``storage_filesystem`` to hand Ray's RunConfig and ``Tuner.restore`` with ``path``:
        None for a local folder (Ray's default handling), else the filesystem opened here, so
        that a URI's query (endpoint, scheme) holds for Ray too."""
        return None if self.is_local else self.fs

    def check_writable(self) -> None:
        """Raise :class:`StorageError` unless files can be created here (nothing is created)."""
        if self.is_local:
            probe = nearest_existing(self.path)
            if not probe.is_dir():
                raise StorageError(f"storage path {self.uri} cannot be created: {probe} is not a folder")
            if not os.access(probe, os.W_OK):
                raise StorageError(f"storage path {self.uri} is not writable ({probe} denies writing)")
            return
        bucket = self.path.split("/", 1)[0]
        try:
            found = self.fs.get_file_info(bucket).type
        except OSError as e:
            raise StorageError(f"storage {self.uri} does not answer ({first_line(e)})") from None
        if found == pafs.FileType.NotFound:
            raise StorageError(f"storage {self.uri}: bucket {bucket!r} does not exist (create it first)")


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` or its nearest ancestor that exists."""
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    return probe


def open_storage(location: str) -> Storage:
    """The folder ``location`` names: an absolute path or a pyarrow filesystem URI.
    Raises :class:`StorageError` for a relative path or a URI pyarrow cannot open."""
    if not is_uri(location):
        if not os.path.isabs(location):
            raise StorageError(f"--storage-path {location!r} must be an absolute path (or an object-store URI such as s3://bucket/runs)")
        path = os.path.normpath(location)
        return Storage(path, pafs.LocalFileSystem(), path)
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (ValueError, OSError) as e:  # pyarrow.lib.ArrowInvalid is a ValueError
        raise StorageError(f"storage {location!r} cannot be opened: {first_line(e)}") from None
    if isinstance(fs, pafs.LocalFileSystem):  # file:///abs/path
        path = os.path.normpath(path)
        return Storage(path, fs, path)
    return Storage(location, fs, path.rstrip("/"))


@contextlib.contextmanager
def staged_folder(location: str) -> Iterator[tuple[Path, Callable[[Path], str]]]:
    """A local folder to write files into, then their place at ``location`` (a folder or URI).

    Yields ``(folder, where)``: a local target is written in place; for an object store the
    files are written into a temporary folder and copied to ``location`` when the block ends.
    ``where(file)`` names a written file at its final place."""
    target = open_storage(location)
    if target.is_local:
        yield Path(target.path), str
        return
    with tempfile.TemporaryDirectory(prefix="pact-ray-stage-") as tmp:
        folder = Path(tmp)
        yield folder, lambda f: join(target.uri, Path(f).relative_to(folder).as_posix())
        target.put_folder(folder)


# ------------------------------------------------------------- multi-node clusters

def _paths_seen(paths: list[str]) -> list[bool]:
    """Run on one node: which of ``paths`` exist there."""
    return [os.path.exists(p) for p in paths]


def check_visible_on_every_node(paths: dict[str, str], storage: str | None = None, timeout: float = 120.0) -> None:
    """On a connected Ray cluster of several nodes, raise :class:`StorageError` unless every
    node sees each local path of ``paths`` (what -> absolute path) and, when given, the local
    folder ``storage`` (a probe file is written into it, or into its nearest existing
    ancestor, looked for from every node, and removed). One node: nothing to check.

    Written by hand because Ray finds out only later, when a trial on another node
    checkpoints, and then the trial errors instead of the sweep being refused up front."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    names, wanted = list(paths), list(paths.values())
    probe = None
    if storage is not None:
        probe = nearest_existing(storage) / f".pact_ray_probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        names.append(f"storage folder {storage}")
        wanted.append(str(probe))
    try:
        task = ray.remote(num_cpus=0)(_paths_seen)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(wanted) for n in nodes]
        try:
            seen = ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise StorageError(f"could not ask every node of the Ray cluster within {timeout:.0f} s whether it sees {', '.join(names)}") from None
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
    for node, found in zip(nodes, seen):
        for name, ok in zip(names, found):
            if not ok:
                raise StorageError(
                    f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]}) of the Ray cluster does not see the {name}: on a cluster of "
                    f"several nodes it must be a shared folder mounted at the same path on every node, or an "
                    f"object-store URI (s3://..., gs://...)")

