"""The common part of every frame source: cache location, recording once, clip datasets.

A source subclass says what identifies a recording (`recording_params`) and how to fill a
`CacheWriter` (`record`); `datasets()` does the rest. The clip settings (`clip_length`,
`frame_stride`, `clip_stride`) are not part of the cache key: one recording serves any clip shape.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from worldmodel.data.dataset import ClipDataset
from worldmodel.data.frames import check_crop, parse_resolution
from worldmodel.data.shards import CacheWriter, cache_folder, ensure_cache

log = logging.getLogger(__name__)


class Source:
    """Base class of the frame sources instantiated from `conf/data/<name>.yaml`.

    Args:
        root: folder holding the caches of all sources.
        resolution: output frame size, an int or [H, W].
        clip_length: frames per clip (T).
        frame_stride: recorded frames between consecutive clip frames.
        clip_stride: recorded frames between consecutive train clip starts.
        val_clip_stride: the same for val clips; None = one span (non-overlapping clips).
        name: the config's label (e.g. "procgen"); informational only.
    """

    kind = "source"  # folder prefix of the cache; subclasses override

    def __init__(
        self,
        root: str | Path,
        resolution: int | list[int] = 64,
        clip_length: int = 16,
        frame_stride: int = 1,
        clip_stride: int = 1,
        val_clip_stride: int | None = None,
        name: str | None = None,
    ):
        self.root = Path(root).expanduser()
        self.resolution = parse_resolution(resolution)
        self.clip_length = int(clip_length)
        self.frame_stride = int(frame_stride)
        self.clip_stride = int(clip_stride)
        self.val_clip_stride = val_clip_stride
        self.name = name or self.kind
        self.manifest: dict[str, Any] | None = None

    # -- what a subclass provides -------------------------------------------------------------
    def recording_params(self) -> dict[str, Any]:
        """Everything that changes the recorded frames (the cache key)."""
        raise NotImplementedError

    def label(self) -> str:
        """A readable part of the cache folder name (e.g. the game)."""
        return self.kind

    def record(self, writer: CacheWriter) -> dict[str, Any]:
        """Fills `writer["train"]` and `writer["val"]`; returns `num_actions` and extra
        manifest entries (e.g. `skipped`)."""
        raise NotImplementedError

    def known_num_actions(self) -> int | None:
        """The action count without recording (None = no actions); sources with actions
        override it."""
        return None

    # -- shared -------------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        return cache_folder(self.root, self.kind, self.label(), self.recording_params())

    @property
    def num_actions(self) -> int | None:
        """Size of the action space (None for action-free video), known before recording."""
        if self.manifest is not None:
            return self.manifest["num_actions"]
        return self.known_num_actions()

    def _record(self, folder: Path, params: dict[str, Any]) -> dict[str, Any]:
        writer = CacheWriter(folder, (*self.resolution, 3))
        start = time.perf_counter()
        extra = self.record(writer)
        seconds = time.perf_counter() - start
        frames = sum(w.num_frames for w in writer.splits.values())
        log.info(
            "recorded %d frames in %.1f s (%.0f frames/s) into %s",
            frames,
            seconds,
            frames / max(seconds, 1e-9),
            folder,
        )
        extra.setdefault("record_seconds", round(seconds, 3))
        return writer.finish(params, **extra)

    def progress(self, total: int | None, desc: str) -> tqdm:
        """A progress bar in frames (shows rate and ETA when `total` is known)."""
        return tqdm(total=total, desc=f"{self.name} {desc}", unit="frame", dynamic_ncols=True)

    def prepare(self) -> Path:
        """Records the cache if it is missing or incomplete; returns its folder."""
        params = self.recording_params()  # computed once: for folders it stats every file
        folder = cache_folder(self.root, self.kind, self.label(), params)
        self.manifest = ensure_cache(folder, params, lambda f: self._record(f, params))
        return folder

    def datasets(self) -> tuple[ClipDataset, ClipDataset]:
        """(train, val) clip datasets over the cache, recording it first if needed."""
        return self.split("train"), self.split("val")

    def split(self, name: str) -> ClipDataset:
        """The clip dataset of one recorded split (train, val, or test where the source records
        one), recording the cache first if needed. Train clips start every `clip_stride`
        frames; val and test clips do not overlap unless `val_clip_stride` says otherwise."""
        folder = self.prepare()
        recorded = sorted((self.manifest or {}).get("splits", {}))
        if name not in recorded:
            raise ValueError(
                f"{self.name}: no {name!r} split in {folder} (recorded: {', '.join(recorded)}); "
                "a test split is recorded when the data config asks for test frames"
            )
        span = (self.clip_length - 1) * self.frame_stride + 1
        stride = self.clip_stride if name == "train" else self.val_clip_stride or span
        ds = ClipDataset(folder, name, self.clip_length, self.frame_stride, stride)
        if ds.num_clips == 0:
            longest = max((e["length"] for e in ds.episodes), default=0)
            raise ValueError(
                f"{self.name}: the {name} split has no clip of {self.clip_length} frames "
                f"with frame_stride {self.frame_stride} (needs {span} frames; "
                f"{ds.num_episodes} episodes, longest {longest} frames) in {folder}"
            )
        return ds

    @property
    def skipped(self) -> int:
        """Inputs skipped while recording (unreadable files); 0 before the cache exists."""
        return int((self.manifest or {}).get("skipped", 0))


def list_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Files under `folder` (recursive) with one of `extensions` (any case), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)


class FolderSource(Source):
    """A source reading the files of a folder (recursively) with given extensions.

    The cache key holds each file's relative path, size and mtime, so adding, removing or
    changing a file records anew. Files are split between train and val by a hash of their
    relative path (`frames.split_by_hash`).
    """

    extensions: tuple[str, ...] = ()

    def __init__(
        self,
        root: str | Path,
        folder: str | Path,
        resolution: int | list[int] = 64,
        clip_length: int = 16,
        frame_stride: int = 1,
        clip_stride: int = 1,
        val_clip_stride: int | None = None,
        crop: str = "center",
        val_fraction: float = 0.1,
        name: str | None = None,
    ):
        super().__init__(
            root, resolution, clip_length, frame_stride, clip_stride, val_clip_stride, name
        )
        check_crop(crop)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise ValueError(f"{self.kind} folder {self.folder} does not exist or is not a folder")
        self.crop = crop
        self.val_fraction = float(val_fraction)
        self.files = list_files(self.folder, self.extensions)
        if not self.files:
            kinds = "/".join(e[1:] for e in self.extensions)
            raise ValueError(f"no {kinds} file in {self.folder}")

    def label(self) -> str:
        return self.folder.name

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.folder))

    def recording_params(self) -> dict[str, Any]:
        files = {}
        for path in self.files:
            stat = path.stat()
            files[self.relative(path)] = [stat.st_size, stat.st_mtime_ns]
        return {
            "source": self.kind,
            "folder": str(self.folder),
            "files": files,
            "resolution": list(self.resolution),
            "crop": self.crop,
            "val_fraction": self.val_fraction,
        }

    def skipped_summary(self, skipped: list[str]) -> dict[str, Any]:
        """Warns about skipped files and returns the manifest entries that count them."""
        if skipped:
            log.warning("%d of %d files in %s skipped", len(skipped), len(self.files), self.folder)
        return {"skipped": len(skipped), "skipped_files": skipped}
