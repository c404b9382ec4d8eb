"""Video decoding on PyAV (FFmpeg's libraries): open a file, probe it, read chosen frames as RGB.

Every source that reads video files (`video_folder`, `clips`, the video episodes of
`trajectories`) decodes through this module, so there is one place that knows the decoder.

Frame `i` is the i-th frame in presentation order, counted from 0, as FFmpeg's decoder returns
them. Frames are decoded front to back (no seeking): the sources read a video once, in order, so
a sequential pass is both the fastest and the exact way to reach every index. Only the frames
asked for are converted to RGB (`rgb24`, FFmpeg's default YUV->RGB conversion), which is where
skipping frames (resampling to a lower frame rate) saves time.

Decoding failures (not a video, no video stream, a truncated file, a stream that ends before the
frames asked for) raise `DecodeError` naming the file, so a caller can skip the file and say why.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

# FFmpeg picks the thread count (0 = as many as cores) and uses frame threading where the codec
# has it (h264 decodes several frames at once); "AUTO" = frame threading, else slice threading.
THREAD_TYPE = "AUTO"


class DecodeError(ValueError):
    """A video that cannot be opened or decoded; the message names the file and the cause."""


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` reads from a video's container, without decoding a frame.

    `num_frames` is the container's frame count, or the number of video packets when the
    container does not record one (Matroska/WebM); `fps` is the stream's average frame rate
    (None when the container has none).
    """

    num_frames: int
    fps: float | None
    height: int
    width: int


def _open(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise DecodeError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DecodeError(f"{path}: empty file")
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise DecodeError(f"{path}: cannot be opened as a video ({_first_line(e)})") from e
    if not container.streams.video:
        container.close()
        raise DecodeError(f"{path}: no video stream")
    return container


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def probe(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and size of the first video stream of `path`."""
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:  # not recorded by the container: count the stream's packets
            num_frames = sum(1 for packet in container.demux(stream) if packet.size)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        ctx = stream.codec_context
        return VideoInfo(num_frames, fps, int(ctx.height), int(ctx.width))
    except av.FFmpegError as e:
        raise DecodeError(f"{path}: cannot be read ({_first_line(e)})") from e
    finally:
        container.close()


def read_frames(
    path: str | Path, indices: Sequence[int] | np.ndarray, batch: int = 64
) -> Iterator[np.ndarray]:
    """Yields the frames of `path` at `indices` (non-decreasing), as uint8 RGB batches
    (n, H, W, 3) of at most `batch` frames, in the order asked.

    Decoding stops after the last index asked for. Raises `DecodeError` when the file cannot be
    decoded or its stream ends before an index asked for.
    """
    path = Path(path)
    wanted = np.asarray(indices, dtype=np.int64)  # (N,)
    if wanted.ndim != 1:
        raise ValueError(f"frame indices must be a 1-d sequence, got shape {wanted.shape}")
    if len(wanted) == 0:
        return
    if wanted[0] < 0 or np.any(np.diff(wanted) < 0):
        raise ValueError("frame indices must be non-negative and non-decreasing")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = THREAD_TYPE
        out: list[np.ndarray] = []
        k = 0  # next position in `wanted`
        index = -1
        try:
            for index, frame in enumerate(container.decode(stream)):
                if wanted[k] != index:
                    continue
                rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
                while k < len(wanted) and wanted[k] == index:
                    out.append(rgb)
                    k += 1
                    if len(out) == batch:
                        yield np.stack(out)  # (n, H, W, 3)
                        out = []
                if k == len(wanted):
                    break
        except av.FFmpegError as e:
            raise DecodeError(
                f"{path}: decoding failed at frame {index + 1} ({_first_line(e)})"
            ) from e
        if k < len(wanted):
            raise DecodeError(
                f"{path}: the video ended after {index + 1} frames; frame {int(wanted[k])} was "
                "asked for"
            )
        if out:
            yield np.stack(out)
    finally:
        container.close()


def read_video(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """Every frame of `path` (or its first `max_frames`) as one uint8 array (T, H, W, 3)."""
    count = probe(path).num_frames
    if max_frames is not None:
        count = min(count, int(max_frames))
    batches = list(read_frames(path, np.arange(count), batch=max(count, 1)))
    return np.concatenate(batches) if batches else np.zeros((0, 0, 0, 3), dtype=np.uint8)
