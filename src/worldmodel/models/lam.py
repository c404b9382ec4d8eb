"""Genie latent action model (LAM): learns a tiny discrete action vocabulary from video alone.

Frames are cut into pixel patches (e.g. 8x8 patches of a 64x64 frame: an 8x8 grid of tokens).

- Encoder: a space-time transformer with causal temporal attention over frames 0..T-1. Its
  output at frame t+1 has seen frames 0..t+1; pooled over the frame it gives the latent action
  of the transition t -> t+1, quantized by a tiny VQ codebook (default 8 codes; k-means init and
  dead-code restart against collapse, see `models/quantize.py`). The encoder also gets each
  patch's difference to the previous frame, so motion is visible from the first layer.
- Decoder: a space-time transformer with causal temporal attention over frames 0..T-2 only; the
  action of transition t -> t+1 conditions frame t's tokens (added and, by default, through
  adaptive LayerNorm); its output at frame t predicts frame t+1 (as a residual over frame t).

So the decoder never sees frame t+1 except through the action: with the actions fixed, the
prediction of frame t+1 does not depend on frame t+1 (tests/test_lam.py checks it), and the
codebook's few bits are the only way the future can help. T frames give T-1 actions.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from worldmodel.metrics import frame_mse, psnr_from_mse
from worldmodel.models.interfaces import LatentActions
from worldmodel.models.quantize import build_quantizer
from worldmodel.models.st_transformer import STTransformer, init_weights


def _pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"expected an int or [h, w], got {value}")
    return int(value[0]), int(value[1])


class LatentActionModel(nn.Module, LatentActions):
    """Encoder -> tiny-codebook latent actions -> causal next-frame decoder, on pixel patches."""

    def __init__(
        self,
        image_size: int | list[int] = 64,
        patch_size: int = 8,
        in_channels: int = 3,
        max_frames: int = 16,
        dim: int = 128,
        enc_depth: int = 3,
        dec_depth: int = 3,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        num_actions: int = 8,
        code_dim: int = 16,
        quantizer: str = "vq",
        quantizer_kwargs: dict[str, Any] | None = None,
        cond_mode: str = "adaln",
        rel_pos_bias: bool = True,
        local_conv: bool = True,
        predict_residual: bool = True,
    ) -> None:
        super().__init__()
        h, w = _pair(image_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"image_size {(h, w)} is not divisible by patch_size {patch_size}")
        self.image_size = (h, w)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.grid = (h // patch_size, w // patch_size)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.max_frames = max_frames
        self.num_actions = num_actions
        self.predict_residual = predict_residual
        patch_dim = in_channels * patch_size * patch_size
        common = dict(
            dim=dim,
            heads=heads,
            num_tokens=self.num_tokens,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            drop_path=drop_path,
            causal=True,
            grid=self.grid,
            rel_pos_bias=rel_pos_bias,
            local_conv=local_conv,
        )
        # encoder input per patch: its pixels and their change since the previous frame
        self.enc_embed = nn.Linear(2 * patch_dim, dim)
        self.encoder = STTransformer(depth=enc_depth, max_frames=max_frames, **common)
        # attention pooling over a frame's tokens: the few patches where something moved
        # carry the action; a plain mean would dilute them among the static ones
        self.pool_score = nn.Linear(dim, 1)
        self.to_code = nn.Linear(dim, code_dim)
        kwargs = {"codebook_size": num_actions, **(quantizer_kwargs or {})}
        self.quantizer = build_quantizer(quantizer, code_dim, **kwargs)
        if self.quantizer.codebook_size != num_actions:
            raise ValueError(
                f"quantizer codebook_size {self.quantizer.codebook_size} != num_actions "
                f"{num_actions}"
            )
        # normalised so that the few action codes differ by O(1) from the first step on; at the
        # scale of a default init the decoder learns to ignore the action before it means anything
        self.from_code = nn.Sequential(nn.Linear(code_dim, dim), nn.LayerNorm(dim))
        self.dec_embed = nn.Linear(patch_dim, dim)
        self.decoder = STTransformer(
            depth=dec_depth, max_frames=max_frames - 1, cond_mode=cond_mode, **common
        )
        self.head = nn.Linear(dim, patch_dim)
        for m in (
            self.enc_embed,
            self.pool_score,
            self.to_code,
            self.from_code,
            self.dec_embed,
            self.head,
        ):
            m.apply(init_weights)
        if predict_residual:
            # start as "copy the last frame" rather than copy + noise
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------ helpers
    def _patches(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) -> (B, T, N, C p p)."""
        if video.dim() != 5 or video.shape[1] != self.in_channels:
            raise ValueError(
                f"video must be (B, {self.in_channels}, T, H, W), got {tuple(video.shape)}"
            )
        if tuple(video.shape[3:]) != self.image_size:
            raise ValueError(
                f"frames are {tuple(video.shape[3:])}, the model expects {self.image_size}"
            )
        p = self.patch_size
        return rearrange(video, "b c t (gh p1) (gw p2) -> b t (gh gw) (c p1 p2)", p1=p, p2=p)

    def _unpatch(self, patches: Tensor) -> Tensor:
        """(B, T, N, C p p) -> (B, C, T, H, W)."""
        p = self.patch_size
        return rearrange(
            patches,
            "b t (gh gw) (c p1 p2) -> b c t (gh p1) (gw p2)",
            gh=self.grid[0],
            p1=p,
            p2=p,
            c=self.in_channels,
        )

    # ------------------------------------------------------------------ parts
    def encode(self, video: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Video (B, C, T, H, W) -> quantized action codes (B, T-1, code_dim), indices
        (B, T-1), the quantizer's aux loss and its stats."""
        x = self._patches(video)  # (B, T, N, P)
        if x.shape[1] < 2:
            raise ValueError(f"need at least 2 frames to infer an action, got {x.shape[1]}")
        prev = torch.cat([x[:, :1], x[:, :-1]], dim=1)  # frame t-1 (frame 0 for t = 0)
        h = self.encoder(self.enc_embed(torch.cat([x, x - prev], dim=-1)))  # (B, T, N, D)
        # output at frame t+1 has seen frames 0..t+1: it describes the transition t -> t+1
        h = h[:, 1:]  # (B, T-1, N, D)
        weights = self.pool_score(h).softmax(dim=2)  # (B, T-1, N, 1)
        z = self.to_code((weights * h).sum(dim=2))  # (B, T-1, code_dim)
        codes, indices, aux, stats = self.quantizer(rearrange(z, "b t d -> b d t"))
        return rearrange(codes, "b d t -> b t d"), indices, aux, stats

    def decode(self, context: Tensor, codes: Tensor) -> Tensor:
        """Predict frames 1..t from context frames 0..t-1 (B, C, t, H, W) and action codes
        (B, t, code_dim) (codes[:, i] = transition i -> i+1) -> (B, C, t, H, W)."""
        x = self._patches(context)  # (B, t, N, P)
        if codes.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"need one action per context frame: codes {tuple(codes.shape)}, "
                f"context of {x.shape[1]} frames"
            )
        cond = self.from_code(codes.to(x.dtype))  # (B, t, D)
        h = self.decoder(self.dec_embed(x), cond=cond)  # (B, t, N, D)
        out = self.head(h)
        if self.predict_residual:
            out = out + x  # next frame = this frame + predicted change
        return self._unpatch(out)

    def codes_from_indices(self, actions: Tensor) -> Tensor:
        """Action ids (B, t) long -> codes (B, t, code_dim)."""
        if actions.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"actions must be integer ids, got {actions.dtype}")
        lo, hi = int(actions.min()), int(actions.max())
        if lo < 0 or hi >= self.num_actions:
            raise ValueError(f"actions must be in [0, {self.num_actions}), got min {lo}, max {hi}")
        codes = self.quantizer.indices_to_codes(actions.long())  # (B, code_dim, t)
        return rearrange(codes, "b d t -> b t d")

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def infer_actions(self, video: Tensor) -> Tensor:
        """Latent action ids (B, T-1) long of a video (B, C, T, H, W) in [-1, 1]."""
        return self.encode(video)[1].long()

    @torch.no_grad()
    def predict_next(self, frames: Tensor, actions: Tensor) -> Tensor:
        """Frame t from frames 0..t-1 (B, C, t, H, W) and actions (B, t) (actions[:, i] taken
        after frame i; the last one leads to the new frame) -> (B, C, H, W)."""
        if actions.dim() != 2 or actions.shape[:2] != (frames.shape[0], frames.shape[2]):
            raise ValueError(
                f"actions must be (B, t)=({frames.shape[0]}, {frames.shape[2]}), "
                f"got {tuple(actions.shape)}"
            )
        return self.decode(frames, self.codes_from_indices(actions))[:, :, -1]

    def predict_frames(self, video: Tensor, actions: Tensor) -> Tensor:
        """Predictions of frames 1..T-1 (B, C, T-1, H, W) from a video (B, C, T, H, W) and its
        action ids (B, T-1): frame t+1 from frames 0..t and actions 0..t; frame T-1 is unused."""
        return self.decode(video[:, :, :-1], self.codes_from_indices(actions))

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        video = batch["video"]
        b, _, t = video.shape[:3]
        codes, indices, aux, stats = self.encode(video)
        pred = self.decode(video[:, :, :-1], codes)  # frames 1..T-1
        target = video[:, :, 1:]
        err = (pred.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # (B, T-1)
        copy_err = (video[:, :, :-1].float() - target.float()).pow(2).mean(dim=(1, 3, 4))
        frame_mask = batch.get("mask")
        if frame_mask is None:
            weight = torch.ones_like(err)
        else:
            # a transition counts only if both of its frames are real
            weight = (frame_mask[:, 1:] & frame_mask[:, :-1]).float()
        denom = weight.sum().clamp_min(1.0)
        rec = (err * weight).sum() / denom
        loss = rec + aux
        with torch.no_grad():
            copy = (copy_err * weight).sum() / denom
            valid = indices[weight > 0] if frame_mask is not None else indices.reshape(-1)
            counts = torch.bincount(valid.reshape(-1), minlength=self.num_actions).float()
            frac = counts / counts.sum().clamp_min(1.0)
            metrics = {
                "rec_loss": rec.detach(),
                # PSNR of the pooled MSE, the prediction clamped as in evaluation
                "psnr": psnr_from_mse((frame_mse(pred, target) * weight).sum() / denom),
                "psnr_copy": psnr_from_mse(copy),
                "quant_loss": aux.detach().float(),
                "codebook/usage": stats["usage"].detach(),
                "codebook/perplexity": stats["perplexity"].detach(),
            }
            for i in range(self.num_actions):
                metrics[f"lam/code_{i}"] = frac[i]
        return loss, metrics

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, patch_size={self.patch_size}, grid={self.grid}, "
            f"num_actions={self.num_actions}, max_frames={self.max_frames}"
        )
