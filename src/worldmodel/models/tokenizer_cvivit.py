"""C-ViViT (Phenaki): a causal transformer video tokenizer with temporal patches.

Encoder: the first frame is cut into p x p patches alone (its own linear embedding); the other
frames into (kt, p, p) tubelets, so a clip of T = 1 + n kt frames becomes 1 + n latent frames of
(H / p) x (W / p) tokens. A spatial transformer then mixes the tokens of each latent frame, and a
causal temporal transformer mixes each token position across latent frames. A linear map to the
quantizer's width and the quantizer (FSQ / LFQ / VQ through `build_quantizer`) give the codes.
Decoder: the mirror image, a causal temporal transformer, then a spatial transformer, then linear
maps back to pixel tubelets (the first latent frame to one frame, through its own head).

Causality: latent frame j sees only input frames <= j kt (tubelets never straddle latent frames,
the spatial transformer is per latent frame, the temporal one causal). An image is a 1-frame clip
and its tokens equal the first latent frame of any video that starts with it, so a model trained
on `data=images` can be fine-tuned on video (`task=train checkpoint=PATH` starts from its weights).

Both transformers are `STTransformer`s from `st_transformer.py`: the spatial one runs on
((B t), 1, N, D) (its temporal attention then sees one frame, a per-token linear map), the
temporal one on ((B N), t, 1, D) (its spatial attention sees one token). Those degenerate
sub-layers are the price of reusing one block type.

Quantization, `tokenize`/`detokenize`/`reconstruct` and the losses (L1/L2, LPIPS, quantizer aux,
adaptive hinge GAN with its own discriminator step) are `VideoTokenizer`'s; only the encoder and
decoder differ.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from einops import rearrange
from omegaconf import DictConfig
from torch import Tensor, nn

from worldmodel.config import ConfigError, resolution
from worldmodel.models.quantize import build_quantizer
from worldmodel.models.st_transformer import STTransformer, init_weights
from worldmodel.models.tokenizer import VideoTokenizer


def _pair(size: int | list[int] | tuple[int, ...], key: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, list | tuple) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ValueError(f"{key}={size!r}: expected an int or [height, width]")


def _quantizer_width(kind: str | None, quantizer: dict[str, Any]) -> int:
    """The latent width a quantizer works in without projections of its own."""
    if kind == "fsq":
        return len(quantizer.get("levels") or [0])
    if kind == "lfq":
        return int(math.log2(max(int(quantizer.get("codebook_size", 2)), 2)))
    return int(quantizer.get("codebook_dim", 16))


class PatchEmbed(nn.Module):
    """Video (B, C, T, H, W) -> tokens (B, t, N, D): the first frame in p x p patches, the rest in
    (kt, p, p) tubelets, each kind with its own linear embedding followed by a LayerNorm.

    No LayerNorm on the raw patches: it would remove each patch's mean colour and contrast, which
    the reconstruction needs (measured: +2.8 dB after 30 smoke steps without it)."""

    def __init__(self, in_channels: int, patch: int, temporal_patch: int, dim: int) -> None:
        super().__init__()
        self.patch, self.temporal_patch = patch, temporal_patch
        first, rest = in_channels * patch * patch, in_channels * temporal_patch * patch * patch
        self.first = nn.Sequential(nn.Linear(first, dim), nn.LayerNorm(dim))
        self.rest = nn.Sequential(nn.Linear(rest, dim), nn.LayerNorm(dim))

    def forward(self, video: Tensor) -> Tensor:
        p, kt = self.patch, self.temporal_patch
        first = rearrange(
            video[:, :, :1], "b c 1 (h p1) (w p2) -> b 1 (h w) (c p1 p2)", p1=p, p2=p
        )  # (B, 1, N, C p p)
        tokens = [self.first(first)]
        if video.shape[2] > 1:
            rest = rearrange(
                video[:, :, 1:],
                "b c (t kt) (h p1) (w p2) -> b t (h w) (c kt p1 p2)",
                kt=kt,
                p1=p,
                p2=p,
            )  # (B, t - 1, N, C kt p p)
            tokens.append(self.rest(rest))
        return torch.cat(tokens, dim=1)  # (B, t, N, D)


class PixelHead(nn.Module):
    """Tokens (B, t, N, D) -> video (B, C, T, H, W): the mirror of `PatchEmbed`."""

    def __init__(
        self, in_channels: int, patch: int, temporal_patch: int, dim: int, grid: tuple[int, int]
    ) -> None:
        super().__init__()
        self.patch, self.temporal_patch, self.grid = patch, temporal_patch, grid
        self.norm = nn.LayerNorm(dim)
        self.first = nn.Linear(dim, in_channels * patch * patch)
        self.rest = nn.Linear(dim, in_channels * temporal_patch * patch * patch)

    def forward(self, x: Tensor) -> Tensor:
        p, kt, (h, w) = self.patch, self.temporal_patch, self.grid
        x = self.norm(x)
        frames = [
            rearrange(
                self.first(x[:, :1]),
                "b 1 (h w) (c p1 p2) -> b c 1 (h p1) (w p2)",
                h=h,
                w=w,
                p1=p,
                p2=p,
            )  # (B, C, 1, H, W)
        ]
        if x.shape[1] > 1:
            frames.append(
                rearrange(
                    self.rest(x[:, 1:]),
                    "b t (h w) (c kt p1 p2) -> b c (t kt) (h p1) (w p2)",
                    h=h,
                    w=w,
                    kt=kt,
                    p1=p,
                    p2=p,
                )  # (B, C, (t - 1) kt, H, W)
            )
        return torch.cat(frames, dim=2)


class SpaceThenTime(nn.Module):
    """A spatial transformer over each latent frame's tokens and a causal temporal transformer over
    each token position, in the given order; tokens (B, t, N, D) -> (B, t, N, D)."""

    def __init__(
        self,
        dim: int,
        spatial_depth: int,
        temporal_depth: int,
        heads: int,
        grid: tuple[int, int],
        max_frames: int,
        mlp_ratio: float,
        rel_pos_bias: bool,
        time_first: bool,
    ) -> None:
        super().__init__()
        self.time_first = time_first
        n = grid[0] * grid[1]
        # one frame per sequence: its (non-causal) temporal attention is a per-token linear map
        self.spatial = STTransformer(
            dim,
            spatial_depth,
            heads,
            num_tokens=n,
            max_frames=1,
            mlp_ratio=mlp_ratio,
            causal=False,
            grid=grid,
            rel_pos_bias=rel_pos_bias,
        )
        # one token per frame: the spatial attention is a per-token linear map
        self.temporal = STTransformer(
            dim, temporal_depth, heads, num_tokens=1, max_frames=max_frames, mlp_ratio=mlp_ratio
        )

    def _space(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        y = self.spatial(rearrange(x, "b t n d -> (b t) 1 n d"))  # ((B t), 1, N, D)
        return rearrange(y, "(b t) 1 n d -> b t n d", b=b)

    def _time(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        y = self.temporal(rearrange(x, "b t n d -> (b n) t 1 d"))  # ((B N), t, 1, D)
        return rearrange(y, "(b n) t 1 d -> b t n d", b=b)

    def forward(self, x: Tensor) -> Tensor:
        if self.time_first:
            return self._space(self._time(x))
        return self._time(self._space(x))


class CViViTEncoder(nn.Module):
    """Video (B, C, T, H, W) -> pre-quantization latents (B, t, N, latent_dim)."""

    def __init__(self, embed: PatchEmbed, body: SpaceThenTime, dim: int, latent_dim: int) -> None:
        super().__init__()
        self.embed, self.body = embed, body
        self.to_latent = nn.Linear(dim, latent_dim)

    def forward(self, video: Tensor) -> Tensor:
        return self.to_latent(self.body(self.embed(video)))


class CViViTDecoder(nn.Module):
    """Codes (B, t, N, latent_dim) -> video (B, C, T, H, W)."""

    def __init__(self, body: SpaceThenTime, head: PixelHead, dim: int, latent_dim: int) -> None:
        super().__init__()
        self.from_latent = nn.Linear(latent_dim, dim)
        self.body, self.head = body, head

    @property
    def last_layer(self) -> Tensor:
        """Where the GAN's adaptive weight compares gradient norms: the first-frame head, the one
        output layer every clip (images included) goes through."""
        return self.head.first.weight

    def forward(self, codes: Tensor) -> Tensor:
        return self.head(self.body(self.from_latent(codes)))


class CViViT(VideoTokenizer):
    """Phenaki's C-ViViT tokenizer with `VideoTokenizer`'s API, quantizer and losses.

    Shapes: video (B, C, T, H, W) in [-1, 1] with T = 1 + n * temporal_downsample and (H, W) =
    `image_size`; latents and codes (B, D, t, h, w) with t = 1 + n, (h, w) = (H, W) / p;
    indices (B, t, h, w).

    Sizes: `spatial_downsample` is the patch size p, `temporal_downsample` the temporal patch kt
    (the names the pipeline and `validate` read for every tokenizer). `dim`, `heads`, `mlp_ratio`
    and the depths (`spatial_depth`, `temporal_depth`; the decoder's default to the encoder's)
    size the transformers; `max_frames` bounds the latent frames of a clip (temporal position
    embeddings). `rel_pos_bias` adds a learned relative-position bias to spatial attention.
    `quantizer`, `latent_dim` and the loss weights are as in `VideoTokenizer`.
    """

    @classmethod
    def check_config(cls, model: DictConfig, data: DictConfig, ev: DictConfig) -> list[str]:
        """The tokenizer's checks, and: position embeddings are learned for one frame size and up
        to max_frames latent frames, which the training and evaluation clips must fit."""
        errors = super().check_config(model, data, ev)
        res = resolution(data)
        try:
            size = resolution({"resolution": model.get("image_size")})
        except ConfigError:
            errors.append(f"model.image_size={model.get('image_size')}: expected an int or [H, W]")
            size = None
        if res is not None and size is not None and size != res:
            errors.append(f"model.image_size={list(size)} must equal data.resolution={list(res)}")
        t, frames = int(model.get("temporal_downsample", 1)), int(model.get("max_frames", 16))
        for key, clip in (
            ("data.clip_length", data.get("clip_length")),
            ("eval.clip_length", ev.get("clip_length")),
        ):
            if clip is None or t < 1:
                continue
            if (int(clip) - 1) % t:
                continue  # reported by super().check_config
            if 1 + (int(clip) - 1) // t > frames:
                errors.append(
                    f"{key}={clip} makes {1 + (int(clip) - 1) // t} latent frames, more than "
                    f"model.max_frames={frames}"
                )
        return errors

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | list[int] | tuple[int, int] = 64,
        spatial_downsample: int = 8,
        temporal_downsample: int = 2,
        dim: int = 128,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        spatial_depth: int = 2,
        temporal_depth: int = 2,
        decoder_spatial_depth: int | None = None,
        decoder_temporal_depth: int | None = None,
        max_frames: int = 16,
        rel_pos_bias: bool = True,
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
    ) -> None:
        # VideoTokenizer.__init__ builds the CNN encoder/decoder; this class brings its own parts
        # and only shares the methods, so nn.Module's constructor is called directly.
        nn.Module.__init__(self)
        self.refiner = None  # C-ViViT decodes whole clips: no previous-frame refiner
        height, width = _pair(image_size, "image_size")
        p, kt = int(spatial_downsample), int(temporal_downsample)
        if p < 1 or height % p or width % p:
            raise ValueError(
                f"spatial_downsample={spatial_downsample} (the patch size) must divide "
                f"image_size={height}x{width}"
            )
        if kt < 1:
            raise ValueError(f"temporal_downsample={temporal_downsample}: expected >= 1")
        if max_frames < 1:
            raise ValueError(f"max_frames={max_frames}: expected >= 1")
        for key, depth in (("spatial_depth", spatial_depth), ("temporal_depth", temporal_depth)):
            if depth < 1:
                raise ValueError(f"{key}={depth}: expected >= 1")
        self.image_size = (height, width)
        self.grid = (height // p, width // p)
        self.spatial_downsample, self.temporal_downsample = p, kt
        self.max_frames = int(max_frames)

        quantizer = dict(quantizer or {"kind": "fsq", "levels": [8, 8, 8, 5, 5, 5]})
        kind = quantizer.pop("kind", None)
        if latent_dim is None:
            latent_dim = _quantizer_width(kind, quantizer)
        self.quantizer = build_quantizer(kind, latent_dim, **quantizer)

        def body(spatial: int, temporal: int, time_first: bool) -> SpaceThenTime:
            return SpaceThenTime(
                dim,
                spatial,
                temporal,
                heads,
                self.grid,
                self.max_frames,
                mlp_ratio,
                rel_pos_bias,
                time_first,
            )

        self.encoder = CViViTEncoder(
            PatchEmbed(in_channels, p, kt, dim),
            body(spatial_depth, temporal_depth, time_first=False),
            dim,
            latent_dim,
        )
        self.decoder = CViViTDecoder(
            body(
                spatial_depth if decoder_spatial_depth is None else decoder_spatial_depth,
                temporal_depth if decoder_temporal_depth is None else decoder_temporal_depth,
                time_first=True,
            ),
            PixelHead(in_channels, p, kt, dim, self.grid),
            dim,
            latent_dim,
        )
        # the same initialisation as the transformers (which apply it themselves)
        for part in (self.encoder.embed, self.encoder.to_latent, self.decoder.from_latent):
            part.apply(init_weights)
        self.decoder.head.apply(init_weights)

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

    # ----------------------------------------------------------------------------- shapes
    @property
    def max_latent_frames(self) -> int:
        """Latent frames a clip may have (the temporal position table's length)."""
        return self.max_frames

    def _check_shape(self, T: int, H: int, W: int) -> None:
        super()._check_shape(T, H, W)
        if self.image_size != (H, W):
            raise ValueError(
                f"C-ViViT was built for image_size={list(self.image_size)} (learned position "
                f"embeddings), got frames of {H}x{W}"
            )
        t = 1 + (T - 1) // self.temporal_downsample
        if t > self.max_frames:
            raise ValueError(
                f"a clip of T={T} frames makes {t} latent frames, more than max_frames="
                f"{self.max_frames}"
            )

    # ----------------------------------------------------------------------------- API
    def encode(self, video: Tensor) -> Tensor:
        """video (B, C, T, H, W) -> pre-quantization latents z (B, D, t, h, w)."""
        if video.ndim != 5:
            raise ValueError(f"video must be (B, C, T, H, W), got shape {tuple(video.shape)}")
        self._check_shape(*video.shape[2:])
        z = self.encoder(video)  # (B, t, N, D)
        return rearrange(z, "b t (h w) d -> b d t h w", h=self.grid[0])

    def decode(self, codes: Tensor) -> Tensor:
        """codes (B, D, t, h, w) -> video (B, C, T, H, W), T = 1 + (t - 1) kt."""
        if codes.ndim != 5 or tuple(codes.shape[3:]) != self.grid:
            raise ValueError(
                f"codes must be (B, D, t, {self.grid[0]}, {self.grid[1]}), got {tuple(codes.shape)}"
            )
        if codes.shape[2] > self.max_frames:
            raise ValueError(f"{codes.shape[2]} latent frames exceed max_frames={self.max_frames}")
        x = rearrange(codes, "b d t h w -> b t (h w) d")  # (B, t, N, D)
        return self.decoder(x)
