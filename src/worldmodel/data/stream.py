"""Streaming tar shards: data sets larger than one disk cache, read by DataLoader workers.

A shard is a plain tar file holding whole episodes, WebDataset-style: per episode the members
`<key>.frames.npy` (uint8 (N, H, W, C)) and `<key>.actions.npy` (int64 (N,), -1 = unknown), each
optionally zlib-compressed (`.npy.zlib`). Beside the shards, `index.json` (written last) holds
each shard's episode lengths, size and sha256, so clip counts and positions are computed without
opening a shard::

    <folder>/shard-00000.tar ... shard-00099.tar
    <folder>/index.json

Reading order (`ShardStream`), a pure function of (seed, epoch, global batch, ranks, workers):
each epoch permutes the shards, groups them in windows of `shuffle_shards` consecutive shards and
permutes the clips inside each window; the concatenation is the epoch's sequence (its tail short
of one global batch is dropped, as `train/sampler.py` drops the last partial batch). Each rank
reads one contiguous block of it, cut into micro-batches; the block is split into one contiguous
piece per DataLoader worker (micro-batch k of the block comes from piece k mod P, as the
DataLoader takes batches from its workers in turn), so a worker opens only the shards of its
piece. Every clip of the epoch is read once, by one (rank, worker). Starting at a global batch
needs only the index: a resumed run reads exactly what the uninterrupted run would have, given
the same shards, seed, batch size, gradient accumulation, process count and worker count.

`python -m worldmodel.data.stream write --cache FOLDER --split train --out DIR --shards 100`
converts a split of an existing frame cache (`shards.py`) into shards. Remote URLs (http, s3)
are future work: `data.urls` takes local paths, folders and globs.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from omegaconf import OmegaConf
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from worldmodel.data.dataset import ClipDataset
from worldmodel.data.frames import parse_resolution
from worldmodel.data.shards import MANIFEST, file_sha256, write_json_atomic

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = "worldmodel-shards"
FORMAT_VERSION = 1
COMPRESSIONS = ("none", "zlib")
ON_CORRUPT = ("error", "skip")


class ShardError(RuntimeError):
    """A shard that cannot be read as its index describes (truncated, corrupt, wrong shape)."""


# ------------------------------------------------------------------------------------- writing


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Writes episodes into `num_shards` tar shards under `folder`, then `index.json` last.

    Episodes go to the shard that is open; `add_episode` moves on to the next shard once the
    current one holds `frames_per_shard` frames (episodes are never cut).
    """

    def __init__(
        self,
        folder: str | Path,
        frames_per_shard: int,
        num_actions: int | None = None,
        compress: str = "none",
        level: int = 1,
    ):
        if compress not in COMPRESSIONS:
            raise ValueError(f"compress={compress!r}: expected one of {COMPRESSIONS}")
        if frames_per_shard < 1:
            raise ValueError(f"frames_per_shard must be >= 1, got {frames_per_shard}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if (self.folder / INDEX).exists():
            raise FileExistsError(f"{self.folder / INDEX} exists: write shards into a new folder")
        self.frames_per_shard = frames_per_shard
        self.num_actions = num_actions
        self.compress = compress
        self.level = level
        self.shape: tuple[int, int, int] | None = None
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._current: dict[str, Any] | None = None
        self._episodes = 0

    def _open_next(self) -> None:
        self._close_current()
        name = f"shard-{len(self.shards):05d}.tar"
        self._tar = tarfile.open(self.folder / name, "w")  # noqa: SIM115 - closed in _close_current
        self._current = {"file": name, "episodes": [], "num_frames": 0}
        self.shards.append(self._current)

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = self.folder / self._current["file"]
        self._current.update(bytes=path.stat().st_size, sha256=file_sha256(path))
        self._tar = self._current = None

    def _add_member(self, name: str, data: bytes) -> int:
        """Adds one member; returns the crc32 of its stored bytes (checked when read)."""
        if self.compress == "zlib":
            data, name = zlib.compress(data, self.level), f"{name}.zlib"
        info = tarfile.TarInfo(name)
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))
        return zlib.crc32(data)

    def add_episode(self, frames: np.ndarray, actions: np.ndarray | None = None) -> None:
        """One episode: frames uint8 (N, H, W, C), actions (N,) (None = unknown, -1)."""
        if frames.dtype != np.uint8 or frames.ndim != 4:
            raise ValueError(
                f"frames must be uint8 (N, H, W, C), got {frames.dtype} {frames.shape}"
            )
        if self.shape is None:
            self.shape = tuple(frames.shape[1:])
        elif tuple(frames.shape[1:]) != self.shape:
            raise ValueError(f"frames of shape {frames.shape[1:]}, the shards hold {self.shape}")
        if actions is None:
            actions = np.full(len(frames), -1, dtype=np.int64)
        if len(actions) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(actions)} actions")
        if self._current is None or self._current["num_frames"] >= self.frames_per_shard:
            self._open_next()
        key = f"{self._episodes:08d}"
        crc = [
            self._add_member(f"{key}.frames.npy", _npy_bytes(frames)),
            self._add_member(f"{key}.actions.npy", _npy_bytes(np.asarray(actions, np.int64))),
        ]
        self._current["episodes"].append({"key": key, "length": len(frames), "crc32": crc})
        self._current["num_frames"] += len(frames)
        self._episodes += 1

    def finish(self, **extra: Any) -> dict[str, Any]:
        """Closes the last shard and writes the index (its presence means the folder is whole)."""
        self._close_current()
        if not self.shards:
            raise ValueError(f"no episode was written into {self.folder}")
        index = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "resolution": list(self.shape[:2]),
            "channels": self.shape[2],
            "num_actions": self.num_actions,
            "compress": self.compress,
            "num_episodes": self._episodes,
            "num_frames": sum(s["num_frames"] for s in self.shards),
            "shards": self.shards,
            **extra,
        }
        write_json_atomic(self.folder / INDEX, index)
        return index


def write_from_cache(
    cache: str | Path, split: str, out: str | Path, num_shards: int, compress: str = "none"
) -> dict[str, Any]:
    """Converts one split of a frame cache folder (`shards.py`) into about `num_shards` shards
    of whole episodes, reading one episode at a time from the memory maps."""
    cache = Path(cache)
    try:
        with open(cache / MANIFEST) as f:
            manifest = json.load(f)
    except OSError as e:
        raise FileNotFoundError(f"{cache} is not a frame cache folder (no {MANIFEST})") from e
    splits = manifest["splits"]
    if split not in splits:
        raise ValueError(f"no {split!r} split in {cache} (recorded: {', '.join(sorted(splits))})")
    info = splits[split]
    frames = np.load(cache / info["frames_file"], mmap_mode="r")
    actions = np.load(cache / info["actions_file"], mmap_mode="r")
    per_shard = max(1, -(-int(info["num_frames"]) // max(1, num_shards)))
    writer = ShardWriter(out, per_shard, manifest["num_actions"], compress)
    for episode in info["episodes"]:
        lo, hi = episode["offset"], episode["offset"] + episode["length"]
        writer.add_episode(np.asarray(frames[lo:hi]), np.asarray(actions[lo:hi]))
    return writer.finish(source_cache=str(cache), split=split)


# ------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Shard:
    """One shard as its index describes it."""

    path: str
    bytes: int
    keys: tuple[str, ...]
    lengths: tuple[int, ...]
    crc32: tuple[tuple[int, int], ...]  # per episode: of the stored frames and actions members
    compress: str


def resolve_urls(urls: str | Sequence[str]) -> list[str]:
    """Local shard paths from a glob, a folder (its *.tar) or a list of them, in a fixed order
    (sorted within each entry). Remote URLs are refused."""
    entries = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    paths: list[str] = []
    for entry in entries:
        entry = str(entry)
        if "://" in entry:
            raise ValueError(
                f"{entry}: remote shard URLs are not supported yet; copy the shards to a local "
                "or network file system and give their paths or a glob"
            )
        entry = os.path.expanduser(entry)
        if os.path.isdir(entry):
            found = sorted(glob.glob(os.path.join(entry, "*.tar")))
        else:
            found = sorted(glob.glob(entry))
        if not found:
            raise FileNotFoundError(f"no shard matches {entry!r}")
        paths.extend(os.path.abspath(p) for p in found)
    if len(set(paths)) != len(paths):
        raise ValueError(f"a shard is listed twice in {urls!r}")
    return paths


def load_index(paths: Sequence[str]) -> tuple[list[Shard], dict[str, Any]]:
    """The index entries of `paths` (from the `index.json` beside each) and the common facts
    (resolution, channels, num_actions); a shard without an entry is an error."""
    indices: dict[str, dict[str, Any]] = {}
    shards: list[Shard] = []
    meta: dict[str, Any] | None = None
    for path in paths:
        folder = os.path.dirname(path)
        if folder not in indices:
            try:
                with open(os.path.join(folder, INDEX)) as f:
                    index = json.load(f)
            except (OSError, ValueError) as e:
                raise FileNotFoundError(
                    f"no readable {INDEX} beside {path}: shards are written with "
                    "`python -m worldmodel.data.stream write` (the index is written last)"
                ) from e
            if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{folder}/{INDEX}: not a {FORMAT} v{FORMAT_VERSION} index")
            index["by_file"] = {s["file"]: s for s in index["shards"]}
            indices[folder] = index
            facts = {k: index[k] for k in ("resolution", "channels", "num_actions")}
            if meta is None:
                meta = facts
            elif facts != meta:
                raise ValueError(f"{folder}/{INDEX} holds {facts}, other shards hold {meta}")
        index = indices[folder]
        entry = index["by_file"].get(os.path.basename(path))
        if entry is None:
            raise ValueError(f"{path} is not in {folder}/{INDEX}")
        shards.append(
            Shard(
                path,
                int(entry["bytes"]),
                tuple(e["key"] for e in entry["episodes"]),
                tuple(int(e["length"]) for e in entry["episodes"]),
                tuple(tuple(e["crc32"]) for e in entry["episodes"]),
                index["compress"],
            )
        )
    assert meta is not None
    return shards, meta


def read_shard(shard: Shard, frame_shape: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """All episodes of a shard as (frames uint8 (N, H, W, C), actions int64 (N,)), checked
    against the index; anything else raises `ShardError` naming the shard."""
    try:
        size = os.path.getsize(shard.path)
        if size != shard.bytes:
            raise ShardError(f"{size} bytes, the index says {shard.bytes}")
        suffix = ".zlib" if shard.compress == "zlib" else ""
        members: dict[str, bytes] = {}
        with tarfile.open(shard.path, "r:") as tar:
            for member in tar:
                f = tar.extractfile(member)
                if f is not None:
                    members[member.name] = f.read()
        episodes = []
        for key, length, crcs in zip(shard.keys, shard.lengths, shard.crc32, strict=True):
            arrays = []
            for name, crc in zip(("frames", "actions"), crcs, strict=True):
                member = f"{key}.{name}.npy{suffix}"
                data = members.get(member)
                if data is None:
                    raise ShardError(f"no member {member}")
                if zlib.crc32(data) != crc:
                    raise ShardError(f"{member}: crc32 differs from the index (corrupt bytes)")
                if suffix:
                    data = zlib.decompress(data)
                arrays.append(np.load(io.BytesIO(data), allow_pickle=False))
            frames, actions = arrays
            if frames.shape != (length, *frame_shape) or frames.dtype != np.uint8:
                raise ShardError(f"episode {key}: frames {frames.dtype} {frames.shape}")
            if actions.shape != (length,):
                raise ShardError(f"episode {key}: actions of shape {actions.shape}")
            episodes.append((frames, actions.astype(np.int64, copy=False)))
        return episodes
    except ShardError as e:
        raise ShardError(f"shard {shard.path}: {e}") from None
    except (OSError, tarfile.TarError, zlib.error, ValueError, EOFError) as e:
        raise ShardError(f"shard {shard.path}: {type(e).__name__}: {e}") from e


def _to_item(frames: np.ndarray, actions: np.ndarray, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """The item ClipDataset gives, from an episode's arrays and the clip's frame indices."""
    clip = torch.from_numpy(np.ascontiguousarray(frames[idx]))  # (T, H, W, C) uint8
    video = rearrange(clip, "t h w c -> c t h w").float().div_(127.5).sub_(1.0)
    return {
        "video": video,
        "actions": torch.from_numpy(np.ascontiguousarray(actions[idx], dtype=np.int64)),
        "mask": torch.ones(len(idx), dtype=torch.bool),
    }


class _Clips:
    """What both readers share: the shards, the clip settings and per-shard clip tables."""

    def __init__(
        self,
        urls: str | Sequence[str],
        clip_length: int,
        frame_stride: int,
        clip_stride: int,
        resolution: tuple[int, int] | None = None,
    ):
        if clip_length < 1 or frame_stride < 1 or clip_stride < 1:
            raise ValueError(
                f"clip_length, frame_stride and clip_stride must be >= 1, got "
                f"{clip_length}, {frame_stride}, {clip_stride}"
            )
        self.shards, meta = load_index(resolve_urls(urls))
        self.resolution: tuple[int, int] = tuple(meta["resolution"])
        self.channels: int = meta["channels"]
        self.num_actions: int | None = meta["num_actions"]
        if resolution is not None and tuple(resolution) != self.resolution:
            raise ValueError(
                f"data.resolution={list(resolution)} but the shards hold "
                f"{self.resolution[0]}x{self.resolution[1]} frames; set data.resolution to "
                "match (shards are not resized while streaming)"
            )
        self.clip_length = clip_length
        self.frame_stride = frame_stride
        self.clip_stride = clip_stride
        self.span = (clip_length - 1) * frame_stride + 1
        count = ClipDataset.count_clips
        # per shard: clips per episode
        self.counts = [
            np.array(
                [count(n, clip_length, frame_stride, clip_stride) for n in s.lengths], np.int64
            )
            for s in self.shards
        ]
        self.shard_clips = np.array([int(c.sum()) for c in self.counts], dtype=np.int64)
        self.num_clips = int(self.shard_clips.sum())
        self.num_episodes = sum(len(s.lengths) for s in self.shards)
        if self.num_clips == 0:
            longest = max((max(s.lengths, default=0) for s in self.shards), default=0)
            raise ValueError(
                f"the shards hold no clip of {clip_length} frames with frame_stride "
                f"{frame_stride} (needs {self.span} frames; longest episode {longest})"
            )

    def __len__(self) -> int:
        return self.num_clips

    def frame_shape(self) -> tuple[int, int, int]:
        return (*self.resolution, self.channels)

    def clip_table(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(episode, first frame) of each clip of a shard, in stored order."""
        episodes = np.repeat(np.arange(len(self.counts[shard])), self.counts[shard])
        starts = np.concatenate(
            [np.arange(n, dtype=np.int64) * self.clip_stride for n in self.counts[shard]]
            or [np.zeros(0, dtype=np.int64)]
        )
        return episodes, starts

    def frame_indices(self, start: int) -> np.ndarray:
        return start + self.frame_stride * np.arange(self.clip_length)


class ShardClips(_Clips, Dataset):
    """Map-style clips over shards in stored order (validation, evaluation, tests); items as
    `ClipDataset`'s. One shard is held at a time, so reading indices in order opens each once."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ends = np.cumsum(self.shard_clips)
        self._held: tuple[int, list, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_held"] = None  # workers read their own
        return state

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.num_clips <= index < self.num_clips:
            raise IndexError(f"clip {index} out of range for {self.num_clips} clips")
        index %= self.num_clips
        s = int(np.searchsorted(self.ends, index, side="right"))
        if self._held is None or self._held[0] != s:
            self._held = (s, read_shard(self.shards[s], self.frame_shape()), *self.clip_table(s))
        _, episodes, ep_of, start_of = self._held
        local = index - (self.ends[s] - self.shard_clips[s])
        frames, actions = episodes[ep_of[local]]
        return _to_item(frames, actions, self.frame_indices(int(start_of[local])))

    def __repr__(self) -> str:
        return (
            f"ShardClips({len(self.shards)} shards: {self.num_clips} clips of "
            f"{self.clip_length}x{self.frame_stride} from {self.num_episodes} episodes)"
        )


@dataclass(frozen=True)
class Placement:
    """Where one rank's stream starts and how it is cut (see the module docstring)."""

    global_batch: int
    grad_accum: int
    rank: int
    world_size: int
    seed: int
    start_batch: int
    partitions: int  # contiguous pieces of a rank's block: the DataLoader's worker count

    @property
    def micro(self) -> int:
        return self.global_batch // (self.grad_accum * self.world_size)


class ShardStream(_Clips, IterableDataset):
    """The training stream over shards: infinite, seeded per epoch, split across ranks and
    DataLoader workers (see the module docstring). Items are `ClipDataset`'s.

    `len()` is the clips of one epoch (for `batches_per_epoch`); `placed(...)` returns the copy
    one rank iterates, from a given global batch on.

    Args:
        shuffle_shards: consecutive shards (in the epoch's shard order) whose clips are shuffled
            together; a worker holds this many decoded shards at a time.
        on_corrupt: `error` stops at an unreadable shard, naming it; `skip` logs a warning,
            counts it (`corrupt_shards`, per worker process) and fills its clips' places with
            the clips of the next readable shard in the epoch's order (batch shapes, every other
            position and resumes stay as they were).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        clip_length: int,
        frame_stride: int = 1,
        clip_stride: int = 1,
        resolution: tuple[int, int] | None = None,
        shuffle_shards: int = 1,
        on_corrupt: str = "error",
    ):
        super().__init__(urls, clip_length, frame_stride, clip_stride, resolution)
        if shuffle_shards < 1:
            raise ValueError(f"shuffle_shards must be >= 1, got {shuffle_shards}")
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt={on_corrupt!r}: expected one of {ON_CORRUPT}")
        self.shuffle_shards = shuffle_shards
        self.on_corrupt = on_corrupt
        self.placement: Placement | None = None
        self.corrupt_shards: set[str] = set()
        self._windows: dict[tuple[int, int], Any] = {}
        self._epoch: tuple[int, list[np.ndarray], np.ndarray] | None = None

    def placed(
        self,
        start_batch: int,
        global_batch: int,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> ShardStream:
        """A copy of this stream for one rank, starting at global batch `start_batch`."""
        if global_batch % (grad_accum * world_size):
            raise ValueError(
                f"global batch {global_batch} is not divisible by grad_accum {grad_accum} x "
                f"world size {world_size}"
            )
        if self.num_clips < global_batch:
            raise ValueError(
                f"the shards hold {self.num_clips} clips, fewer than one batch of "
                f"{global_batch}: lower trainer.batch_size or add shards"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        copy = object.__new__(ShardStream)
        copy.__dict__.update(self.__getstate__())
        copy.placement = Placement(
            global_batch, grad_accum, rank, world_size, seed, start_batch, max(1, num_workers)
        )
        return copy

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_windows"], state["_epoch"] = {}, None
        state["corrupt_shards"] = set()
        return state

    # -- the epoch's sequence --------------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        return self.num_clips // self.placement.global_batch

    def epoch_windows(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The epoch's windows (shard ids, in the epoch's shard order) and their clip-count ends."""
        seed = self.placement.seed if self.placement else 0
        order = np.random.default_rng([seed, epoch]).permutation(len(self.shards))
        k = self.shuffle_shards
        windows = [order[i : i + k] for i in range(0, len(order), k)]
        ends = np.cumsum([int(self.shard_clips[w].sum()) for w in windows])
        return windows, ends

    def micro_positions(self, g: int) -> tuple[int, np.ndarray]:
        """The epoch and the positions in its sequence of this rank's micro-batch `g` (counted
        over all epochs from the start of training)."""
        p = self.placement
        m, per_rank = p.micro, self.batches_per_epoch * p.grad_accum  # micro-batches per epoch
        epoch, k = divmod(g, per_rank)
        parts = p.partitions
        j, t = k % parts, k // parts
        # piece j holds the micro-batches k' = j, j + P, ... of the block: n_j of them
        offset = sum((per_rank - i + parts - 1) // parts for i in range(j))
        base = (p.rank * per_rank + offset + t) * m
        return epoch, np.arange(base, base + m)

    def _window(self, epoch: int, wi: int) -> Any:
        """The decoded shards of window `wi` and its permuted clip table, cached per worker."""
        key = (epoch, wi)
        if key in self._windows:
            return self._windows[key]
        # A worker's positions only move forward: the windows behind it are not read again.
        for held in [k for k in self._windows if k < key]:
            del self._windows[held]
        windows, _ = self._layout(epoch)
        episodes, ep_of, start_of, shard_of = [], [], [], []
        for n, s in enumerate(windows[wi]):
            eps, e_of, st = self._read_or_refill(int(s), np.concatenate(windows))
            episodes.append(eps)
            ep_of.append(e_of)
            start_of.append(st)
            shard_of.append(np.full(len(e_of), n, dtype=np.int64))
        ep_of, start_of = np.concatenate(ep_of), np.concatenate(start_of)
        seed = self.placement.seed if self.placement else 0
        perm = np.random.default_rng([seed, epoch, wi, 1]).permutation(len(ep_of))
        data = (episodes, np.concatenate(shard_of)[perm], ep_of[perm], start_of[perm])
        self._windows[key] = data
        return data

    def _read_or_refill(self, s: int, order: np.ndarray) -> tuple[list, np.ndarray, np.ndarray]:
        """Shard `s`'s episodes and clip table. An unreadable shard stops the stream, or under
        `on_corrupt=skip` its clips' places take the clips of the next readable shard in the
        epoch's order (a fixed choice: positions, batch shapes and resumes stay as they were)."""
        try:
            return (read_shard(self.shards[s], self.frame_shape()), *self.clip_table(s))
        except ShardError as e:
            if self.on_corrupt == "error":
                raise
            log.warning("skipping %s (its %d clips refilled)", e, self.shard_clips[s])
            self.corrupt_shards.add(self.shards[s].path)
        at = int(np.flatnonzero(order == s)[0])
        for r in np.roll(order, -at)[1:]:
            if self.shard_clips[r] == 0 or self.shards[r].path in self.corrupt_shards:
                continue
            try:
                eps = read_shard(self.shards[r], self.frame_shape())
            except ShardError as e:
                log.warning("skipping %s (its %d clips refilled)", e, self.shard_clips[r])
                self.corrupt_shards.add(self.shards[r].path)
                continue
            e_of, st = self.clip_table(int(r))
            take = np.arange(self.shard_clips[s]) % len(e_of)
            return eps, e_of[take], st[take]
        raise ShardError(f"no readable shard is left among {len(order)}")

    def _layout(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """`epoch_windows(epoch)`, computed once per epoch and worker."""
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, *self.epoch_windows(epoch))
        return self._epoch[1], self._epoch[2]

    def clip_at(self, epoch: int, position: int) -> dict[str, torch.Tensor]:
        """The clip at `position` of the epoch's sequence."""
        windows, ends = self._layout(epoch)
        wi = int(np.searchsorted(ends, position, side="right"))
        local = position - (int(ends[wi - 1]) if wi else 0)
        episodes, shard_of, ep_of, start_of = self._window(epoch, wi)
        frames, actions = episodes[shard_of[local]][ep_of[local]]
        return _to_item(frames, actions, self.frame_indices(int(start_of[local])))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.placement is None:
            raise RuntimeError("ShardStream.placed(...) says where a rank starts; iterate that")
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if workers != self.placement.partitions:
            raise RuntimeError(
                f"the stream was placed for {self.placement.partitions} workers but runs in "
                f"{workers}: pass num_workers to placed() as to the DataLoader"
            )
        # The DataLoader takes micro-batch i from worker i mod W: this worker's are every W-th.
        g = self.placement.start_batch * self.placement.grad_accum + worker
        while True:
            epoch, positions = self.micro_positions(g)
            for position in positions:
                yield self.clip_at(epoch, int(position))
            g += workers

    def __repr__(self) -> str:
        return (
            f"ShardStream({len(self.shards)} shards: {self.num_clips} clips of "
            f"{self.clip_length}x{self.frame_stride} from {self.num_episodes} episodes, "
            f"shuffle_shards={self.shuffle_shards})"
        )


# ------------------------------------------------------------------------------ the data group


def check_config(data: Any) -> list[str]:
    """Problems of a `data=shards` config, found before any work (asked by `config.validate`)."""
    errors = []
    if OmegaConf.is_missing(data, "urls"):
        return errors  # `validate` names an unset `???` itself
    urls = data.get("urls")
    if urls is None:
        errors.append("data.urls: missing (a glob, folder or list of local shard paths)")
    for key, value in (("urls", urls), ("val_urls", data.get("val_urls"))):
        items = [value] if isinstance(value, str) else list(value or [])
        if any("://" in str(v) for v in items):
            errors.append(f"data.{key}={value}: remote shard URLs are not supported yet")
    if data.get("on_corrupt", "error") not in ON_CORRUPT:
        errors.append(f"data.on_corrupt={data.on_corrupt!r}: expected one of {ON_CORRUPT}")
    if int(data.get("shuffle_shards", 1)) < 1:
        errors.append(f"data.shuffle_shards={data.shuffle_shards}: expected >= 1")
    return errors


class ShardSource:
    """`data=shards`: training clips streamed from `urls`, validation clips from `val_urls`
    (map-style, in stored order, non-overlapping unless `val_clip_stride` says otherwise).
    Without `val_urls`, validation reads the first train shards, with a warning."""

    kind = "shards"

    def __init__(
        self,
        urls: str | Sequence[str],
        val_urls: str | Sequence[str] | None = None,
        resolution: int | Sequence[int] = 64,
        clip_length: int = 16,
        frame_stride: int = 1,
        clip_stride: int = 1,
        val_clip_stride: int | None = None,
        shuffle_shards: int = 1,
        on_corrupt: str = "error",
        name: str | None = None,
    ):
        self.urls = urls if isinstance(urls, str) else list(urls)
        self.val_urls = (
            val_urls if val_urls is None or isinstance(val_urls, str) else list(val_urls)
        )
        self.resolution = parse_resolution(resolution)
        self.clip_length = int(clip_length)
        self.frame_stride = int(frame_stride)
        self.clip_stride = int(clip_stride)
        self.val_clip_stride = val_clip_stride
        self.shuffle_shards = int(shuffle_shards)
        self.on_corrupt = on_corrupt
        self.name = name or self.kind
        self._num_actions: int | None = None

    @property
    def num_actions(self) -> int | None:
        if self._num_actions is None:
            _, meta = load_index(resolve_urls(self.urls))
            self._num_actions = meta["num_actions"]
        return self._num_actions

    def stream(self) -> ShardStream:
        return ShardStream(
            self.urls,
            self.clip_length,
            self.frame_stride,
            self.clip_stride,
            self.resolution,
            self.shuffle_shards,
            self.on_corrupt,
        )

    def split(self, name: str) -> ShardClips:
        """Map-style clips of `val` (val_urls) or `train` (urls) in stored order."""
        if name not in ("train", "val"):
            raise ValueError(f"data=shards has train and val shards only, not {name!r}")
        urls = self.urls
        if name == "val":
            if self.val_urls is None:
                log.warning("data.val_urls is not set: validating on the train shards")
            else:
                urls = self.val_urls
        stride = (
            self.clip_stride
            if name == "train"
            else self.val_clip_stride or ((self.clip_length - 1) * self.frame_stride + 1)
        )
        return ShardClips(urls, self.clip_length, self.frame_stride, stride, self.resolution)

    def datasets(self) -> tuple[ShardStream, ShardClips]:
        """(train stream, val clips)."""
        return self.stream(), self.split("val")


# ------------------------------------------------------------------------------------------ CLI


def main(argv: Iterable[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m worldmodel.data.stream",
        description="Write or inspect streaming tar shards of whole episodes.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="convert a split of a frame cache folder into shards")
    w.add_argument("--cache", required=True, help="a frame cache folder (holds manifest.json)")
    w.add_argument("--split", default="train")
    w.add_argument("--out", required=True, help="a new folder for the shards and index.json")
    w.add_argument("--shards", type=int, default=100, help="about this many shards")
    w.add_argument("--compress", choices=COMPRESSIONS, default="none")
    i = sub.add_parser("info", help="shards, episodes, frames and clips of a glob")
    i.add_argument("urls", nargs="+")
    i.add_argument("--clip-length", type=int, default=16)
    args = p.parse_args(None if argv is None else list(argv))
    if args.command == "write":
        index = write_from_cache(args.cache, args.split, args.out, args.shards, args.compress)
        print(
            f"{len(index['shards'])} shards, {index['num_episodes']} episodes, "
            f"{index['num_frames']} frames -> {args.out}"
        )
    else:
        clips = ShardClips(args.urls, args.clip_length, 1, 1)
        print(
            f"{len(clips.shards)} shards, {clips.num_episodes} episodes, "
            f"{sum(sum(s.lengths) for s in clips.shards)} frames, "
            f"{clips.num_clips} clips of {args.clip_length} frames"
        )


if __name__ == "__main__":
    main()
