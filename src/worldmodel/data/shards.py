"""On-disk frame cache: uint8 episodes in memory-mappable .npy files plus a manifest.

Layout of one cache folder (one per source and set of recording parameters)::

    <root>/<kind>-<label>-<hash>/
        train_frames.npy    uint8 (N, H, W, C), all train episodes back to back
        train_actions.npy   int64 (N,), actions[i] leads from frame i to frame i+1; -1 = unknown
        val_frames.npy, val_actions.npy
        manifest.json       written last; its presence means the folder is complete

Frames are streamed to disk while recording (a fixed-size .npy header is patched with the final
shape at the end), so a recording never has to fit in memory. The manifest holds the episode table
(offset, length and free-form metadata per episode), the counts, the recording parameters, the
format version and a sha256 per file. A folder without a valid manifest is an interrupted
recording: it is deleted and recorded again. A file lock serialises concurrent recorders (several
ranks or jobs starting at once on the same cache).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")  # every cache has these
OPTIONAL_SPLITS = ("test",)  # recorded by sources asked for them (levels kept for reporting)

# A .npy header of fixed size, so it can be rewritten in place once the frame count is known.
# 128 bytes leave room for any realistic shape; numpy reads headers of any length.
_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_HEADER_BYTES = 128


def params_hash(params: dict[str, Any], length: int = 10) -> str:
    """A short stable hash of recording parameters (JSON with sorted keys)."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_sha256(path: Path, chunk: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header padded to exactly `_NPY_HEADER_BYTES` bytes."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    room = _NPY_HEADER_BYTES - len(_NPY_MAGIC) - 2
    if len(text) + 1 > room:
        raise ValueError(f"shape {shape} does not fit a {_NPY_HEADER_BYTES}-byte .npy header")
    text = text.ljust(room - 1) + "\n"
    return _NPY_MAGIC + room.to_bytes(2, "little") + text.encode("latin1")


class _NpyStream:
    """Appends rows of a fixed trailing shape to a .npy file without holding them in memory."""

    def __init__(self, path: Path, dtype: Any, row_shape: tuple[int, ...]):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.rows = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(_npy_header(self.dtype, (0, *self.row_shape)))

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(
                f"{self.path.name}: rows of shape {rows.shape[1:]}, expected {self.row_shape}"
            )
        self._file.write(rows.data)  # the buffer itself, no copy
        self.rows += len(rows)

    def truncate(self, rows: int) -> None:
        """Drops everything after the first `rows` rows (used to discard a failed episode)."""
        row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        self._file.seek(_NPY_HEADER_BYTES + rows * row_bytes)
        self._file.truncate()
        self.rows = rows

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(_npy_header(self.dtype, (self.rows, *self.row_shape)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class SplitWriter:
    """Writes the episodes of one split: frames, actions and an episode table.

    Use `add_episode` for an episode already in memory, or `begin_episode` / `append` /
    `end_episode` to stream a long one; `abort_episode` drops a half-written episode (e.g. a video
    that fails to decode half way).
    """

    def __init__(self, folder: Path, split: str, frame_shape: tuple[int, int, int]):
        self.split = split
        self.frame_shape = tuple(frame_shape)
        self._frames = _NpyStream(folder / f"{split}_frames.npy", np.uint8, self.frame_shape)
        self._actions = _NpyStream(folder / f"{split}_actions.npy", np.int64, ())
        self.episodes: list[dict[str, Any]] = []
        self._start: int | None = None

    @property
    def num_frames(self) -> int:
        return self._frames.rows

    def begin_episode(self) -> None:
        if self._start is not None:
            raise RuntimeError("begin_episode called twice without end_episode")
        self._start = self._frames.rows

    def append(self, frames: np.ndarray, actions: np.ndarray | None = None) -> None:
        """Appends frames (n, H, W, C) uint8 and their actions (n,) (None = unknown, -1)."""
        if self._start is None:
            raise RuntimeError("append called outside an episode")
        if frames.dtype != np.uint8:
            raise TypeError(f"frames must be uint8, got {frames.dtype}")
        if actions is None:
            actions = np.full(len(frames), -1, dtype=np.int64)
        if len(actions) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(actions)} actions")
        self._frames.append(frames)
        self._actions.append(actions)

    def end_episode(self, **meta: Any) -> None:
        """Closes the current episode; `meta` (JSON-serialisable) is stored in the manifest."""
        if self._start is None:
            raise RuntimeError("end_episode called outside an episode")
        length = self._frames.rows - self._start
        if length > 0:
            self.episodes.append({"offset": self._start, "length": length, **meta})
        self._start = None

    def abort_episode(self) -> None:
        if self._start is None:
            return
        self._frames.truncate(self._start)
        self._actions.truncate(self._start)
        self._start = None

    def add_episode(self, frames: np.ndarray, actions: np.ndarray | None = None, **meta: Any):
        self.begin_episode()
        self.append(frames, actions)
        self.end_episode(**meta)

    def close(self) -> dict[str, Any]:
        if self._start is not None:
            raise RuntimeError(f"{self.split}: an episode is still open")
        self._frames.close()
        self._actions.close()
        return {
            "num_episodes": len(self.episodes),
            "num_frames": self._frames.rows,
            "frames_file": self._frames.path.name,
            "actions_file": self._actions.path.name,
            "episodes": self.episodes,
        }


class CacheWriter:
    """Everything a recorder writes into one cache folder; `finish` writes the manifest last."""

    def __init__(self, folder: Path, frame_shape: tuple[int, int, int]):
        self.folder = folder
        self.frame_shape = tuple(frame_shape)
        self.splits = {split: SplitWriter(folder, split, self.frame_shape) for split in SPLITS}

    def __getitem__(self, split: str) -> SplitWriter:
        if split not in self.splits and split in OPTIONAL_SPLITS:
            self.splits[split] = SplitWriter(self.folder, split, self.frame_shape)
        return self.splits[split]

    def finish(self, params: dict[str, Any], num_actions: int | None, **extra: Any) -> dict:
        splits = {name: writer.close() for name, writer in self.splits.items()}
        files = {}
        for info in splits.values():
            for key in ("frames_file", "actions_file"):
                path = self.folder / info[key]
                files[info[key]] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        manifest = {
            "format_version": FORMAT_VERSION,
            "params": params,
            "resolution": list(self.frame_shape[:2]),
            "channels": self.frame_shape[2],
            "num_actions": num_actions,
            "num_episodes": sum(s["num_episodes"] for s in splits.values()),
            "num_frames": sum(s["num_frames"] for s in splits.values()),
            "files": files,
            "splits": splits,
            **extra,
        }
        write_json_atomic(self.folder / MANIFEST, manifest)
        return manifest


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(folder: Path, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The manifest of a complete cache folder, or None when the folder is missing or invalid.

    Checks the format version, the recording parameters (when given) and that every file exists
    with the recorded size and a well-formed .npy header; hashes are checked by `verify_cache`.
    """
    try:
        with open(folder / MANIFEST) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if manifest.get("format_version") != FORMAT_VERSION:
        return None
    if params is not None and manifest.get("params") != json.loads(json.dumps(params)):
        return None
    for name, info in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return None
    for split in manifest.get("splits", {}).values():
        try:
            shape = npy_shape(folder / split["frames_file"])
        except (OSError, ValueError):
            return None
        if shape[0] != split["num_frames"]:
            return None
    return manifest


def verify_cache(folder: Path) -> bool:
    """Recomputes every file's sha256 and compares it with the manifest."""
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    return all(file_sha256(folder / n) == i["sha256"] for n, i in manifest["files"].items())


def npy_shape(path: Path) -> tuple[int, ...]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
            version, np.lib.format.read_array_header_2_0
        )
        shape, _, _ = read(f)
    return tuple(shape)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_folder(root: str | os.PathLike, kind: str, label: str, params: dict[str, Any]) -> Path:
    """`<root>/<kind>-<label>-<hash of params>`; a different recording config gets a new folder."""
    slug = re.sub(r"[^A-Za-z0-9_.]+", "_", label).strip("_")[:40] or "default"
    return Path(root).expanduser() / f"{kind}-{slug}-{params_hash(params)}"


def ensure_cache(
    folder: Path,
    params: dict[str, Any],
    record: Callable[[Path], dict[str, Any]],
) -> dict[str, Any]:
    """Returns the manifest of `folder`, recording it first with `record(folder)` if needed.

    `record` must fill the folder through a `CacheWriter` and return its manifest. A folder with
    no valid manifest (an interrupted or outdated recording) is deleted first.
    """
    manifest = read_manifest(folder, params)
    if manifest is not None:
        return manifest
    with _locked(folder.with_name(f".{folder.name}.lock")):
        manifest = read_manifest(folder, params)  # another process may have recorded it meanwhile
        if manifest is not None:
            return manifest
        if folder.exists():
            log.warning("deleting incomplete cache folder %s", folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        log.info("recording into %s", folder)
        try:
            record(folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        manifest = read_manifest(folder, params)
        if manifest is None:
            raise RuntimeError(f"recording into {folder} did not produce a valid manifest")
        return manifest
