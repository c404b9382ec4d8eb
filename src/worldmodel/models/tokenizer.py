"""MAGVIT-v2-style causal video tokenizer: a causal 3D CNN encoder and decoder around a quantizer.

Causality: every temporal kernel pads only the past (with copies of the first frame), and every
norm is per frame, so latent frame j depends only on input frames <= j * k (k = temporal
compression). The first frame is therefore encoded alone and an image (T = 1) and a video share
one latent space; with temporal compression k a clip of T frames needs (T - 1) % k == 0 (the first
frame alone, then groups of k).

Cost: activations are kept frame-major (B, T, C, H, W) so that per-frame layers see a free
((B T), C, H, W) view and run as 2D convolutions; a causal temporal conv stacks its kt past
frames on the channel axis and runs as one 2D conv too (equal to a Conv3d, ~kt times the cost).
The first layer is a pixel-unshuffle ("patchify") so nothing runs at full resolution; extra
2x down-sampling stages (pixel-unshuffle + 1x1 conv, or blur pooling + 3x3 conv) follow.
Temporal kernels are used in the blocks at the latent resolution, where they are cheap.
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
from worldmodel.models.interfaces import Tokenizer
from worldmodel.models.losses import (
    FrameDiscriminator,
    LPIPSLoss,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
    masked_mean,
    psnr_per_frame,
)
from worldmodel.models.quantize import build_quantizer


def channels_last(x: Tensor) -> Tensor:
    """Frame-major video (B, T, C, H, W) with each frame stored channels-last (NHWC).

    oneDNN convolutions run ~1.5-6x faster on NHWC than on NCHW here (bf16 most of all), and the
    layout survives the ((B T), C, H, W) views used by every per-frame layer.
    """
    return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, x.shape[:2])


def _groups(channels: int) -> int:
    for groups in (32, 16, 8, 4, 2):
        if channels % groups == 0 and channels // groups >= 2:
            return groups
    return 1


class FrameNorm(nn.Module):
    """Per-frame normalisation of (B, T, C, H, W); never across time (that would leak the future).

    `group`: GroupNorm over (C, H, W) of each frame. `layer`: LayerNorm over C at each pixel
    (ConvNeXt style), ~3-6x cheaper than GroupNorm on channels-last bf16 frames here.
    """

    def __init__(self, channels: int, kind: str = "group"):
        super().__init__()
        if kind not in ("group", "layer"):
            raise ValueError(f"norm must be 'group' or 'layer', got {kind!r}")
        self.kind, self.groups = kind, _groups(channels)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "layer":
            y = F.layer_norm(x.permute(0, 1, 3, 4, 2), x.shape[2:3], self.weight, self.bias)
            return y.permute(0, 1, 4, 2, 3)  # (B, T, H, W, C) view -> (B, T, C, H, W)
        y = F.group_norm(x.flatten(0, 1), self.groups, self.weight, self.bias)
        return y.unflatten(0, x.shape[:2])


class CausalConv(nn.Module):
    """Conv over frame-major video (B, T, C, H, W): spatial kernel k, causal temporal kernel kt.

    Output frame j sits at input frame j * stride and sees input frames j * stride - kt + 1 .. j *
    stride; the missing past is filled with copies of the first frame.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int = 3,
        temporal_kernel: int = 1,
        temporal_stride: int = 1,
    ):
        super().__init__()
        self.kt, self.stride = temporal_kernel, temporal_stride
        self.conv = nn.Conv2d(c_in * temporal_kernel, c_out, kernel_size, padding=kernel_size // 2)
        if temporal_kernel > 1:
            # Start close to a per-frame conv: the past taps begin small, the current one as usual.
            with torch.no_grad():
                w = self.conv.weight.unflatten(1, (temporal_kernel, c_in))
                w[:, :-1] *= 0.1

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.shape[:2]
        if self.kt == 1 and self.stride == 1:
            return self.conv(x.flatten(0, 1)).unflatten(0, (b, t))  # ((B T), C, H, W) view
        past = x[:, :1].expand(-1, self.kt - 1, -1, -1, -1)
        xp = torch.cat([past, x], 1)  # (B, kt - 1 + T, C, H, W)
        n_out = (t - 1) // self.stride + 1
        stop = (n_out - 1) * self.stride + 1
        # tap i of output j is padded frame j * stride + i; the last tap is the current frame
        taps = [xp[:, i : i + stop : self.stride] for i in range(self.kt)]
        # concatenate along the innermost (NHWC) axis so the frames stay channels-last
        taps = [tap.permute(0, 1, 3, 4, 2) for tap in taps]  # (B, T', H, W, C)
        xw = torch.cat(taps, -1).permute(0, 1, 4, 2, 3)  # (B, T', kt * C, H, W)
        return self.conv(xw.flatten(0, 1)).unflatten(0, (b, n_out))


class ResBlock(nn.Module):
    """Pre-norm residual block: (norm, SiLU, conv) x 2 plus a 1x1 skip when widths differ."""

    def __init__(self, c_in: int, c_out: int, temporal_kernel: int = 1, norm: str = "group"):
        super().__init__()
        self.norm1 = FrameNorm(c_in, norm)
        self.conv1 = CausalConv(c_in, c_out, 3, temporal_kernel)
        self.norm2 = FrameNorm(c_out, norm)
        self.conv2 = CausalConv(c_out, c_out, 3, temporal_kernel)
        self.skip = CausalConv(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        # Residual branches start near zero so the deep stack begins close to identity.
        with torch.no_grad():
            self.conv2.conv.weight.mul_(0.1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SpaceToDepth(nn.Module):
    """Pixel-unshuffle by `factor` on each frame: (B, T, C, H, W) -> (B, T, C f^2, H/f, W/f)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        if self.factor == 1:
            return x
        return F.pixel_unshuffle(x.flatten(0, 1), self.factor).unflatten(0, x.shape[:2])


class DepthToSpace(SpaceToDepth):
    """Pixel-shuffle by `factor` on each frame: (B, T, C f^2, H, W) -> (B, T, C, H f, W f)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.factor == 1:
            return x
        return F.pixel_shuffle(x.flatten(0, 1), self.factor).unflatten(0, x.shape[:2])


class BlurPool(nn.Module):
    """Anti-aliased 2x down-sampling of each frame: [1, 2, 1]^2 / 16 depthwise blur, stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16.0
        self.register_buffer("kernel", k.expand(channels, 1, 3, 3).contiguous(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        f = F.pad(x.flatten(0, 1), (1, 1, 1, 1), mode="reflect")  # ((B T), C, H + 2, W + 2)
        f = F.conv2d(f, self.kernel.to(f.dtype), stride=2, groups=f.shape[1])
        return f.unflatten(0, x.shape[:2])


class Downsample(nn.Module):
    """2x spatial down-sampling: blur pool + 3x3 conv, or pixel-unshuffle + 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, blur_pool: bool):
        super().__init__()
        if blur_pool:
            self.pool, self.conv = BlurPool(c_in), CausalConv(c_in, c_out, 3)
        else:
            self.pool, self.conv = SpaceToDepth(2), CausalConv(4 * c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.pool(x))


class Upsample(nn.Module):
    """2x spatial up-sampling: 1x1 conv to 4 c_out channels, then pixel-shuffle."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = CausalConv(c_in, 4 * c_out, 1)
        # Same weights for the four sub-pixels at init: starts as nearest up-sampling, no checkers.
        with torch.no_grad():
            w = self.conv.conv.weight.unflatten(0, (c_out, 4))
            w.copy_(w[:, :1].expand_as(w))
        self.shuffle = DepthToSpace(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(self.conv(x))


class TimeDownsample(nn.Module):
    """2x causal temporal compression: latent j sees frames 2j - kt + 1 .. 2j, kt = max(2,
    temporal_kernel); with kt = 2 that is exactly the first frame alone, then pairs."""

    def __init__(self, channels: int, temporal_kernel: int):
        super().__init__()
        self.conv = CausalConv(channels, channels, 3, max(temporal_kernel, 2), temporal_stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class TimeUpsample(nn.Module):
    """2x causal temporal expansion (depth-to-time): T latents -> 2T - 1 frames."""

    def __init__(self, channels: int, temporal_kernel: int):
        super().__init__()
        self.conv = CausalConv(channels, 2 * channels, 3, temporal_kernel)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)  # (B, T, 2 C, H, W)
        y = rearrange(y, "b t (k c) h w -> b (t k) c h w", k=2)  # (B, 2 T, C, H, W)
        # latent 0 is the first frame alone: drop the frame generated before it
        return channels_last(y[:, 1:])


class Encoder(nn.Module):
    def __init__(
        self,
        in_channels: int,
        channels: list[int],
        patch: int,
        num_res_blocks: int,
        num_mid_blocks: int,
        latent_dim: int,
        temporal_kernel: int,
        time_downsamples: int,
        blur_pool: bool,
        norm: str,
    ):
        super().__init__()
        layers: list[nn.Module] = [
            SpaceToDepth(patch),
            CausalConv(in_channels * patch * patch, channels[0], 3),
        ]
        for i, width in enumerate(channels):
            layers += [ResBlock(width, width, 1, norm) for _ in range(num_res_blocks)]
            if i + 1 < len(channels):
                layers.append(Downsample(width, channels[i + 1], blur_pool))
        top = channels[-1]
        layers += [TimeDownsample(top, temporal_kernel) for _ in range(time_downsamples)]
        layers += [ResBlock(top, top, temporal_kernel, norm) for _ in range(num_mid_blocks)]
        layers += [FrameNorm(top, norm), nn.SiLU(), CausalConv(top, latent_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    def __init__(
        self,
        out_channels: int,
        channels: list[int],
        patch: int,
        num_res_blocks: int,
        num_mid_blocks: int,
        latent_dim: int,
        temporal_kernel: int,
        time_upsamples: int,
        norm: str,
    ):
        super().__init__()
        top = channels[-1]
        layers: list[nn.Module] = [CausalConv(latent_dim, top, 3, temporal_kernel)]
        layers += [ResBlock(top, top, temporal_kernel, norm) for _ in range(num_mid_blocks)]
        layers += [TimeUpsample(top, temporal_kernel) for _ in range(time_upsamples)]
        for i in reversed(range(len(channels))):
            layers += [ResBlock(channels[i], channels[i], 1, norm) for _ in range(num_res_blocks)]
            if i > 0:
                layers.append(Upsample(channels[i], channels[i - 1]))
        self.conv_out = CausalConv(channels[0], out_channels * patch * patch, 3)
        layers += [FrameNorm(channels[0], norm), nn.SiLU(), self.conv_out, DepthToSpace(patch)]
        self.layers = nn.Sequential(*layers)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the last conv, where the GAN's adaptive weight compares gradient norms."""
        return self.conv_out.conv.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class PreviousFrameRefiner(nn.Module):
    """Decodes a frame from its tokens' coarse decoding AND the frame before it.

    Per-frame tokens at 8x8 per 64x64 frame lose the fine detail the previous frame still has
    (the background, the sprites that did not move): a small U-shaped CNN over the coarse frame
    and the previous frame adds that detail back as a residual. Its output layer starts at zero,
    so a fresh refiner returns the coarse frame. Tokens stay per-frame (caches, world models and
    their vocabularies are unchanged); only decoding reads the previous frame.
    """

    def __init__(self, channels: int = 3, width: int = 48, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Conv2d(2 * channels, width, 3, padding=1)
        self.down = nn.Conv2d(width, width, 4, stride=2, padding=1)
        self.mid = nn.Sequential(
            *[nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.SiLU()) for _ in range(depth)]
        )
        self.up = nn.ConvTranspose2d(width, width, 4, stride=2, padding=1)
        self.out = nn.Conv2d(2 * width, channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, coarse: Tensor, previous: Tensor) -> Tensor:
        """coarse, previous (N, C, H, W) -> the refined frame (N, C, H, W)."""
        h = F.silu(self.inp(torch.cat([coarse, previous.to(coarse.dtype)], dim=1)))  # full res
        m = self.up(self.mid(F.silu(self.down(h))))  # half res: motion of a few pixels
        return coarse + self.out(torch.cat([h, m], dim=1))


class VideoTokenizer(nn.Module, Tokenizer):
    """Causal 3D-CNN video tokenizer (MAGVIT-v2 style) with a pluggable quantizer.

    Shapes: video (B, C, T, H, W) in [-1, 1]; latents z and codes (B, D, t, h, w) with
    t = 1 + (T - 1) / temporal_downsample, h = H / spatial_downsample; indices (B, t, h, w).

    Sizes: `channels` lists the width of each resolution level; the stem patchifies by
    spatial_downsample / 2^(levels - 1) and each further level is a 2x stage. `num_res_blocks`
    blocks run per level, `num_mid_blocks` (encoder) and `decoder_mid_blocks` at the latent
    resolution, where `temporal_kernel` > 1 makes them causal 3D convs. `quantizer` is
    `{kind: fsq | lfq | vq | rvq, ...}` (see `build_quantizer`). Losses: `l1_weight`,
    `l2_weight`, `quantizer_weight`, `lpips_weight` (+ `lpips_weights_path`), `gan_weight`
    (+ `gan_start_step`; builds `self.discriminator`, which the loop steps with its own
    optimizer through `discriminator_loss`).
    """

    @classmethod
    def check_config(cls, model: DictConfig, data: DictConfig, ev: DictConfig) -> list[str]:
        """What `validate` reports about a config of this tokenizer, naming the keys: the
        down-sampling factors, the frame size and clip length they must divide, the quantizer."""
        errors: list[str] = []
        s = int(model.get("spatial_downsample", 1))
        t = int(model.get("temporal_downsample", 1))
        if s < 1 or s & (s - 1):
            errors.append(f"model.spatial_downsample={s}: expected a power of two")
        if t not in (1, 2, 4, 8):
            errors.append(f"model.temporal_downsample={t}: expected 1, 2, 4 or 8")
        res = resolution(data)
        if res is not None and s >= 1 and any(r % s for r in res):
            errors.append(
                f"data.resolution={list(res)} is not divisible by model.spatial_downsample={s}"
            )
        # training clips and the clips task=eval scores (eval.clip_length) both split into
        # latent frames: the first frame alone, then groups of t
        clips = [("data.clip_length", data.get("clip_length"))]
        if ev is not None:
            clips.append(("eval.clip_length", ev.get("clip_length")))
        for key, clip in clips:
            if clip is not None and t > 1 and (int(clip) - 1) % t:
                errors.append(
                    f"{key}={clip} does not fit model.temporal_downsample={t}: the first "
                    f"frame is encoded alone, so {key} - 1 must be a multiple of {t}"
                )
        if "quantizer" in model:
            errors.extend(quantizer_problems(model.quantizer))
        return errors

    def __init__(
        self,
        in_channels: int = 3,
        channels: list[int] | tuple[int, ...] = (96,),
        spatial_downsample: int = 4,
        temporal_downsample: int = 1,
        num_res_blocks: int = 0,
        num_mid_blocks: int = 2,
        decoder_res_blocks: int | None = None,
        decoder_mid_blocks: int | None = 4,
        temporal_kernel: int = 1,
        blur_pool: bool = False,
        norm: str = "layer",
        latent_dim: int | None = None,
        quantizer: dict[str, Any] | None = None,
        l1_weight: float = 0.0,
        l2_weight: float = 1.0,
        quantizer_weight: float = 1.0,
        lpips_weight: float = 0.0,
        lpips_weights_path: str | None = None,
        lpips_random_backbone: bool = False,
        gan_weight: float = 0.0,
        gan_start_step: int = 0,
        disc_channels: int = 64,
        disc_layers: int = 3,
        refiner_width: int = 0,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels}")
        if spatial_downsample not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"spatial_downsample must be a power of 2, got {spatial_downsample}")
        stages = len(channels) - 1
        patch = spatial_downsample // 2**stages
        if patch < 1:
            raise ValueError(
                f"channels has {len(channels)} levels (= {stages} 2x stages) but "
                f"spatial_downsample is only {spatial_downsample}; use fewer levels"
            )
        if temporal_downsample not in (1, 2, 4, 8):
            raise ValueError(f"temporal_downsample must be 1, 2, 4 or 8, got {temporal_downsample}")
        if temporal_kernel < 1:
            raise ValueError(f"temporal_kernel must be >= 1, got {temporal_kernel}")

        quantizer = dict(quantizer or {"kind": "fsq", "levels": [8, 8, 8, 5, 5, 5]})
        kind = quantizer.pop("kind", None)
        if latent_dim is None:  # the quantizer's own width: no projection layers needed
            if kind == "fsq":
                latent_dim = len(quantizer.get("levels") or [0])
            elif kind == "lfq":
                latent_dim = int(math.log2(max(int(quantizer.get("codebook_size", 2)), 2)))
            else:
                latent_dim = int(quantizer.get("codebook_dim", 16))
        self.quantizer = build_quantizer(kind, latent_dim, **quantizer)

        self.spatial_downsample = spatial_downsample
        self.temporal_downsample = temporal_downsample
        time_stages = int(math.log2(temporal_downsample))
        self.encoder = Encoder(
            in_channels,
            channels,
            patch,
            num_res_blocks,
            num_mid_blocks,
            latent_dim,
            temporal_kernel,
            time_stages,
            blur_pool,
            norm,
        )
        self.decoder = Decoder(
            in_channels,
            channels,
            patch,
            num_res_blocks if decoder_res_blocks is None else decoder_res_blocks,
            num_mid_blocks if decoder_mid_blocks is None else decoder_mid_blocks,
            latent_dim,
            temporal_kernel,
            time_stages,
            norm,
        )

        # decoding with the previous frame (`detokenize(..., previous=)`); 0 = per-frame only
        self.refiner = PreviousFrameRefiner(in_channels, refiner_width) if refiner_width else None
        self.init_losses(
            in_channels,
            l1_weight,
            l2_weight,
            quantizer_weight,
            lpips_weight,
            lpips_weights_path,
            lpips_random_backbone,
            gan_weight,
            gan_start_step,
            disc_channels,
            disc_layers,
        )

    def init_losses(
        self,
        in_channels: int,
        l1_weight: float,
        l2_weight: float,
        quantizer_weight: float,
        lpips_weight: float,
        lpips_weights_path: str | None,
        lpips_random_backbone: bool,
        gan_weight: float,
        gan_start_step: int,
        disc_channels: int,
        disc_layers: int,
    ) -> None:
        """The loss weights and modules every tokenizer built on this class trains with."""
        self.l1_weight, self.l2_weight = l1_weight, l2_weight
        self.quantizer_weight = quantizer_weight
        self.lpips_weight = lpips_weight
        # Built only when used: the VGG trunk is large and needs weights from disk.
        self.lpips = (
            LPIPSLoss(lpips_weights_path, "model.lpips_weights_path", lpips_random_backbone)
            if lpips_weight > 0
            else None
        )
        self.gan_weight, self.gan_start_step = gan_weight, gan_start_step
        # The discriminator exists only when the GAN is on; the loop gives it its own optimizer.
        self.discriminator = (
            FrameDiscriminator(in_channels, disc_channels, disc_layers) if gan_weight > 0 else None
        )
        self._disc_cache: tuple[Tensor, Tensor] | None = None

    # ----------------------------------------------------------------------------- shapes
    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int]:
        """(t, h, w) of the token grid for a clip of T frames of H x W pixels."""
        self._check_shape(T, H, W)
        s = self.spatial_downsample
        return 1 + (T - 1) // self.temporal_downsample, H // s, W // s

    def tokens_per_frame(self, H: int, W: int) -> int:
        return (H // self.spatial_downsample) * (W // self.spatial_downsample)

    def _check_shape(self, T: int, H: int, W: int) -> None:
        k, s = self.temporal_downsample, self.spatial_downsample
        if (T - 1) % k != 0:
            raise ValueError(
                f"temporal_downsample={k} needs (T - 1) % {k} == 0 (first frame alone, then "
                f"groups of {k}); got T={T}"
            )
        if H % s or W % s:
            raise ValueError(f"spatial_downsample={s} must divide the frame size {H}x{W}")

    # ----------------------------------------------------------------------------- API
    def encode(self, video: Tensor) -> Tensor:
        """video (B, C, T, H, W) -> pre-quantization latents z (B, D, t, h, w)."""
        self._check_shape(*video.shape[2:])
        x = channels_last(rearrange(video, "b c t h w -> b t c h w"))  # frame-major, NHWC frames
        z = self.encoder(x)  # (B, t, D, h, w)
        return rearrange(z, "b t d h w -> b d t h w")

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """z (B, D, t, h, w) -> (codes (B, D, t, h, w), indices (B, t, h, w), aux, stats)."""
        return self.quantizer(z)

    def decode(self, codes: Tensor) -> Tensor:
        """codes (B, D, t, h, w) -> video (B, C, T, H, W)."""
        x = self.decoder(
            channels_last(rearrange(codes, "b d t h w -> b t d h w"))
        )  # (B, T, C, H, W)
        return rearrange(x, "b t c h w -> b c t h w")

    def tokenize(self, video: Tensor) -> Tensor:
        """video (B, C, T, H, W) -> indices (B, t, h, w) long."""
        return self.quantize(self.encode(video))[1]

    def detokenize(self, indices: Tensor, previous: Tensor | None = None) -> Tensor:
        """indices (B, t, h, w) -> video (B, C, T, H, W). With a refiner and `previous` (B, C,
        H, W), the frame before the clip, frames are refined one after the other, each from the
        one decoded before it (as a rollout decodes)."""
        codes = self.quantizer.indices_to_codes(indices)  # (B, D, t, h, w)
        coarse = self.decode(codes)
        if self.refiner is None or previous is None:
            return coarse
        frames = []
        for t in range(coarse.shape[2]):
            previous = self.refiner(coarse[:, :, t], previous)  # (B, C, H, W)
            frames.append(previous)
        return torch.stack(frames, dim=2)

    @property
    def refines(self) -> bool:
        return self.refiner is not None

    def refine(self, coarse: Tensor, previous: Tensor) -> Tensor:
        """Teacher-forced refinement: coarse frames (B, C, T, H, W), each with its own previous
        frame in `previous` (B, C, T, H, W). Without a refiner, the coarse frames."""
        if self.refiner is None:
            return coarse
        b = coarse.shape[0]
        fine = self.refiner(
            rearrange(coarse, "b c t h w -> (b t) c h w"),
            rearrange(previous, "b c t h w -> (b t) c h w"),
        )
        return rearrange(fine, "(b t) c h w -> b c t h w", b=b)

    def reconstruct(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """video -> (video_hat (B, C, T, H, W), indices (B, t, h, w))."""
        codes, indices, _, _ = self.quantize(self.encode(video))
        return self.decode(codes), indices

    def forward(self, video: Tensor) -> tuple[Tensor, Tensor]:
        return self.reconstruct(video)

    # ----------------------------------------------------------------------------- losses
    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.gan_start_step

    def loss(self, batch: dict[str, Tensor], step: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """Generator loss: reconstruction (+ LPIPS) + quantizer aux (+ adaptive hinge GAN).

        Padding frames (mask False) are left out of every term. When the GAN is on, the
        detached reconstruction is cached for the `discriminator_loss` call on the same batch.
        """
        video = batch["video"]
        z = self.encode(video)
        codes, _, aux, stats = self.quantize(z)
        video_hat = self.decode(codes)

        x = rearrange(video, "b c t h w -> (b t) c h w")
        x_hat = rearrange(video_hat, "b c t h w -> (b t) c h w").float()
        mask = batch.get("mask")
        w = None if mask is None else mask.reshape(-1).to(x_hat.dtype)  # (B T,)

        diff = x_hat - x.float()
        l1 = masked_mean(diff.abs().flatten(1).mean(1), w)
        l2 = masked_mean(diff.pow(2).flatten(1).mean(1), w)
        nll = self.l1_weight * l1 + self.l2_weight * l2
        metrics: dict[str, Tensor] = {"l1": l1.detach(), "l2": l2.detach()}
        if self.lpips is not None:
            perceptual = masked_mean(self.lpips(x_hat, x.float()).float(), w)
            nll = nll + self.lpips_weight * perceptual
            metrics["lpips"] = perceptual.detach()
        loss = nll + self.quantizer_weight * aux
        if self.refiner is not None and video.shape[2] > 1:
            # frames 1.. decoded with the real frame before each (the coarse frames' gradient
            # is stopped: the refiner adds detail and must not pull the codes)
            fine = self.refine(video_hat[:, :, 1:].detach(), video[:, :, :-1]).float()
            err = (fine - video[:, :, 1:].float()).pow(2).flatten(3).mean(3).mean(1)  # (B, T-1)
            wr = None if mask is None else mask[:, 1:].reshape(-1).to(err.dtype)
            refine_l2 = masked_mean(err.reshape(-1), wr)
            loss = loss + self.l2_weight * refine_l2
            metrics["refine_l2"] = refine_l2.detach()
            metrics["psnr_refined"] = masked_mean(
                psnr_per_frame(
                    rearrange(fine.detach(), "b c t h w -> (b t) c h w"),
                    rearrange(video[:, :, 1:], "b c t h w -> (b t) c h w"),
                ),
                wr,
            )

        if self.discriminator is not None:
            if self.training:  # validation batches are never followed by a discriminator step
                self._disc_cache = (video, video_hat.detach())
            if self.gan_active(step):
                fake = x_hat if w is None else x_hat[w > 0]
                g_loss = hinge_g_loss(self._discriminate(fake, track_params=False))
                if torch.is_grad_enabled() and nll.requires_grad:
                    d_weight = adaptive_gan_weight(nll, g_loss, self.decoder.last_layer)
                else:
                    d_weight = torch.ones((), device=x.device)
                loss = loss + self.gan_weight * d_weight * g_loss
                metrics["gan/g_loss"] = g_loss.detach()
                metrics["gan/d_weight"] = d_weight.detach()

        metrics.update(
            {
                "rec_loss": nll.detach(),
                "quantizer_loss": aux.detach().float(),
                "psnr": masked_mean(psnr_per_frame(x_hat.detach(), x), w),
                "codebook/usage": stats["usage"],
                "codebook/perplexity": stats["perplexity"],
            }
        )
        return loss, metrics

    def _discriminate(self, frames: Tensor, track_params: bool) -> Tensor:
        """Discriminator logits; with track_params=False no gradient reaches its parameters
        (the generator's loss must not move or accumulate into the discriminator)."""
        assert self.discriminator is not None
        if track_params:
            return self.discriminator(frames)
        params = list(self.discriminator.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            return self.discriminator(frames)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)

    def discriminator_loss(
        self, batch: dict[str, Tensor], step: int | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge loss of the frame discriminator; gradients reach only `self.discriminator`.

        Reuses the detached reconstruction cached by the last `loss` call when it was made on
        this very batch tensor (no second tokenizer pass); otherwise reconstructs it under
        no_grad. With `step` given and below `gan_start_step` it returns a zero loss that still
        backpropagates (to zero gradients), so the loop needs no special case.
        """
        if self.discriminator is None:
            raise RuntimeError("discriminator_loss needs gan_weight > 0 (no discriminator built)")
        if step is not None and step < self.gan_start_step:
            zero = sum(p.sum() for p in self.discriminator.parameters()) * 0.0
            return zero, {"gan/d_loss": zero.detach()}
        video = batch["video"]
        if self._disc_cache is not None and self._disc_cache[0] is video:
            video_hat = self._disc_cache[1]
        else:
            with torch.no_grad():
                video_hat = self.reconstruct(video)[0]
        self._disc_cache = None
        real = rearrange(video, "b c t h w -> (b t) c h w")
        fake = rearrange(video_hat, "b c t h w -> (b t) c h w").detach().to(real.dtype)
        mask = batch.get("mask")
        if mask is not None:
            keep = mask.reshape(-1)
            real, fake = real[keep], fake[keep]
        logits_real = self._discriminate(real, track_params=True)
        logits_fake = self._discriminate(fake, track_params=True)
        d_loss = hinge_d_loss(logits_real, logits_fake)
        return d_loss, {
            "gan/d_loss": d_loss.detach(),
            "gan/logits_real": logits_real.detach().float().mean(),
            "gan/logits_fake": logits_fake.detach().float().mean(),
        }
