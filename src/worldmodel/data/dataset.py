"""Clips of consecutive frames over a memory-mapped frame cache (see `shards.py`).

A clip is `clip_length` frames taken `frame_stride` frames apart from one episode, so it spans
`(clip_length - 1) * frame_stride + 1` recorded frames. Clip starts are `clip_stride` frames
apart, beginning at each episode's first frame; an episode shorter than one span gives no clip and
is counted in `skipped_episodes`. The enumeration depends only on the episode table and the three
numbers, so it is identical in every process.

Actions: `actions[t]` is the recorded action taken at frame t of the clip, i.e. the one that leads
from frame t towards frame t+1. With `frame_stride > 1` it is the action of the FIRST of the
`frame_stride` underlying steps between the two frames (the others are not represented; with
the held random policies of the recorders they usually coincide). The action at the last frame
is the one taken there (leading out of the clip); -1 means unknown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset, Subset

from worldmodel.data.shards import MANIFEST


class ClipDataset(Dataset):
    """Fixed-length clips from one split of a cache folder.

    Items: `{"video": float32 (C, T, H, W) in [-1, 1], "actions": int64 (T,), "mask": bool (T,)}`.
    Memory maps are opened lazily in each process, so the dataset pickles cheaply into
    DataLoader workers.
    """

    def __init__(
        self,
        folder: str | Path,
        split: str = "train",
        clip_length: int = 16,
        frame_stride: int = 1,
        clip_stride: int = 1,
    ):
        if clip_length < 1 or frame_stride < 1 or clip_stride < 1:
            raise ValueError(
                f"clip_length, frame_stride and clip_stride must be >= 1, got "
                f"{clip_length}, {frame_stride}, {clip_stride}"
            )
        self.folder = Path(folder)
        self.split = split
        self.clip_length = clip_length
        self.frame_stride = frame_stride
        self.clip_stride = clip_stride
        with open(self.folder / MANIFEST) as f:
            manifest = json.load(f)
        info = manifest["splits"][split]
        self.frames_path = self.folder / info["frames_file"]
        self.actions_path = self.folder / info["actions_file"]
        self.num_actions: int | None = manifest["num_actions"]
        self.resolution: tuple[int, int] = tuple(manifest["resolution"])
        self.channels: int = manifest["channels"]
        self.episodes: list[dict[str, Any]] = info["episodes"]
        self.num_episodes = len(self.episodes)
        self.num_frames: int = info["num_frames"]

        span = self.span
        starts, skipped = [], 0
        for episode in self.episodes:
            last = episode["length"] - span  # last valid start within the episode
            if last < 0:
                skipped += 1
                continue
            starts.append(episode["offset"] + np.arange(0, last + 1, clip_stride, dtype=np.int64))
        self.skipped_episodes = skipped
        # global index of each clip's first frame in the split's frame array
        self.starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        self.num_clips = len(self.starts)
        self._frames: np.ndarray | None = None
        self._actions: np.ndarray | None = None

    @property
    def span(self) -> int:
        """Recorded frames covered by one clip."""
        return (self.clip_length - 1) * self.frame_stride + 1

    @staticmethod
    def count_clips(length: int, clip_length: int, frame_stride: int, clip_stride: int) -> int:
        """Clips in one episode of `length` frames (0 when it is shorter than one span)."""
        span = (clip_length - 1) * frame_stride + 1
        return 0 if length < span else (length - span) // clip_stride + 1

    def __len__(self) -> int:
        return self.num_clips

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._frames is None:
            self._frames = np.load(self.frames_path, mmap_mode="r")
            self._actions = np.load(self.actions_path, mmap_mode="r")
        return self._frames, self._actions

    def __getstate__(self) -> dict[str, Any]:
        # memory maps are not sent to workers; each process reopens its own
        state = self.__dict__.copy()
        state["_frames"] = state["_actions"] = None
        return state

    def frames(self, index: int) -> np.ndarray:
        """The raw uint8 frames (T, H, W, C) of clip `index`."""
        frames, _ = self._open()
        return np.asarray(frames[self._indices(index)])

    def _indices(self, index: int) -> np.ndarray:
        if not -self.num_clips <= index < self.num_clips:
            raise IndexError(f"clip {index} out of range for {self.num_clips} clips")
        return self.starts[index] + self.frame_stride * np.arange(self.clip_length)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        frames, actions = self._open()
        idx = self._indices(index)
        clip = torch.from_numpy(np.asarray(frames[idx]))  # (T, H, W, C) uint8
        video = rearrange(clip, "t h w c -> c t h w").float().div_(127.5).sub_(1.0)
        return {
            "video": video,
            "actions": torch.from_numpy(np.asarray(actions[idx], dtype=np.int64)),
            "mask": torch.ones(self.clip_length, dtype=torch.bool),
        }

    def __repr__(self) -> str:
        return (
            f"ClipDataset({self.folder.name}/{self.split}: {self.num_clips} clips of "
            f"{self.clip_length}x{self.frame_stride} from {self.num_episodes} episodes, "
            f"{self.num_frames} frames, {self.resolution[0]}x{self.resolution[1]}, "
            f"num_actions={self.num_actions})"
        )


def val_subset(val_ds: Any, n: int) -> Subset:
    """A fixed, evenly spread subset of the validation clips, the same at every evaluation."""
    n = min(n, len(val_ds))
    idx = torch.linspace(0, len(val_ds) - 1, n).long().unique().tolist()
    return Subset(val_ds, idx)
