"""Media writers: PNG grids, GIF and MP4 clips, side-by-side videos and plots.

Float videos follow the batch convention, channels first and values in [-1, 1]:
(B, C, T, H, W) for batches, (C, T, H, W) for one clip. Files are written with Pillow (PNG,
GIF), PyAV (MP4) and matplotlib's object API with the Agg canvas (plots), so nothing touches a
display or pyplot's global state. Every writer creates the parent folder and returns the path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

PathLike = str | Path


def to_uint8(video: Tensor) -> Tensor:
    """Map floats in [-1, 1] to uint8 [0, 255] (rounded, clamped); any shape, same layout."""
    if video.dtype == torch.uint8:
        return video
    return ((video.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _frames_thwc(frames: Tensor | np.ndarray) -> np.ndarray:
    """Frames as a (T, H, W, 3) uint8 array.

    uint8 input is read as (T, H, W, C) (or (T, H, W)); float input as (C, T, H, W) in [-1, 1].
    Grayscale is repeated to RGB.
    """
    x = torch.as_tensor(frames).detach().cpu()
    if x.dtype == torch.uint8:
        if x.ndim == 3:
            x = x[..., None]  # (T, H, W) -> (T, H, W, 1)
        if x.ndim != 4:
            raise ValueError(f"uint8 frames must be (T, H, W, C), got {tuple(x.shape)}")
    else:
        if x.ndim != 4:
            raise ValueError(f"float frames must be (C, T, H, W), got {tuple(x.shape)}")
        x = rearrange(to_uint8(x), "C T H W -> T H W C")
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    if x.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[-1]}")
    return np.ascontiguousarray(x.numpy())


def _upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of (..., H, W, C) by an integer factor (keeps pixels crisp)."""
    if scale == 1:
        return frames
    if scale < 1 or int(scale) != scale:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    return frames.repeat(scale, axis=-3).repeat(scale, axis=-2)


def _prepare(path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def tile_frames(
    rows: Sequence[np.ndarray],
    padding: int = 2,
    scale: int = 1,
    pad_value: int = 255,
    border: bool = True,
) -> np.ndarray:
    """Rows of frames (T_i, H, W, 3) uint8 as one picture (R * (H*scale + padding) ...): frame t
    of row r in cell (r, t), `padding` pixels of `pad_value` between cells (and around them with
    `border`); rows shorter than the longest end in blank cells."""
    if not len(rows):
        raise ValueError("no rows to draw")
    h, w = rows[0].shape[1:3]
    hs, ws = h * scale, w * scale
    cols = max(len(r) for r in rows)
    edge = padding if border else 0
    canvas = np.full(
        (
            len(rows) * (hs + padding) - padding + 2 * edge,
            cols * (ws + padding) - padding + 2 * edge,
            3,
        ),
        pad_value,
        dtype=np.uint8,
    )
    for r, row in enumerate(rows):
        top = edge + r * (hs + padding)
        for t, frame in enumerate(_upscale(np.asarray(row), scale)):
            left = edge + t * (ws + padding)
            canvas[top : top + hs, left : left + ws] = frame
    return canvas


def save_grid(
    videos: Sequence[Tensor],
    path: PathLike,
    padding: int = 2,
    scale: int = 1,
    pad_value: int = 255,
) -> Path:
    """Write a PNG grid: one row per (sample, video), one column per frame.

    `videos` are (B, C, T, H, W) tensors in [-1, 1], e.g. [target, reconstruction]; for each
    sample b the rows are videos[0][b], videos[1][b], ... so originals sit directly above their
    reconstructions. Videos may differ in length (shorter rows end in blank cells), not in
    B, C, H or W. The image is (B * len(videos)) * (H*scale + padding) + padding pixels high
    and T * (W*scale + padding) + padding wide.
    """
    from PIL import Image

    if not videos:
        raise ValueError("no videos to draw")
    b, c, _, h, w = videos[0].shape
    for v in videos:
        if v.ndim != 5 or (v.shape[0], v.shape[1], v.shape[3], v.shape[4]) != (b, c, h, w):
            raise ValueError(
                f"videos must share B, C, H, W; got {[tuple(x.shape) for x in videos]}"
            )
    # one row of (T, H, W, 3) uint8 frames per (sample, video)
    frames = [_frames_thwc_batch(v) for v in videos]  # (B, T, H, W, 3) each
    canvas = tile_frames(
        [video[i] for i in range(b) for video in frames], padding, scale, pad_value, border=True
    )
    path = _prepare(path)
    Image.fromarray(canvas).save(path)
    return path


def _frames_thwc_batch(video: Tensor) -> np.ndarray:
    """(B, C, T, H, W) float in [-1, 1] -> (B, T, H, W, 3) uint8."""
    x = rearrange(to_uint8(video.detach().cpu()), "B C T H W -> B T H W C")
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, -1, 3)
    return np.ascontiguousarray(x.numpy())


def save_gif(
    frames: Tensor | np.ndarray, path: PathLike, fps: float = 10.0, scale: int = 1
) -> Path:
    """Write a looping GIF with Pillow.

    `frames`: (T, H, W, C) uint8 or (C, T, H, W) float in [-1, 1]; `scale` is an integer
    nearest-neighbour upscaling factor (64x64 frames are tiny on screen: 4 is a good choice).
    GIF stores delays in 1/100 s, so fps is rounded to that grid; Pillow merges identical
    consecutive frames into one longer frame, which plays the same.
    """
    from PIL import Image

    array = _upscale(_frames_thwc(frames), scale)
    images = [Image.fromarray(frame) for frame in array]
    path = _prepare(path)
    images[0].save(
        path,
        save_all=True,
        append_images=images[1:],
        duration=max(int(round(1000.0 / fps)), 10),
        loop=0,
    )
    return path


def save_mp4(
    frames: Tensor | np.ndarray, path: PathLike, fps: float = 10.0, scale: int = 1, crf: int = 18
) -> Path:
    """Write an H.264 MP4 (libx264, yuv420p) with PyAV, or MPEG-4 Part 2 if x264 is missing.

    `frames` as in `save_gif`. yuv420p needs even sizes: after the integer upscaling an odd
    height or width is padded by repeating the last row/column.
    """
    import av

    array = _upscale(_frames_thwc(frames), scale)
    pad_h, pad_w = array.shape[1] % 2, array.shape[2] % 2
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    _, height, width, _ = array.shape
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    path = _prepare(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        else:
            stream.bit_rate = 4_000_000
        for frame in array:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return path


def side_by_side(a: Tensor, b: Tensor, gap: int = 0, gap_value: float = 1.0) -> Tensor:
    """Concatenate two channels-first videos along width (the last axis).

    Works for (B, C, T, H, W), (C, T, H, W) or frames (..., H, W); all other axes must match.
    `gap` columns of `gap_value` (white for [-1, 1] floats) separate the two.
    """
    if a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} differ before width")
    parts = [a, b]
    if gap > 0:
        parts.insert(1, torch.full((*a.shape[:-1], gap), gap_value, dtype=a.dtype, device=a.device))
    return torch.cat(parts, dim=-1)


def _new_figure(figsize: tuple[float, float]):
    from matplotlib.figure import Figure

    # A bare Figure renders through the Agg canvas on savefig: no pyplot, no GUI backend.
    return Figure(figsize=figsize, layout="constrained")


def _to_list(values: Sequence[float] | Tensor | np.ndarray) -> list[float]:
    return [float(v) for v in torch.as_tensor(values).detach().cpu().flatten()]


def plot_curve(
    xs: Sequence[float] | Tensor | np.ndarray,
    ys: Mapping[str, Sequence[float] | Tensor | np.ndarray],
    path: PathLike,
    xlabel: str = "horizon (frames)",
    ylabel: str = "PSNR (dB)",
    title: str | None = None,
    yerr: Mapping[str, Sequence[float] | Tensor | np.ndarray] | None = None,
) -> Path:
    """Line plot of one or more curves over shared xs (e.g. rollout PSNR vs horizon), as PNG.

    `ys` maps a legend label to its values; `yerr` optionally maps some labels to error bars
    (e.g. the standard errors of `delta_psnr`).
    """
    x = _to_list(xs)
    fig = _new_figure((5.0, 3.5))
    ax = fig.subplots()
    for label, values in ys.items():
        y = _to_list(values)
        if len(y) != len(x):
            raise ValueError(f"curve {label!r} has {len(y)} points for {len(x)} xs")
        if yerr is not None and label in yerr:
            ax.errorbar(x, y, yerr=_to_list(yerr[label]), label=label, marker="o", capsize=3)
        else:
            ax.plot(x, y, label=label, marker="o")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(ys) > 1 or yerr:
        ax.legend()
    path = _prepare(path)
    fig.savefig(path, dpi=120)
    return path


def plot_confusion(
    matrix: Tensor | np.ndarray,
    path: PathLike,
    xlabel: str = "latent action",
    ylabel: str = "true action",
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Heat map of a count matrix (rows = y axis), with the counts written in small matrices."""
    counts = torch.as_tensor(matrix).detach().cpu().numpy()
    rows, cols = counts.shape
    fig = _new_figure((1.0 + 0.45 * cols + 1.5, 1.0 + 0.45 * rows))
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows), labels=list(row_labels) if row_labels else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if rows * cols <= 400:
        threshold = counts.max() / 2 if counts.size else 0
        for i in range(rows):
            for j in range(cols):
                value = counts[i, j]
                text = f"{value:g}" if np.issubdtype(counts.dtype, np.floating) else f"{value}"
                color = "white" if value > threshold else "black"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=7)
    path = _prepare(path)
    fig.savefig(path, dpi=120)
    return path
