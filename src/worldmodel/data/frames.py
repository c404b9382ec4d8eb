"""Helpers shared by the sources: resolution parsing, crop + resize, train/val splits."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

# the held random policy lived here before the recording policies had a module of their own
from worldmodel.data.policies import HeldRandomPolicy as HeldRandomPolicy

CROPS = ("center", "none")


def check_crop(crop: str) -> str:
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    return crop


def parse_resolution(resolution: int | Sequence[int]) -> tuple[int, int]:
    """`64` -> (64, 64); `[48, 64]` -> (48, 64) as (H, W)."""
    if isinstance(resolution, int):
        size = (resolution, resolution)
    else:
        size = tuple(int(r) for r in resolution)
        if len(size) != 2:
            raise ValueError(f"resolution must be an int or [H, W], got {resolution!r}")
    if min(size) < 1:
        raise ValueError(f"resolution must be positive, got {resolution!r}")
    return size


def center_crop_box(height: int, width: int, aspect: float) -> tuple[int, int, int, int]:
    """The largest centred (top, left, h, w) box of aspect ratio `aspect` = W / H."""
    if width / height > aspect:
        w = max(1, round(height * aspect))
        return 0, (width - w) // 2, height, w
    h = max(1, round(width / aspect))
    return (height - h) // 2, 0, h, width


def resize_frames(frames: np.ndarray, size: tuple[int, int], crop: str = "none") -> np.ndarray:
    """Crops (optionally) and resizes uint8 frames (N, H, W, C) to (N, *size, C), antialiased.

    `crop="center"` first cuts the largest centred window with the target aspect ratio, so
    nothing is stretched; `crop="none"` resizes the whole frame (the aspect ratio may change).
    """
    check_crop(crop)
    if frames.ndim != 4:
        raise ValueError(f"expected frames (N, H, W, C), got shape {frames.shape}")
    if crop == "center":
        top, left, h, w = center_crop_box(frames.shape[1], frames.shape[2], size[1] / size[0])
        frames = frames[:, top : top + h, left : left + w]
    if frames.shape[1:3] == tuple(size):
        return np.ascontiguousarray(frames)
    # (N, H, W, C) viewed as (N, C, H, W) is channels-last memory: torch's fast uint8 path.
    # bilinear + antialias averages over the footprint when shrinking (no aliasing of detail).
    frames = np.ascontiguousarray(frames)
    if not frames.flags.writeable:  # torch warns when wrapping read-only memory
        frames = frames.copy()
    x = rearrange(torch.from_numpy(frames), "n h w c -> n c h w")
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return rearrange(x, "n c h w -> n h w c").contiguous().numpy()


def hash_fraction(key: str) -> float:
    """A deterministic number in [0, 1) from a string (stable across runs and machines)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / float(1 << 48)


def split_by_hash(keys: Sequence[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """Indices of keys that go to (train, val): val when `hash_fraction(key) < val_fraction`.

    With at least two keys both splits are kept non-empty: the key with the smallest hash moves
    to val (or the largest to train) when the hash left one split empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    fractions = [hash_fraction(k) for k in keys]
    val = {i for i, f in enumerate(fractions) if f < val_fraction}
    if len(keys) >= 2 and val_fraction > 0:
        order = sorted(range(len(keys)), key=lambda i: fractions[i])
        if not val:
            val.add(order[0])
        if len(val) == len(keys):
            val.discard(order[-1])
    train = [i for i in range(len(keys)) if i not in val]
    return train, sorted(val)
