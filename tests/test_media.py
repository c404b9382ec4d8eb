"""Tests for media.py: files are written, decode back, and have the expected sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from worldmodel.media import (
    plot_confusion,
    plot_curve,
    save_gif,
    save_grid,
    save_mp4,
    side_by_side,
    to_uint8,
)


def _clip(c=3, t=5, h=16, w=16, seed=0) -> torch.Tensor:
    """(C, T, H, W) in [-1, 1] whose frames all differ (GIF writers merge equal frames)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c, t, h, w, generator=g) * 2 - 1


def test_to_uint8_range_and_rounding():
    torch.manual_seed(0)
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])
    torch.testing.assert_close(to_uint8(x), torch.tensor([0, 0, 128, 255, 255], dtype=torch.uint8))
    u = torch.randint(0, 256, (3, 4), dtype=torch.uint8)
    assert to_uint8(u) is u


def test_save_grid_layout(tmp_path):
    torch.manual_seed(0)
    target = torch.full((2, 3, 4, 8, 8), -1.0)  # black
    recon = torch.full((2, 3, 3, 8, 8), 1.0)  # white, one frame shorter
    path = save_grid([target, recon], tmp_path / "sub" / "grid.png", padding=2, scale=2)
    image = np.asarray(Image.open(path))
    # rows = 2 samples x 2 videos, columns = 4 frames, cells of 16 px with 2 px padding
    assert image.shape == (4 * 18 + 2, 4 * 18 + 2, 3)
    assert (image[2:18, 2:18] == 0).all()  # sample 0, target, frame 0 (black)
    assert (image[20:36, 2:18] == 255).all()  # sample 0, reconstruction, frame 0 (white)
    assert (image[38:54, 56:72] == 0).all()  # sample 1, target, frame 3
    with pytest.raises(ValueError):
        save_grid([target, recon[:1]], tmp_path / "bad.png")


def test_save_gif_float_and_uint8(tmp_path):
    torch.manual_seed(0)
    clip = _clip(t=5, h=16, w=16)
    path = save_gif(clip, tmp_path / "a.gif", fps=10, scale=4)
    with Image.open(path) as gif:
        assert gif.size == (64, 64)
        assert gif.n_frames == 5
        assert gif.info["duration"] == 100
    frames = torch.randint(0, 256, (3, 10, 12, 3), dtype=torch.uint8)
    path = save_gif(frames, tmp_path / "b.gif", fps=5)
    with Image.open(path) as gif:
        assert gif.size == (12, 10) and gif.n_frames == 3


def test_save_mp4_decodes_back(tmp_path):
    import av

    torch.manual_seed(0)
    clip = _clip(t=12, h=16, w=16)
    path = save_mp4(clip, tmp_path / "clip.mp4", fps=8, scale=4)
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 12
    assert frames[0].shape == (64, 64, 3)

    def upscaled(t: int) -> np.ndarray:
        frame = to_uint8(clip[:, t]).permute(1, 2, 0)  # (H, W, 3)
        return frame.repeat_interleave(4, 0).repeat_interleave(4, 1).numpy().astype(np.float32)

    # Content and order survive lossy coding: each frame is near its own input (~9 levels of
    # mean error measured) and far from another frame of the random clip (~80).
    for t in (0, 11):
        own = np.abs(frames[t].astype(np.float32) - upscaled(t)).mean()
        other = np.abs(frames[t].astype(np.float32) - upscaled((t + 1) % 12)).mean()
        assert own < 25 < 60 < other
    # Odd sizes are padded to even for yuv420p; grayscale is repeated to RGB.
    odd = torch.randint(0, 256, (4, 15, 17, 1), dtype=torch.uint8)
    with av.open(str(save_mp4(odd, tmp_path / "odd.mp4", fps=4))) as container:
        decoded = list(container.decode(video=0))
    assert len(decoded) == 4
    assert (decoded[0].height, decoded[0].width) == (16, 18)


def test_side_by_side_shapes():
    torch.manual_seed(0)
    a, b = torch.zeros(2, 3, 4, 8, 8), torch.ones(2, 3, 4, 8, 10)
    out = side_by_side(a, b, gap=2)
    assert out.shape == (2, 3, 4, 8, 20)
    assert (out[..., 8:10] == 1.0).all() and (out[..., :8] == 0).all()
    with pytest.raises(ValueError):
        side_by_side(a, torch.zeros(2, 3, 5, 8, 8))


def test_plots_written(tmp_path):
    torch.manual_seed(0)
    path = plot_curve(
        list(range(1, 6)),
        {"true actions": torch.linspace(30, 20, 5), "random actions": np.linspace(30, 15, 5)},
        tmp_path / "plots" / "psnr.png",
        title="rollout PSNR",
        yerr={"true actions": [0.5] * 5},
    )
    with Image.open(path) as image:
        assert image.size == (600, 420)  # 5 x 3.5 inches at 120 dpi
    conf = torch.tensor([[5, 1, 0], [0, 7, 2]])
    path = plot_confusion(conf, tmp_path / "confusion.png")
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100
    with pytest.raises(ValueError):
        plot_curve([1, 2], {"a": [1.0]}, tmp_path / "bad.png")
