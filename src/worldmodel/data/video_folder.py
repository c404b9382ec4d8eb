"""Any folder of videos (searched recursively), decoded once into the frame cache (`decode.py`).

Every video is one episode with unknown actions (-1; `num_actions` is None). Files are split
between train and val by a hash of their path relative to the folder (stable when files are
added), keeping both splits non-empty; a folder with a single video gives its last
`val_fraction` of frames to val instead. Files that cannot be decoded (empty, truncated, not a
video) are skipped with a warning and counted in the manifest (`skipped`, `skipped_files`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from worldmodel.data.decode import DecodeError, probe, read_frames
from worldmodel.data.frames import resize_frames, split_by_hash
from worldmodel.data.shards import CacheWriter
from worldmodel.data.source import FolderSource

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


class VideoFolderSource(FolderSource):
    """Frames decoded from a folder of mp4/avi/mkv/webm/mov files.

    Args (besides those of `Source`):
        folder: the folder to search (recursively).
        crop: "center" (cut the target aspect ratio, then resize) or "none" (resize only).
        fps: resample every video to this frame rate (None = keep every frame).
        max_frames_per_video: keep at most this many frames from the start (None = all).
        val_fraction: share of files (or of frames, for a single video) given to val.
        decode_batch: frames decoded and resized at once (bounds memory for large videos).
    """

    kind = "video_folder"
    extensions = VIDEO_EXTENSIONS

    def __init__(
        self,
        root: str,
        folder: str,
        resolution: int | list[int] = 64,
        clip_length: int = 16,
        frame_stride: int = 1,
        clip_stride: int = 1,
        val_clip_stride: int | None = None,
        crop: str = "center",
        fps: float | None = None,
        max_frames_per_video: int | None = None,
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
        self.fps = None if fps is None else float(fps)
        self.max_frames_per_video = (
            None if max_frames_per_video is None else int(max_frames_per_video)
        )
        self.decode_batch = int(decode_batch)

    def recording_params(self) -> dict[str, Any]:
        return {
            **super().recording_params(),
            "fps": self.fps,
            "max_frames_per_video": self.max_frames_per_video,
        }

    # -- decoding -------------------------------------------------------------------------------
    def _frame_indices(self, num_frames: int, native_fps: float) -> np.ndarray:
        """Which decoded frames to keep: resampled to `fps`, capped to `max_frames_per_video`."""
        if self.fps is None or not native_fps > 0:
            idx = np.arange(num_frames)
        else:
            step = native_fps / self.fps
            idx = np.unique(np.floor(np.arange(0, num_frames / step) * step).astype(np.int64))
            idx = idx[idx < num_frames]
        if self.max_frames_per_video:
            idx = idx[: self.max_frames_per_video]
        return idx

    def _probe(self, path: Path) -> np.ndarray | None:
        """The frame indices to decode, or None (with a warning) if the file is unreadable."""
        try:
            info = probe(path)
            idx = self._frame_indices(info.num_frames, info.fps or 0.0)
            if len(idx) == 0:
                raise DecodeError(f"{path}: no frames")
            list(read_frames(path, idx[:1]))  # the container opened; check a frame decodes
            return idx
        except DecodeError as e:
            log.warning("skipping unreadable video %s: %s", path, str(e).splitlines()[0][:200])
            return None

    def _decode(self, path: Path, idx: np.ndarray, bar: Any):
        """Yields resized uint8 frame batches (n, H, W, 3) of `path` at `idx`."""
        for batch in read_frames(path, idx, self.decode_batch):
            yield resize_frames(batch, self.resolution, self.crop)
            bar.update(len(batch))

    def _write_video(
        self, writer: CacheWriter, path: Path, parts: list[tuple[str, np.ndarray]], bar: Any
    ) -> bool:
        """Decodes `path` into one episode per (split, frame indices) part; False on failure."""
        rel = self.relative(path)
        try:
            for split, idx in parts:
                writer[split].begin_episode()
                for frames in self._decode(path, idx, bar):
                    writer[split].append(frames)
                writer[split].end_episode(file=rel, first_frame=int(idx[0]))
            return True
        except Exception as e:
            for split, _ in parts:
                writer[split].abort_episode()
            log.warning(
                "skipping video %s that failed to decode: %s", path, str(e).splitlines()[0][:200]
            )
            return False

    def record(self, writer: CacheWriter) -> dict[str, Any]:
        probed = [(path, self._probe(path)) for path in self.files]
        good = [(path, idx) for path, idx in probed if idx is not None]
        skipped = [self.relative(path) for path, idx in probed if idx is None]
        if not good:
            raise ValueError(
                f"no readable video in {self.folder} ({len(skipped)} files skipped: "
                f"{', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})"
            )
        if len(good) == 1:
            # one video: its last val_fraction of frames go to val so both splits exist
            path, idx = good[0]
            cut = len(idx) - max(1, math.ceil(len(idx) * self.val_fraction))
            jobs = [(path, [("train", idx[:cut]), ("val", idx[cut:])])]
        else:
            keys = [self.relative(path) for path, _ in good]
            train, val = split_by_hash(keys, self.val_fraction)
            jobs = [(good[i][0], [("train", good[i][1])]) for i in train]
            jobs += [(good[i][0], [("val", good[i][1])]) for i in val]
            jobs.sort(key=lambda job: job[0])
        total = sum(len(idx) for _, parts in jobs for _, idx in parts)
        with self.progress(total, "decode") as bar:
            for path, parts in jobs:
                if not self._write_video(writer, path, [p for p in parts if len(p[1])], bar):
                    skipped.append(self.relative(path))
        return {"num_actions": None, **self.skipped_summary(skipped)}
