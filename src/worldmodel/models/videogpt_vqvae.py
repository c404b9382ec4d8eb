"""VideoGPT's VQ-VAE: strided 3D convolutions, axial-attention residual blocks, an EMA codebook.

Encoder (Yan et al. 2021, "VideoGPT"): one strided 3D conv per 2x stage (kernel 4, stride 2 on
the axes still to be compressed: spatial x2..x8 and temporal x1/x2/x4 are independent), a 3x3x3
conv, then `num_res_blocks` attention residual blocks at the latent resolution and a 1x1x1 conv
to the codebook width. The decoder mirrors it with transposed 3D convs.

Attention residual block: x + [norm, ReLU, conv 3^3 (C/2), norm, ReLU, conv 1^3 (C), norm, ReLU,
axial attention]. Axial attention runs self-attention along T, along H and along W separately
(each position attends to its own row, column or time line only) and sums the three, so its cost
is O(THW (T + H + W)) instead of O((THW)^2). Before it, learned position embeddings are added:
one table per axis (T, H, W), broadcast over the other two axes and summed ("shared" space-time
embeddings: a W position has one embedding whatever its frame and row).

Quantization goes through the project's adapter (`models/quantize.py`): `kind: vq` with an EMA
codebook, k-means initialisation and dead-code restart, as VideoGPT trains it.

Differences from the paper, and why: GroupNorm instead of BatchNorm, so a clip's tokens never
depend on the rest of its batch (the pipeline tokenizes thousands of frames in arbitrary batches,
and DDP would need synchronised statistics). The convolutions are not causal: a clip of T frames
needs T % temporal_downsample == 0, and a latent frame sees its neighbours on both sides. With
`temporal_downsample: 1` the model can still serve as a per-frame tokenizer (the pipeline encodes
each frame alone, as a 1-frame clip); train it on `data.clip_length=1` then, so that it sees in
training what it sees there.

Shapes: video (B, C, T, H, W) in [-1, 1]; latents and codes (B, D, t, h, w) with
t = T / temporal_downsample, h = H / spatial_downsample; indices (B, t, h, w).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import DictConfig
from torch import Tensor, nn

from worldmodel.config import quantizer_problems, resolution
from worldmodel.metrics import psnr
from worldmodel.models.interfaces import Tokenizer
from worldmodel.models.losses import masked_mean
from worldmodel.models.quantize import build_quantizer
from worldmodel.models.st_transformer import Attention


def _groups(channels: int) -> int:
    for groups in (32, 16, 8, 4, 2):
        if channels % groups == 0 and channels // groups >= 2:
            return groups
    return 1


def _pair(value: int | list[int] | tuple[int, ...], key: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"{key} must be an int or [height, width], got {value!r}")
    return int(value[0]), int(value[1])


class SamePadConv3d(nn.Conv3d):
    """Conv3d with its zero padding applied by `F.pad` (VideoGPT's SamePadConv3d).

    With torch 2.14 on the CPU, a bf16 Conv3d that pads internally reads uninitialised memory
    for some shapes (e.g. 3 input channels and one frame: NaNs from the second call on); padding
    the input explicitly avoids that kernel path and gives the same result.
    """

    def __init__(self, c_in: int, c_out: int, kernel: Any, stride: Any = 1, bias: bool = True):
        super().__init__(c_in, c_out, kernel, stride, padding=0, bias=bias)
        # one zero on each side of every axis: kernel 4 / stride 2 halves it, kernel 3 keeps it,
        # kernel 1 gets no padding
        self.pads = tuple(p for k in reversed(self.kernel_size) for p in (int(k > 1),) * 2)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.pads))


class CropConvTranspose3d(nn.ConvTranspose3d):
    """ConvTranspose3d with padding 1 done as a crop of the unpadded output (same result); the
    bf16 CPU kernel with internal padding has the bug of `SamePadConv3d` in its backward."""

    def __init__(self, c_in: int, c_out: int, kernel: Any, stride: Any = 1):
        super().__init__(c_in, c_out, kernel, stride, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[:, :, 1:-1, 1:-1, 1:-1]  # (B, C, t, h, w) minus one per side


class AxisPositions(nn.Module):
    """Learned position embeddings of a (T, H, W) grid: one table per axis, summed.

    `forward(t, h, w)` returns (t, h, w, D) for the first t, h, w positions of each axis, so a
    model sized for a maximum grid also takes smaller ones (e.g. a single frame).
    """

    def __init__(self, dim: int, sizes: tuple[int, int, int]) -> None:
        super().__init__()
        self.sizes = tuple(int(s) for s in sizes)
        self.time = nn.Parameter(torch.zeros(self.sizes[0], dim))
        self.height = nn.Parameter(torch.zeros(self.sizes[1], dim))
        self.width = nn.Parameter(torch.zeros(self.sizes[2], dim))
        for table in (self.time, self.height, self.width):
            nn.init.trunc_normal_(table, std=0.02)

    def forward(self, t: int, h: int, w: int) -> Tensor:
        if t > self.sizes[0] or h > self.sizes[1] or w > self.sizes[2]:
            raise ValueError(
                f"grid (t, h, w)=({t}, {h}, {w}) exceeds the position embeddings' "
                f"{self.sizes} (set by max_frames and the resolution)"
            )
        return (
            self.time[:t, None, None] + self.height[None, :h, None] + self.width[None, None, :w]
        )  # (t, h, w, D)


class AxialAttention(nn.Module):
    """Self-attention along T, H and W separately on (B, C, T, H, W), summed (VideoGPT).

    Each axis has its own `Attention` (the project's multi-head attention over the second-to-last
    axis of (S, L, D)): the other two axes and the batch are folded into S, so a position only
    ever reads positions that share its other two coordinates.
    """

    def __init__(self, dim: int, heads: int, sizes: tuple[int, int, int]) -> None:
        super().__init__()
        self.pos = AxisPositions(dim, sizes)
        self.attn_t = Attention(dim, heads, qkv_bias=True)
        self.attn_h = Attention(dim, heads, qkv_bias=True)
        self.attn_w = Attention(dim, heads, qkv_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        b, _, t, h, w = x.shape
        x = rearrange(x, "b c t h w -> b t h w c") + self.pos(t, h, w).to(x.dtype)
        along_t = self.attn_t(rearrange(x, "b t h w c -> (b h w) t c"))  # lines along T
        along_h = self.attn_h(rearrange(x, "b t h w c -> (b t w) h c"))  # lines along H
        along_w = self.attn_w(rearrange(x, "b t h w c -> (b t h) w c"))  # lines along W
        out = (
            rearrange(along_t, "(b h w) t c -> b c t h w", b=b, h=h, w=w)
            + rearrange(along_h, "(b t w) h c -> b c t h w", b=b, t=t, w=w)
            + rearrange(along_w, "(b t h) w c -> b c t h w", b=b, t=t, h=h)
        )
        return out


class AttentionResidualBlock(nn.Module):
    """x + [GN, ReLU, conv3^3 -> C/2, GN, ReLU, conv1^3 -> C, GN, ReLU, axial attention](x)."""

    def __init__(self, channels: int, heads: int, sizes: tuple[int, int, int]) -> None:
        super().__init__()
        half = max(channels // 2, 1)
        self.block = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels),
            nn.ReLU(),
            SamePadConv3d(channels, half, 3, bias=False),
            nn.GroupNorm(_groups(half), half),
            nn.ReLU(),
            nn.Conv3d(half, channels, 1, bias=False),
            nn.GroupNorm(_groups(channels), channels),
            nn.ReLU(),
            AxialAttention(channels, heads, sizes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def _strides(spatial_stages: int, time_stages: int) -> list[tuple[int, int, int]]:
    """Per 2x stage, the (t, h, w) stride: every stage halves space until it is done, the first
    `time_stages` stages also halve time (as VideoGPT counts down its per-axis factors)."""
    n = max(spatial_stages, time_stages)
    return [
        (
            2 if i < time_stages else 1,
            2 if i < spatial_stages else 1,
            2 if i < spatial_stages else 1,
        )
        for i in range(n)
    ]


def _kernel(stride: tuple[int, int, int]) -> tuple[int, int, int]:
    # kernel 4 / stride 2 / padding 1 halves an axis exactly; kernel 3 / padding 1 keeps it
    return tuple(4 if s == 2 else 3 for s in stride)  # type: ignore[return-value]


class Encoder(nn.Module):
    def __init__(
        self,
        in_channels: int,
        channels: int,
        latent_dim: int,
        strides: list[tuple[int, int, int]],
        num_res_blocks: int,
        heads: int,
        sizes: tuple[int, int, int],
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for stride in strides:
            layers += [SamePadConv3d(c_in, channels, _kernel(stride), stride), nn.ReLU()]
            c_in = channels
        layers.append(SamePadConv3d(c_in, channels, 3))
        layers += [AttentionResidualBlock(channels, heads, sizes) for _ in range(num_res_blocks)]
        layers += [nn.GroupNorm(_groups(channels), channels), nn.ReLU()]
        layers.append(nn.Conv3d(channels, latent_dim, 1))  # VideoGPT's pre-VQ conv
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    def __init__(
        self,
        out_channels: int,
        channels: int,
        latent_dim: int,
        strides: list[tuple[int, int, int]],
        num_res_blocks: int,
        heads: int,
        sizes: tuple[int, int, int],
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(latent_dim, channels, 1)]  # the post-VQ conv
        layers += [AttentionResidualBlock(channels, heads, sizes) for _ in range(num_res_blocks)]
        layers += [nn.GroupNorm(_groups(channels), channels), nn.ReLU()]
        for i, stride in enumerate(reversed(strides)):
            last = i == len(strides) - 1
            c_out = out_channels if last else channels
            layers.append(CropConvTranspose3d(channels, c_out, _kernel(stride), stride))
            if not last:
                layers.append(nn.ReLU())
        if not strides:  # no up-sampling stage: a plain conv back to pixels
            layers.append(SamePadConv3d(channels, out_channels, 3))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class VideoGPTVQVAE(nn.Module, Tokenizer):
    """VideoGPT's VQ-VAE with the same API as `VideoTokenizer` (encode, decode, tokenize,
    detokenize, reconstruct, codebook_size, loss).

    Sizes: `channels` (the hidden width, VideoGPT: 240), `num_res_blocks` attention residual
    blocks in the encoder and in the decoder (VideoGPT: 4), `heads` per axial attention,
    `spatial_downsample` 2 | 4 | 8 and `temporal_downsample` 1 | 2 | 4, `resolution` and
    `max_frames` size the position embeddings of the latent grid (smaller inputs are fine).
    `quantizer`: a `build_quantizer` config; VideoGPT's is `{kind: vq, codebook_size: 1024}` with
    an EMA codebook (the default here). Loss: `l2_weight` * MSE (VideoGPT's reconstruction loss,
    in units of the data variance of [-1, 1] pixels) + `quantizer_weight` * commitment.
    """

    causal = False  # a latent frame reads the pixel frames on both sides of it

    @staticmethod
    def check_config(model: DictConfig, data: DictConfig, ev: DictConfig) -> list[str]:
        """What `validate` reports about a config of this VQ-VAE, naming the keys. It is not
        causal: clips split into whole groups of temporal_downsample frames."""
        errors: list[str] = []
        s = int(model.get("spatial_downsample", 4))
        t = int(model.get("temporal_downsample", 4))
        if s not in (2, 4, 8):
            errors.append(f"model.spatial_downsample={s}: expected 2, 4 or 8")
        if t not in (1, 2, 4):
            errors.append(f"model.temporal_downsample={t}: expected 1, 2 or 4")
        res = resolution(data)
        if res is not None and s >= 1 and any(r % s for r in res):
            errors.append(
                f"data.resolution={list(res)} is not divisible by model.spatial_downsample={s}"
            )
        if res is not None and resolution(model) != res:
            errors.append(
                f"model.resolution={model.get('resolution')} must equal data.resolution="
                f"{list(res)} (it sizes the latent position embeddings)"
            )
        clip = data.get("clip_length")
        if clip is not None and t >= 1 and int(clip) % t:
            errors.append(
                f"data.clip_length={clip} is not a multiple of model.temporal_downsample={t}"
            )
        if clip is not None and int(clip) > int(model.get("max_frames", 16)):
            errors.append(f"data.clip_length={clip} exceeds model.max_frames={model.max_frames}")
        if int(model.get("channels", 240)) % int(model.get("heads", 2)):
            errors.append(f"model.channels={model.channels} is not divisible by model.heads")
        if "quantizer" in model:
            errors.extend(quantizer_problems(model.quantizer))
        return errors

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 240,
        spatial_downsample: int = 4,
        temporal_downsample: int = 4,
        num_res_blocks: int = 4,
        heads: int = 2,
        resolution: int | list[int] = 64,
        max_frames: int = 16,
        latent_dim: int = 256,
        quantizer: dict[str, Any] | None = None,
        l2_weight: float = 1.0,
        quantizer_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if spatial_downsample not in (2, 4, 8):
            raise ValueError(f"spatial_downsample must be 2, 4 or 8, got {spatial_downsample}")
        if temporal_downsample not in (1, 2, 4):
            raise ValueError(f"temporal_downsample must be 1, 2 or 4, got {temporal_downsample}")
        if channels < 2 or channels % heads:
            raise ValueError(f"channels={channels} must be >= 2 and divisible by heads={heads}")
        height, width = _pair(resolution, "resolution")
        if height % spatial_downsample or width % spatial_downsample:
            raise ValueError(
                f"resolution={[height, width]} is not divisible by "
                f"spatial_downsample={spatial_downsample}"
            )
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        quantizer = dict(
            quantizer
            or {
                "kind": "vq",
                "codebook_size": 1024,
                "decay": 0.99,
                "kmeans_init": True,
                "threshold_ema_dead_code": 2,
                "rotation_trick": False,
                "commitment_weight": 0.25,
            }
        )
        kind = quantizer.pop("kind", "vq")
        self.quantizer = build_quantizer(kind, latent_dim, **quantizer)
        self.spatial_downsample = spatial_downsample
        self.temporal_downsample = temporal_downsample
        self.max_frames = max_frames
        sizes = (
            max(1, max_frames // temporal_downsample),
            height // spatial_downsample,
            width // spatial_downsample,
        )
        strides = _strides(int(math.log2(spatial_downsample)), int(math.log2(temporal_downsample)))
        args = (channels, latent_dim, strides, num_res_blocks, heads, sizes)
        self.encoder = Encoder(in_channels, *args)
        self.decoder = Decoder(in_channels, *args)
        self.l2_weight = l2_weight
        self.quantizer_weight = quantizer_weight

    # ----------------------------------------------------------------------------- shapes
    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def max_latent_frames(self) -> int:
        """Latent frames a clip may have (max_frames counts pixel frames)."""
        return max(1, self.max_frames // self.temporal_downsample)

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int]:
        """(t, h, w) of the token grid for a clip of T frames of H x W pixels."""
        self._check_shape(T, H, W)
        s = self.spatial_downsample
        return T // self.temporal_downsample, H // s, W // s

    def tokens_per_frame(self, H: int, W: int) -> int:
        return (H // self.spatial_downsample) * (W // self.spatial_downsample)

    def _check_shape(self, T: int, H: int, W: int) -> None:
        k, s = self.temporal_downsample, self.spatial_downsample
        if T % k:
            raise ValueError(f"temporal_downsample={k} needs T % {k} == 0; got T={T}")
        if H % s or W % s:
            raise ValueError(f"spatial_downsample={s} must divide the frame size {H}x{W}")

    # ----------------------------------------------------------------------------- API
    def encode(self, video: Tensor) -> Tensor:
        """video (B, C, T, H, W) -> pre-quantization latents z (B, D, t, h, w)."""
        self._check_shape(*video.shape[2:])
        return self.encoder(video)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """z (B, D, t, h, w) -> (codes (B, D, t, h, w), indices (B, t, h, w), aux, stats)."""
        return self.quantizer(z)

    def decode(self, codes: Tensor) -> Tensor:
        """codes (B, D, t, h, w) -> video (B, C, T, H, W)."""
        return self.decoder(codes)

    def tokenize(self, video: Tensor) -> Tensor:
        """video (B, C, T, H, W) -> indices (B, t, h, w) long."""
        return self.quantize(self.encode(video))[1]

    def detokenize(self, indices: Tensor, previous: Tensor | None = None) -> Tensor:
        """indices (B, t, h, w) -> video (B, C, T, H, W)."""
        return self.decode(self.quantizer.indices_to_codes(indices))

    def reconstruct(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """video -> (video_hat (B, C, T, H, W), indices (B, t, h, w))."""
        codes, indices, _, _ = self.quantize(self.encode(video))
        return self.decode(codes), indices

    def forward(self, video: Tensor) -> tuple[Tensor, Tensor]:
        return self.reconstruct(video)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """MSE reconstruction + quantizer commitment; padding frames (mask False) left out."""
        video = batch["video"]
        codes, _, aux, stats = self.quantize(self.encode(video))
        video_hat = self.decode(codes)
        x = rearrange(video, "b c t h w -> (b t) c h w").float()
        x_hat = rearrange(video_hat, "b c t h w -> (b t) c h w").float()
        mask = batch.get("mask")
        weights = None if mask is None else mask.reshape(-1).to(x_hat.dtype)  # (B T,)
        mse = masked_mean(F.mse_loss(x_hat, x, reduction="none").flatten(1).mean(1), weights)
        rec = self.l2_weight * mse
        loss = rec + self.quantizer_weight * aux
        metrics = {
            "l2": mse.detach(),
            "rec_loss": rec.detach(),
            "quantizer_loss": aux.detach().float(),
            "psnr": masked_mean(psnr(x_hat.detach(), x, reduction="none"), weights),
            "codebook/usage": stats["usage"],
            "codebook/perplexity": stats["perplexity"],
        }
        return loss, metrics
