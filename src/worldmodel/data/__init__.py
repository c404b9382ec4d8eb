"""Frame sources recorded once into a uint8 memory-mapped cache, and clip datasets over them.

Each source (`conf/data/<name>.yaml`) has `datasets() -> (train, val)` returning `ClipDataset`s
whose items are `{"video": (C, T, H, W) in [-1, 1], "actions": (T,), "mask": (T,)}`.
"""

from worldmodel.data.atari import AtariSource
from worldmodel.data.clips import BundledClipsSource, bundled_clips_folder
from worldmodel.data.dataset import ClipDataset
from worldmodel.data.images import ImageFolderSource
from worldmodel.data.procgen import PROCGEN_GAMES, ProcgenSource
from worldmodel.data.source import FolderSource, Source
from worldmodel.data.video_folder import VideoFolderSource

__all__ = [
    "PROCGEN_GAMES",
    "AtariSource",
    "BundledClipsSource",
    "ClipDataset",
    "FolderSource",
    "ImageFolderSource",
    "ProcgenSource",
    "Source",
    "VideoFolderSource",
    "bundled_clips_folder",
]
