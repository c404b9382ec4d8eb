"""Logged trajectories (frames + discrete actions) from a folder, recorded once into the cache.

`data=trajectories data.folder=PATH` reads every episode file under PATH (recursively). One
episode is one of:

- `NAME.npz` holding `frames` uint8 (T, H, W, 3) (or (T, H, W) / (T, H, W, 1) grey) and
  `actions` integer ids (T-1,) or (T,); optionally `rewards` (T-1,) or (T,) and `text` (a string).
- a video `NAME.mp4` (or .avi/.mkv/.webm/.mov: any container PyAV reads) beside its actions,
  `NAME.actions.npy` (integer ids) or `NAME.actions.json` (a list of ids, or an object with
  `actions` and optionally `rewards` and `text`). T is the number of decoded frames.
- the groups `episode_<i>` of an HDF5 file (`*.hdf5` / `*.h5`) in Minari's layout (its
  `data/main_data.hdf5`): `observations` (T+1, H, W, 3) uint8 images and `actions` (T,), optional
  `rewards` (T,). Only image observations are read (a Dict observation space is skipped).

Actions: `actions[t]` is the action taken at frame t, leading to frame t+1 (the cache's
convention, `shards.py`). T-1 actions (one per transition; Minari's layout) store -1, "unknown",
at the last frame; T actions (the recorders' layout) keep the last one, taken at the last frame.
Only discrete actions are supported: ids are integers >= 0, and `num_actions` is `data.num_actions`
when set (an id at or above it is an error) or else the largest id + 1 over the recording.
Continuous (float), multi-dimensional or negative actions stop the recording with an error
naming the file. `rewards` are checked and kept per episode as their sum (`return` in the
manifest's episode table, beside `text`); no model here reads per-step rewards.

Episodes are split between train and val by a hash of their name (the file's path relative to
the folder; `<file>/episode_<i>` for HDF5), as the other folder sources do; with a single episode
its last `val_fraction` of frames go to val. Frames are cropped and resized like video frames.
Unreadable or malformed episodes (a corrupt file, missing arrays, frames of the wrong shape or
type, an action count other than T-1 or T, a video without its actions file, a video that does
not decode) are skipped with a warning and counted in the manifest (`skipped`, `skipped_files`,
`skipped_reasons`); a folder with no usable episode is an error that gives the reasons.
"""

from __future__ import annotations

import json
import logging
import math
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worldmodel.data.decode import DecodeError, probe, read_frames
from worldmodel.data.frames import resize_frames, split_by_hash
from worldmodel.data.shards import CacheWriter
from worldmodel.data.source import FolderSource, list_files
from worldmodel.data.video_folder import VIDEO_EXTENSIONS

log = logging.getLogger(__name__)

NPZ_EXTENSIONS = (".npz",)
HDF5_EXTENSIONS = (".hdf5", ".h5")
ACTION_SUFFIXES = (".actions.npy", ".actions.json")  # beside a video: NAME.actions.npy


class Malformed(ValueError):
    """An episode that cannot be used as it is (skipped and counted, not fatal)."""


class UnsupportedActions(ValueError):
    """Actions this source cannot train on (continuous, multi-dimensional, negative, out of
    range): the recording stops, naming the file, instead of skipping every episode."""


# (start, stop, batch) -> uint8 frame batches (n, H, W, C) of frames start..stop-1, in order
FrameReader = Callable[[int, int, int], Iterator[np.ndarray]]


@dataclass
class Episode:
    """One checked episode: its name, its T frames (read on demand) and T actions."""

    key: str  # the split key and the manifest's `file`
    length: int  # T frames
    actions: np.ndarray  # int64 (T,), -1 at the last frame when T-1 actions were given
    read: FrameReader
    rewards: np.ndarray | None = None  # float64 (T-1,) or (T,)
    text: str | None = None


class TrajectorySource(FolderSource):
    """Episodes of (frames, discrete actions) from a folder of npz / video + actions / HDF5 files.

    Args (besides those of `FolderSource`):
        folder: the folder to search (recursively).
        num_actions: the size of the action space; None = the largest recorded id + 1.
        decode_batch: frames read, decoded and resized at once (bounds memory for long episodes).
    """

    kind = "trajectories"
    extensions = NPZ_EXTENSIONS + HDF5_EXTENSIONS + VIDEO_EXTENSIONS

    def __init__(
        self,
        root: str,
        folder: str,
        num_actions: int | None = None,
        resolution: int | list[int] = 64,
        clip_length: int = 16,
        frame_stride: int = 1,
        clip_stride: int = 1,
        val_clip_stride: int | None = None,
        crop: str = "center",
        val_fraction: float = 0.1,
        decode_batch: int = 64,
        name: str | None = None,
    ):
        super().__init__(
            root,
            folder,
            resolution,
            clip_length,
            frame_stride,
            clip_stride,
            val_clip_stride,
            crop,
            val_fraction,
            name,
        )
        if num_actions is not None and int(num_actions) < 1:
            raise ValueError(f"data.num_actions must be >= 1 (or null), got {num_actions}")
        self.num_actions_cfg = None if num_actions is None else int(num_actions)
        self.decode_batch = int(decode_batch)
        if self.decode_batch < 1:
            raise ValueError(f"data.decode_batch must be >= 1, got {decode_batch}")
        self.episode_files = list(self.files)
        # the actions beside the videos are part of the recording: they enter the cache key
        sidecars = list_files(self.folder, (".npy", ".json"))
        self.files = sorted(
            self.episode_files + [p for p in sidecars if p.name.endswith(ACTION_SUFFIXES)]
        )

    def known_num_actions(self) -> int | None:
        return self.num_actions_cfg

    def recording_params(self) -> dict[str, Any]:
        return {**super().recording_params(), "num_actions": self.num_actions_cfg}

    # -- reading and checking episodes ----------------------------------------------------------
    def _actions(self, actions: Any, where: str) -> np.ndarray:
        """Integer action ids (n,) as int64; raises ValueError naming `where` for actions this
        source does not support (continuous, multi-dimensional, negative, out of range)."""
        actions = np.asarray(actions)
        where = str(self.folder / where)  # the full path: the error ends the recording
        if actions.dtype == np.bool_ or not np.issubdtype(actions.dtype, np.integer):
            integral = np.issubdtype(actions.dtype, np.floating) and bool(
                np.all(np.isfinite(actions)) and np.all(actions == np.round(actions))
            )
            hint = (
                " (the values are whole numbers: store them as integers if they are ids)"
                if integral
                else ""
            )
            raise UnsupportedActions(
                f"{where}: actions are {actions.dtype}; only discrete actions (integer ids) are "
                f"supported, continuous actions are not{hint}"
            )
        if actions.ndim != 1:
            raise UnsupportedActions(
                f"{where}: actions have shape {actions.shape}; expected one integer id per "
                "step (T-1,) or (T,) (multi-dimensional actions are not supported)"
            )
        actions = actions.astype(np.int64)
        if len(actions) and actions.min() < 0:
            raise UnsupportedActions(
                f"{where}: negative action id {int(actions.min())}; ids must be >= 0"
            )
        limit = self.num_actions_cfg
        if limit is not None and len(actions) and actions.max() >= limit:
            raise UnsupportedActions(
                f"{where}: action id {int(actions.max())} is outside [0, {limit}) "
                f"(data.num_actions={limit})"
            )
        return actions

    @staticmethod
    def _aligned(actions: np.ndarray, length: int, where: str) -> np.ndarray:
        """T actions (the last frame's taken there) from T-1 or T; Malformed otherwise."""
        if length < 2:
            raise Malformed(f"{where}: {length} frame(s); an episode needs at least 2")
        if len(actions) == length:
            return actions
        if len(actions) == length - 1:
            return np.append(actions, -1)  # nothing is known to follow the last frame
        raise Malformed(
            f"{where}: {length} frames but {len(actions)} actions (expected {length - 1} or "
            f"{length})"
        )

    @staticmethod
    def _rewards(rewards: Any, length: int, where: str) -> np.ndarray | None:
        if rewards is None:
            return None
        rewards = np.asarray(rewards)
        if rewards.ndim != 1 or not np.issubdtype(rewards.dtype, np.number):
            raise Malformed(f"{where}: rewards of shape {rewards.shape} and type {rewards.dtype}")
        if len(rewards) not in (length - 1, length):
            raise Malformed(
                f"{where}: {length} frames but {len(rewards)} rewards (expected {length - 1} "
                f"or {length})"
            )
        return rewards.astype(np.float64)

    @staticmethod
    def _frame_shape(shape: tuple[int, ...], dtype: np.dtype, where: str) -> int:
        """T of frames (T, H, W, 3) / (T, H, W, 1) / (T, H, W) uint8; Malformed otherwise."""
        if dtype != np.uint8:
            raise Malformed(f"{where}: frames are {dtype}, expected uint8")
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))):
            raise Malformed(f"{where}: frames of shape {shape}, expected (T, H, W, 3)")
        return int(shape[0])

    @staticmethod
    def _text(text: Any, where: str) -> str | None:
        if text is None:
            return None
        value = np.asarray(text)
        if value.size != 1 or value.dtype.kind not in "US":
            raise Malformed(f"{where}: text must be one string, got {value.dtype} {value.shape}")
        item = value.reshape(()).item()
        return item.decode() if isinstance(item, bytes) else str(item)

    def _npz(self, path: Path) -> list[Episode]:
        rel = self.relative(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                names = set(npz.files)
                missing = [k for k in ("frames", "actions") if k not in names]
                if missing:
                    raise Malformed(f"{rel}: no {' or '.join(missing)} array (has {sorted(names)})")
                raw = npz["actions"]
                rewards = npz["rewards"] if "rewards" in names else None
                text = npz["text"] if "text" in names else None
            shape, dtype = _npz_array_header(path, "frames")
        except Malformed:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
            # a damaged archive, or an object array that would need pickle to load
            raise Malformed(f"{rel}: unreadable ({_first_line(e)})") from e
        actions = self._actions(raw, rel)
        length = self._frame_shape(shape, dtype, rel)
        rewards = self._rewards(rewards, length, rel)
        text = self._text(text, rel)

        def read(start: int, stop: int, batch: int) -> Iterator[np.ndarray]:
            with np.load(path, allow_pickle=False) as npz:
                frames = npz["frames"]  # (T, H, W[, C]) uint8, the whole episode
            for i in range(start, stop, batch):
                yield frames[i : min(i + batch, stop)]

        return [Episode(rel, length, self._aligned(actions, length, rel), read, rewards, text)]

    def _video(self, path: Path) -> list[Episode]:
        rel = self.relative(path)
        stem = path.name[: -len(path.suffix)]
        sidecars = [path.with_name(stem + s) for s in ACTION_SUFFIXES]
        found = [p for p in sidecars if p.is_file()]
        if not found:
            raise Malformed(
                f"{rel}: no actions beside it ({' or '.join(p.name for p in sidecars)})"
            )
        actions_path = found[0]
        where = self.relative(actions_path)
        rewards = text = None
        try:
            if actions_path.suffix == ".npy":
                raw = np.load(actions_path, allow_pickle=False)
            else:
                data = json.loads(actions_path.read_text())
                if isinstance(data, dict):
                    if "actions" not in data:
                        raise Malformed(f"{where}: a JSON object without 'actions'")
                    raw, rewards, text = data["actions"], data.get("rewards"), data.get("text")
                else:
                    raw = data
                # an empty JSON list would read as floats: keep it an (empty) list of ids
                raw = np.asarray(raw) if raw != [] else np.zeros(0, dtype=np.int64)
        except (OSError, ValueError) as e:
            if isinstance(e, Malformed):
                raise
            raise Malformed(f"{where}: unreadable ({_first_line(e)})") from e
        actions = self._actions(raw, where)
        length = probe(path).num_frames  # DecodeError (a Malformed input) if it does not open

        def read(start: int, stop: int, batch: int) -> Iterator[np.ndarray]:
            yield from read_frames(path, np.arange(start, stop), batch)

        return [
            Episode(
                rel,
                length,
                self._aligned(actions, length, rel),
                read,
                self._rewards(rewards, length, where),
                self._text(text, where),
            )
        ]

    def _hdf5(self, path: Path) -> tuple[list[Episode], list[tuple[str, str]]]:
        """The image episodes of a Minari-layout HDF5 file, and (name, reason) of those skipped."""
        import h5py  # only HDF5 folders need it

        rel = self.relative(path)
        try:
            with h5py.File(path, "r") as f:
                groups = [k for k in f if k.startswith("episode_") and isinstance(f[k], h5py.Group)]
                if not groups:
                    raise Malformed(f"{rel}: no episode_<i> group (Minari's layout)")
                groups.sort(key=lambda k: (len(k), k))  # episode_2 before episode_10
                episodes, skipped = [], []
                for group in groups:
                    key = f"{rel}/{group}"
                    try:
                        episodes.append(self._hdf5_episode(path, f[group], key))
                    except Malformed as e:
                        skipped.append((key, str(e)))
                return episodes, skipped
        except OSError as e:
            raise Malformed(f"{rel}: unreadable ({_first_line(e)})") from e

    def _hdf5_episode(self, path: Path, group: Any, key: str) -> Episode:
        import h5py

        obs = group.get("observations")
        if isinstance(obs, h5py.Group):
            raise Malformed(
                f"{key}: observations is a group (a Dict observation space); only image "
                "observations (T+1, H, W, 3) are read"
            )
        if obs is None or "actions" not in group:
            raise Malformed(f"{key}: needs 'observations' and 'actions' datasets")
        actions = self._actions(group["actions"][()], key)
        length = self._frame_shape(tuple(obs.shape), obs.dtype, key)
        rewards = group["rewards"][()] if "rewards" in group else None
        name = group.name

        def read(start: int, stop: int, batch: int) -> Iterator[np.ndarray]:
            with h5py.File(path, "r") as f:
                frames = f[name]["observations"]  # (T+1, H, W, 3) uint8, read in slices
                for i in range(start, stop, batch):
                    yield frames[i : min(i + batch, stop)]

        return Episode(
            key,
            length,
            self._aligned(actions, length, key),
            read,
            self._rewards(rewards, length, key),
        )

    def episodes(self) -> tuple[list[Episode], list[tuple[str, str]]]:
        """The usable episodes of the folder, and (name, reason) of the skipped ones."""
        good: list[Episode] = []
        skipped: list[tuple[str, str]] = []
        for path in self.episode_files:
            suffix = path.suffix.lower()
            try:
                if suffix in NPZ_EXTENSIONS:
                    good += self._npz(path)
                elif suffix in HDF5_EXTENSIONS:
                    found, bad = self._hdf5(path)
                    good += found
                    skipped += bad
                else:
                    good += self._video(path)
            except (Malformed, DecodeError) as e:  # skipped and counted; other errors stop
                skipped.append((self.relative(path), str(e)))
        return good, skipped

    # -- recording ------------------------------------------------------------------------------
    def _write(self, writer: CacheWriter, split: str, ep: Episode, start: int, stop: int, bar):
        """Episode frames start..stop-1 into `split`; False (nothing written) on failure."""
        out = writer[split]
        written = 0
        try:
            out.begin_episode()
            for frames in ep.read(start, stop, self.decode_batch):
                if frames.ndim == 3:  # grey (n, H, W) -> (n, H, W, 1)
                    frames = frames[..., None]
                if frames.shape[-1] == 1:
                    frames = np.repeat(frames, 3, axis=-1)  # (n, H, W, 3)
                at = start + written
                actions = ep.actions[at : at + len(frames)]  # (n,)
                out.append(resize_frames(frames, self.resolution, self.crop), actions)
                written += len(frames)
                bar.update(len(frames))
            if written != stop - start:
                raise Malformed(f"{ep.key}: read {written} of {stop - start} frames")
            meta: dict[str, Any] = {"file": ep.key, "first_frame": start}
            if ep.text is not None:
                meta["text"] = ep.text
            if ep.rewards is not None:
                meta["return"] = float(ep.rewards[start:stop].sum())
            out.end_episode(**meta)
            return True
        except Exception as e:  # a decoder, h5py or zip error half way: drop the episode
            out.abort_episode()
            log.warning("skipping episode %s that failed to read: %s", ep.key, _first_line(e))
            return False

    def record(self, writer: CacheWriter) -> dict[str, Any]:
        good, skipped = self.episodes()
        for name, reason in skipped:
            log.warning("skipping %s", reason if reason.startswith(name) else f"{name}: {reason}")
        if not good:
            reasons = "; ".join(reason for _, reason in skipped[:3])
            raise ValueError(
                f"no usable episode in {self.folder} ({len(skipped)} skipped"
                + (f": {reasons}{'; ...' if len(skipped) > 3 else ''}" if reasons else "")
                + ")"
            )
        if len(good) == 1:
            # one episode: its last val_fraction of frames go to val so both splits exist
            ep = good[0]
            cut = ep.length - max(1, math.ceil(ep.length * self.val_fraction))
            jobs = [("train", ep, 0, cut), ("val", ep, cut, ep.length)]
        else:
            train, val = split_by_hash([ep.key for ep in good], self.val_fraction)
            jobs = [("train", good[i], 0, good[i].length) for i in train]
            jobs += [("val", good[i], 0, good[i].length) for i in val]
        total = sum(stop - start for _, _, start, stop in jobs)
        used: list[Episode] = []
        with self.progress(total, "read") as bar:
            for split, ep, start, stop in jobs:
                if self._write(writer, split, ep, start, stop, bar):
                    used.append(ep)
                else:
                    skipped.append((ep.key, f"{ep.key}: failed to read"))
        if not used:
            raise ValueError(f"no episode of {self.folder} could be read ({len(skipped)} skipped)")
        if self.num_actions_cfg is not None:
            num_actions = self.num_actions_cfg
        else:
            num_actions = max(int(ep.actions.max()) for ep in used) + 1
        names = sorted({name for name, _ in skipped})
        reasons = {name: reason for name, reason in skipped}
        if names:
            log.warning("%d episodes in %s skipped", len(names), self.folder)
        return {
            "num_actions": num_actions,
            "skipped": len(names),
            "skipped_files": names,
            "skipped_reasons": reasons,
        }


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def _npz_array_header(path: Path, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of array `name` in an .npz file, read from its header (no data loaded)."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
            version, np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(f)
    return tuple(shape), dtype
