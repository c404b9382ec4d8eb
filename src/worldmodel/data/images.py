"""A folder of images (searched recursively) as one-frame episodes: clips of length 1.

Images are converted to RGB, cropped/resized like videos and split between train and val by a
hash of their relative path. Unreadable files are skipped with a warning and counted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from worldmodel.data.frames import resize_frames, split_by_hash
from worldmodel.data.shards import CacheWriter
from worldmodel.data.source import FolderSource

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class ImageFolderSource(FolderSource):
    """Single frames from a folder of images; `clip_length` must be 1.

    Args: those of `FolderSource`.
    """

    kind = "images"
    extensions = IMAGE_EXTENSIONS

    def __init__(
        self,
        root: str,
        folder: str,
        resolution: int | list[int] = 64,
        clip_length: int = 1,
        frame_stride: int = 1,
        clip_stride: int = 1,
        val_clip_stride: int | None = None,
        crop: str = "center",
        val_fraction: float = 0.1,
        name: str | None = None,
    ):
        if clip_length != 1:
            raise ValueError(f"an image folder gives one-frame clips; clip_length={clip_length}")
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

    def _load(self, path: Path) -> np.ndarray | None:
        from PIL import Image

        try:
            with Image.open(path) as image:
                frame = np.array(image.convert("RGB"))
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            log.warning("skipping unreadable image %s: %s", path, e)
            return None
        return resize_frames(frame[None], self.resolution, self.crop)

    def record(self, writer: CacheWriter) -> dict[str, Any]:
        keys = [self.relative(p) for p in self.files]
        train, val = split_by_hash(keys, self.val_fraction)
        skipped = []
        with self.progress(len(keys), "images") as bar:
            for split, indices in (("train", train), ("val", val)):
                for i in indices:
                    frame = self._load(self.files[i])
                    if frame is None:
                        skipped.append(keys[i])
                    else:
                        writer[split].add_episode(frame, file=keys[i])
                    bar.update(1)
        if len(skipped) == len(keys):
            raise ValueError(f"no readable image in {self.folder} ({len(skipped)} files skipped)")
        return {"num_actions": None, **self.skipped_summary(skipped)}
