"""VAR as a world model: next-scale prediction of each frame's codes (Tian et al. 2024, "Visual
Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction").

Like genie2, this model reads the frozen tokenizer's continuous frame latents z (h, w, D) (the
pipeline's `model.pipeline.inputs: latents`) and owns its codes. Two parts:

1. `MultiScaleQuantizer`, VAR's multi-scale residual VQVAE head over one frame's latents:

       f = enc(z)                                     # (c, h, w)
       f_hat = 0
       for k, (h_k, w_k) in scales (1x1, 2x2, 4x4, ... up to (h, w)):
           r_k = Q(area_down(f - f_hat, (h_k, w_k)))  # one shared codebook, (h_k, w_k) ids
           f_hat += phi_k(up(lookup(r_k), (h, w)))    # bilinear up-sampling, phi_k: a 3x3 conv
       z_hat = dec(f_hat)                             # ||z_hat - z||^2 + commitment

   phi_k(x) = (1 - ratio) x + ratio conv_k(x) (VAR's `quant_resi`, ratio 0.5). The commitment
   loss is VAR's, summed over the cumulative reconstructions f_hat_{<=k} of every scale; the
   decoder reads f_hat with a straight-through gradient to the encoder.

2. `VARWorldModel`: a transformer over a frame sequence laid out in blocks

       Q_1^1 Q_1^2 ... Q_1^K | Q_2^1 ... Q_2^K | ...     (frame 0 is context only)

   Q_t^1 is one start token (VAR's class token; here the embedding of the action a_{t-1} that
   leads to frame t); Q_t^k (k >= 2) are the h_k * w_k features area_down(f_hat_{<k}, (h_k, w_k))
   of frame t's cumulative reconstruction of scales < k (teacher forcing, as in VAR). Every
   query token also adds the embedding of the previous frame's code at its scale and position,
   so frame t - 1 (all of it, its last scale included) reaches frame t's tokens directly and the
   earlier frames through their own blocks. Attention is block-causal: a token sees every token
   of earlier blocks (earlier scales and frames) and of its own block. The outputs of block
   Q_t^k are the logits of frame t's scale-k codes, so a scale's tokens are sampled all at once
   and a frame takes K = len(scales) network passes (MaskGIT's dynamics model: 8 steps + 1 pass
   to encode the new frame).

Codes of a frame, as the rest of the house sees them: the K scales' id maps flattened and
concatenated, r_1 ... r_K, L = sum_k h_k w_k ids (85 for an 8x8 grid), shaped (B, T, 1, L)
where other world models have (B, T, h, w).

Sampling keeps a KV cache over the committed blocks. The keys/values of Q_t^1..Q_t^K written
while frame t is generated are kept and committed when the next call's context ends with that
frame (and action), so steady-state generation is exactly K passes per frame.

Simplified from VAR: frame positions are absolute within a window of `max_frames` (rollouts slide
the window and rebuild the cache); the previous frame enters through its code embeddings (a
single image has no past; the ST-transformer models here get it from per-position temporal
attention); the action enters the start token and AdaLN of the frame's tokens (VAR: the class
embedding in both); no classifier-free guidance; one phi conv per scale (VAR shares 4 among 10
scales); the codebook is the project's EMA VQ (dead-code restarts) instead of VAR's
gradient-trained one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

from worldmodel.models.checks import (
    action_sets,
    check_id_dtype,
    check_id_range,
    check_latents,
    check_rollout_actions,
    used_action_sets,
)
from worldmodel.models.interfaces import WorldModel
from worldmodel.models.quantize import build_quantizer
from worldmodel.models.sampling import gumbel_noise, sliding_rollout, top_k_filter
from worldmodel.models.st_transformer import init_weights

Scale = tuple[int, int]


def parse_scales(scales: Any, grid: tuple[int, int] | list[int]) -> tuple[Scale, ...]:
    """The scales (h_k, w_k) of a `scales` setting on a (h, w) grid; ValueError naming the problem.

    `scales`: None (1, 2, 4, ... doubling, capped at the grid, then the grid itself) or a list of
    side lengths s (meaning (s, s)) or [h_k, w_k] pairs. They must grow (each side never shrinks,
    the area strictly grows) and end at the grid.
    """
    h, w = int(grid[0]), int(grid[1])
    if scales is None:
        out, s = [], 1
        while s < max(h, w):
            out.append((min(s, h), min(s, w)))
            s *= 2
        out.append((h, w))
        return tuple(dict.fromkeys(out))  # drop repeats (a side capped at the grid)
    if not isinstance(scales, list | tuple) or not scales:
        raise ValueError(f"scales={scales!r}: expected a non-empty list (or null)")
    out = []
    for s in scales:
        if isinstance(s, int) and not isinstance(s, bool):
            out.append((s, s))
        elif isinstance(s, list | tuple) and len(s) == 2 and all(isinstance(v, int) for v in s):
            out.append((int(s[0]), int(s[1])))
        else:
            raise ValueError(f"scales={list(scales)}: entry {s!r} is not a side or [h, w] pair")
    for sh, sw in out:
        if not (1 <= sh <= h and 1 <= sw <= w):
            raise ValueError(f"scales={list(scales)}: scale {sh}x{sw} is outside the {h}x{w} grid")
    for (ah, aw), (bh, bw) in zip(out, out[1:], strict=False):
        if bh < ah or bw < aw or bh * bw <= ah * aw:
            raise ValueError(
                f"scales={list(scales)}: scales must increase ({ah}x{aw} is followed by {bh}x{bw})"
            )
    if out[-1] != (h, w):
        raise ValueError(
            f"scales={list(scales)}: the last scale must be the grid {h}x{w}, got "
            f"{out[-1][0]}x{out[-1][1]}"
        )
    return tuple(out)


def _down(x: Tensor, size: Scale) -> Tensor:
    """Area down-sampling of (N, c, h, w) to `size` (the identity at full size)."""
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="area")


def _up(x: Tensor, size: Scale) -> Tensor:
    """Bilinear up-sampling of (N, c, h_k, w_k) to `size`."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class MultiScaleQuantizer(nn.Module):
    """VAR's multi-scale residual quantization of frame latents (N, D, h, w), one codebook.

    `encoder(z)` -> features f (N, c, h, w); `quantize(f)` -> (f_hat, per-scale ids, loss, stats);
    `contributions(ids)` -> phi_k(up(lookup(r_k))) per scale (their sum is f_hat);
    `decode(f_hat)` -> latents (N, D, h, w).
    """

    def __init__(
        self,
        latent_dim: int,
        code_dim: int,
        hidden_dim: int,
        codebook_size: int,
        scales: tuple[Scale, ...],
        vq: dict[str, Any] | None = None,
        phi_ratio: float = 0.5,
        beta: float = 0.25,
    ) -> None:
        super().__init__()
        if not 0.0 <= phi_ratio <= 1.0:
            raise ValueError(f"phi_ratio must be in [0, 1], got {phi_ratio}")
        self.scales = scales
        self.grid = scales[-1]
        self.phi_ratio, self.beta = float(phi_ratio), float(beta)
        self.encoder = nn.Sequential(
            nn.Conv2d(latent_dim, hidden_dim, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden_dim, code_dim, 1),
        )
        vq = dict(vq or {})
        vq.setdefault("rotation_trick", False)  # the residuals reach it detached (VAR)
        self.vq = build_quantizer("vq", code_dim, codebook_size=codebook_size, **vq)
        self.phi = nn.ModuleList(nn.Conv2d(code_dim, code_dim, 3, padding=1) for _ in scales)
        self.decoder = nn.Sequential(
            nn.Conv2d(code_dim, hidden_dim, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden_dim, latent_dim, 1),
        )

    def phi_k(self, k: int, x: Tensor) -> Tensor:
        """VAR's phi: (1 - ratio) x + ratio conv_k(x), on (N, c, h, w)."""
        return (1 - self.phi_ratio) * x + self.phi_ratio * self.phi[k](x)

    def contribution(self, k: int, codes: Tensor) -> Tensor:
        """Scale k's codes (N, c, h_k, w_k) -> its term of f_hat (N, c, h, w)."""
        return self.phi_k(k, _up(codes, self.grid))

    def quantize(self, f: Tensor) -> tuple[Tensor, list[Tensor], Tensor, dict[str, Tensor]]:
        """f (N, c, h, w) -> (f_hat (N, c, h, w), ids [(N, h_k, w_k)], commitment loss, codebook
        stats over all scales); f_hat passes its gradient straight through to f."""
        rest = f.detach()
        f_hat = torch.zeros_like(rest)
        ids, loss = [], f.new_zeros(())
        for k, size in enumerate(self.scales):
            idx = self.vq(_down(rest, size))[1]  # (N, h_k, w_k)
            # the codebook rows themselves (the adapter's output is x + (q - x), not q exactly)
            term = self.contribution(k, self.vq.indices_to_codes(idx).float())
            f_hat = f_hat + term
            rest = rest - term.detach()
            ids.append(idx)
            # VAR: every cumulative reconstruction moves toward f, f toward it (commitment)
            loss = loss + F.mse_loss(f_hat, f.detach()) + self.beta * F.mse_loss(f, f_hat.detach())
        stats = code_stats(torch.cat([i.flatten() for i in ids]), self.vq.codebook_size)
        if f.requires_grad:  # the decoder's gradient goes straight through to the encoder
            f_hat = f + (f_hat - f).detach()
        return f_hat, ids, loss / len(self.scales), stats

    def contributions(self, ids: list[Tensor]) -> list[Tensor]:
        """Per-scale ids [(N, h_k, w_k)] -> the scales' terms [(N, c, h, w)] of f_hat."""
        return [
            self.contribution(k, self.vq.indices_to_codes(idx).float()) for k, idx in enumerate(ids)
        ]

    def teacher_inputs(self, ids: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """VAR's transformer inputs: for k >= 2, area_down(f_hat_{<k}, scale k) (N, c, h_k, w_k);
        and the full f_hat (N, c, h, w)."""
        inputs, f_hat = [], None
        for k, term in enumerate(self.contributions(ids)):
            f_hat = term if f_hat is None else f_hat + term
            if k + 1 < len(self.scales):
                inputs.append(_down(f_hat, self.scales[k + 1]))
        assert f_hat is not None
        return inputs, f_hat

    def decode(self, f_hat: Tensor) -> Tensor:
        """f_hat (N, c, h, w) -> latents (N, D, h, w)."""
        return self.decoder(f_hat)


@torch.no_grad()
def code_stats(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Usage and perplexity of a flat batch of code ids."""
    counts = torch.bincount(indices.long(), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp_min(1.0)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return {"perplexity": entropy.exp(), "usage": (counts > 0).float().mean()}


class Block(nn.Module):
    """Pre-norm transformer block with per-token AdaLN (zero-initialised, as in VAR/DiT), over
    (B, n, dim) tokens with an attention mask and an optional KV cache."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
        )
        self.drop = nn.Dropout(dropout)
        self.ada = nn.Linear(dim, 6 * dim)  # (shift, scale, gate) x (attention, MLP)

    def forward(
        self,
        x: Tensor,
        cond: Tensor,
        group: Tensor,
        mask: Tensor,
        cache: VARCache | None,
        layer: int,
        start: int,
    ) -> Tensor:
        """x (B, n, dim); cond (B, G, dim), one row per group of tokens that share it, `group`
        (n,) the row of each token; mask (n, start + n) bool (True = attend); with `cache`, keys
        and values are written at positions start .. start + n and read from 0 .. start + n."""
        mod = self.ada(cond)[:, group]  # (B, n, 6 dim): computed once per group
        s1, c1, g1, s2, c2, g2 = mod.chunk(6, dim=-1)  # (B, n, dim) each
        h = self.norm1(x) * (1 + c1) + s1
        q, k, v = rearrange(self.qkv(h), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if cache is not None:
            k, v = cache.write(layer, start, k, v)  # (B, heads, start + n, Dh)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + (1 + g1) * self.drop(self.proj(rearrange(a, "b h n d -> b n (h d)")))
        h = self.norm2(x) * (1 + c2) + s2
        return x + (1 + g2) * self.drop(self.mlp(h))


@dataclass
class VARCache:
    """Keys/values of the committed blocks [Q_1, ..., Q_{n-1}] of `frames`
    (B, n, L) with `sets` (B, n-1, A), buffers (B, heads, capacity, Dh) per layer; `pending`:
    the frame codes (B, L) and action set (B, A) whose Q blocks were written after them by the
    last generation (committed if the next context goes on with that frame)."""

    capacity: int
    length: int = 0  # committed tokens
    frames: Tensor | None = None
    sets: Tensor | None = None
    pending: tuple[Tensor, Tensor] | None = None
    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return 0 if self.frames is None else self.frames.shape[1]

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, heads, n, Dh) at start .. start + n; keys/values of 0 .. start + n."""
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        end = start + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"VAR cache holds {self.capacity} tokens, asked for {end}")
        if self.keys[layer] is None:
            shape = (*k.shape[:2], self.capacity, k.shape[3])
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        buf_k, buf_v = self.keys[layer], self.values[layer]
        assert buf_k is not None and buf_v is not None
        if buf_k.shape[0] != k.shape[0]:
            raise ValueError(f"VAR cache is for batch {buf_k.shape[0]}, got {k.shape[0]}")
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        return buf_k[:, :, :end].to(k.dtype), buf_v[:, :, :end].to(v.dtype)


class VARTransformer(nn.Module):
    """The block-causal transformer stack. The tokens of a frame (`blocks_per_frame` consecutive
    block ids) share their AdaLN conditioning, which is computed once per frame."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
        blocks_per_frame: int,
    ):
        super().__init__()
        self.blocks_per_frame = blocks_per_frame
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        x: Tensor,
        cond: Tensor,
        blocks: Tensor,
        cache: VARCache | None = None,
        start: int = 0,
    ) -> Tensor:
        """Hidden states (B, n, dim) of tokens x (B, n, dim) with AdaLN conditioning cond
        (B, n, dim) (the same for the tokens of a frame) and block ids `blocks` (n,) long; the
        tokens follow `start` cached ones (all of earlier blocks, so seen by every token here)."""
        mask = block_causal_mask(blocks, start)
        frames = torch.div(blocks, self.blocks_per_frame, rounding_mode="floor")
        _, group, counts = torch.unique_consecutive(frames, return_inverse=True, return_counts=True)
        first = torch.cumsum(counts, 0) - counts  # the first token of each frame
        cond = cond[:, first]  # (B, G, dim): (the same for all of a frame's tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cond, group, mask, cache, i, start)
        return self.norm(x)


def _cat(parts: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate (tokens, conditioning, block ids) pieces along the sequence."""
    return (
        torch.cat([p[0] for p in parts], 1),
        torch.cat([p[1] for p in parts], 1),
        torch.cat([p[2] for p in parts]),
    )


def block_causal_mask(blocks: Tensor, past: int = 0) -> Tensor:
    """(n, past + n) bool: token i sees every past token and token j when block[j] <= block[i]."""
    own = blocks[None, :] <= blocks[:, None]  # (n, n)
    return torch.cat([own.new_ones(len(blocks), past), own], dim=1)


class VARWorldModel(nn.Module, WorldModel):
    """Next-scale prediction of frame codes over a frozen tokenizer's latents (see the module
    docstring).

    Sizes: `latent_dim` = the tokenizer's latent width D, `grid` its (h, w), `scales` (see
    `parse_scales`), `codebook_size`, `code_dim`, `hidden_dim`, `vq` (EMA VQ settings of
    `models/quantize.py`), `phi_ratio`, `beta` (commitment) for the quantizer; `dim`, `depth`,
    `heads`, `mlp_ratio`, `dropout` for the transformer. Loss weights: `rec_weight` (latent
    reconstruction), `quantizer_weight` (commitment), `label_smoothing` of the code CE.
    """

    inputs = "latents"
    own_codes = True

    def __init__(
        self,
        latent_dim: int = 4,
        num_actions: int = 15,
        grid: list[int] | tuple[int, int] = (8, 8),
        scales: list[Any] | None = None,
        max_frames: int = 16,
        codebook_size: int = 1024,
        code_dim: int = 16,
        hidden_dim: int = 64,
        vq: dict[str, Any] | None = None,
        phi_ratio: float = 0.5,
        beta: float = 0.25,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        rec_weight: float = 1.0,
        quantizer_weight: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if len(grid) != 2:
            raise ValueError(f"grid must be [h, w], got {list(grid)}")
        if num_actions < 1:
            raise ValueError(f"num_actions must be >= 1, got {num_actions}")
        if max_frames < 2:
            raise ValueError(f"max_frames must be >= 2, got {max_frames}")
        self.latent_dim = int(latent_dim)
        self.num_actions = int(num_actions)
        self.grid = (int(grid[0]), int(grid[1]))
        self.scales = parse_scales(scales, self.grid)
        self.sizes = [h * w for h, w in self.scales]  # tokens per scale
        self.code_len = sum(self.sizes)  # L: ids per frame
        self.max_frames = int(max_frames)
        self.codebook_size = int(codebook_size)
        self.rec_weight, self.quantizer_weight = float(rec_weight), float(quantizer_weight)
        self.label_smoothing = float(label_smoothing)
        k = len(self.scales)

        self.quantizer = MultiScaleQuantizer(
            self.latent_dim, code_dim, hidden_dim, self.codebook_size, self.scales, vq,
            phi_ratio, beta,
        )  # fmt: skip
        self.word_embed = nn.Linear(code_dim, dim)  # VAR: features of f_hat -> tokens
        self.start = nn.Parameter(torch.zeros(dim))  # Q_t^1, before its action is added
        self.action_emb = nn.Linear(self.num_actions, dim)  # an action set: sum of rows + bias
        # the previous frame's code at each query's scale and position (see the module doc)
        self.prev_emb = nn.Embedding(self.codebook_size, dim)
        self.pos = nn.Parameter(torch.zeros(self.code_len, dim))  # per scale and position
        self.level = nn.Parameter(torch.zeros(k, dim))  # per scale
        self.frame_pos = nn.Parameter(torch.zeros(self.max_frames, dim))
        self.transformer = VARTransformer(dim, depth, heads, mlp_ratio, dropout, k)
        self.head = nn.Linear(dim, self.codebook_size)
        level_of = torch.cat([torch.full((n,), i) for i, n in enumerate(self.sizes)])
        self.register_buffer("level_of", level_of, persistent=False)  # (L,) scale of each id
        for m in self.transformer.modules():  # the quantizer keeps its own initialisation
            if isinstance(m, nn.Linear):
                init_weights(m)
        for m in (self.word_embed, self.action_emb, self.prev_emb, self.head):
            init_weights(m)
        for p in (self.start, self.pos, self.level, self.frame_pos):
            nn.init.trunc_normal_(p, std=0.02)
        for block in self.transformer.blocks:
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)

    @staticmethod
    def check_config(model: DictConfig, data: DictConfig, ev: DictConfig) -> list[str]:
        """What `validate` reports: scales that do not grow to the grid, a clip longer than
        the window."""
        errors = []
        try:
            scales = model.get("scales")
            if isinstance(scales, ListConfig):
                scales = OmegaConf.to_container(scales, resolve=True)
            parse_scales(scales, list(model.get("grid") or (8, 8)))
        except ValueError as e:
            errors.append(f"model.{e}")
        clip = (data or {}).get("clip_length")
        if clip is not None and int(clip) > int(model.get("max_frames", 16)):
            errors.append(
                f"data.clip_length={clip} exceeds model.max_frames={model.get('max_frames')}"
            )
        return errors

    # ------------------------------------------------------------------ codes
    def split_codes(self, codes: Tensor) -> list[Tensor]:
        """Frame codes (N, L) -> per-scale ids [(N, h_k, w_k)]."""
        return [
            part.reshape(-1, h, w)
            for part, (h, w) in zip(codes.split(self.sizes, dim=-1), self.scales, strict=True)
        ]

    def _check_codes(self, tokens: Tensor, name: str = "tokens") -> None:
        """Codes (B, T, 1, L) ids in [0, codebook_size)."""
        if tokens.dim() != 4 or tuple(tokens.shape[2:]) != (1, self.code_len):
            raise ValueError(
                f"{name} must be this model's codes (B, T, 1, L={self.code_len}: scales "
                f"{self.scales} flattened), got {tuple(tokens.shape)}"
            )
        check_id_dtype(tokens, name, "code")
        check_id_range(tokens, name, self.codebook_size)

    def _check_latents(self, latents: Tensor) -> None:
        check_latents(latents, self.grid, self.latent_dim)

    def action_sets(self, actions: Tensor, length: int | None = None) -> Tensor:
        """Actions as multi-hot sets (B, T, A) float, from ids (B, T) or sets (B, T, A)."""
        return action_sets(actions, self.num_actions, length)

    def encode(self, latents: Tensor) -> Tensor:
        """Frame latents (B, T, h, w, D) -> this model's codes (B, T, 1, L) long."""
        self._check_latents(latents)
        b = latents.shape[0]
        f = self.quantizer.encoder(rearrange(latents.float(), "b t h w d -> (b t) d h w"))
        ids = self.quantizer.quantize(f)[1]
        codes = torch.cat([i.flatten(1) for i in ids], dim=1)  # (B T, L)
        return rearrange(codes, "(b t) l -> b t 1 l", b=b)

    def decode_latents(self, tokens: Tensor) -> Tensor:
        """Codes (B, T, 1, L) -> reconstructed latents (B, T, h, w, D), frame by frame."""
        self._check_codes(tokens)
        b = tokens.shape[0]
        f_hat = sum(self.quantizer.contributions(self.split_codes(tokens.flatten(0, 2))))
        z = self.quantizer.decode(f_hat)  # (B T, D, h, w)
        return rearrange(z, "(b t) d h w -> b t h w d", b=b)

    @torch.no_grad()
    def decode_pixels(self, tokenizer: nn.Module, tokens: Tensor) -> Tensor:
        """Codes (B, T, 1, L) -> video (B, C, T, H, W) in [-1, 1] through the frozen tokenizer's
        quantizer and decoder (it was trained on quantized latents), each frame alone."""
        b = tokens.shape[0]
        z = rearrange(self.decode_latents(tokens), "b t h w d -> (b t) d 1 h w")
        video = tokenizer.decode(tokenizer.quantize(z.float())[0]).float().clamp(-1.0, 1.0)
        return rearrange(video, "(b t) c 1 h w -> b c t h w", b=b)

    # ------------------------------------------------------------------ token blocks
    def _first_query(self, sets: Tensor, frame: int, prev: Tensor) -> tuple[Tensor, Tensor]:
        """The start token Q^1 (B, 1, dim) of frame `frame` after codes `prev` (B, L), and its
        conditioning."""
        act = self.action_emb(sets)  # (B, dim)
        q = self.start + act + self.pos[0] + self.level[0] + self.frame_pos[frame]
        return q[:, None] + self.prev_emb(prev[:, :1]), act[:, None]

    def _scale_query(
        self, feats: Tensor, k: int, sets: Tensor, frame: int, prev: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Query block Q^k (k >= 1, 0-based) of features (B, c, h_k, w_k) after codes `prev`
        (B, L), and its conditioning."""
        offset = sum(self.sizes[:k])
        q = self.word_embed(rearrange(feats, "n c h w -> n (h w) c"))
        q = q + self.pos[offset : offset + self.sizes[k]] + self.level[k] + self.frame_pos[frame]
        q = q + self.prev_emb(prev[:, offset : offset + self.sizes[k]])
        act = self.action_emb(sets)[:, None].expand(-1, self.sizes[k], -1)
        return q, act

    def _block_ids(self, first_frame: int, last_frame: int) -> Tensor:
        """Block ids (n,) of the query tokens of frames first..last (>= 1): Q_t^j is t K + j."""
        k = len(self.scales)
        ids = [
            torch.full((n,), t * k + j)
            for t in range(first_frame, last_frame + 1)
            for j, n in enumerate(self.sizes)
        ]
        return torch.cat(ids).to(self.pos.device)

    def sequence(
        self, codes: Tensor, sets: Tensor, first: int = 1
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens, conditioning (B, n, dim) and block ids (n,) of the query blocks of frames
        max(first, 1)..T-1 of codes (B, T, L) with sets (B, >= T-1, A) (sets[:, t-1] leads to
        frame t); n = (T - first) L, Q_t at (t - first) L. All frames in one batch."""
        first, t = max(first, 1), codes.shape[1]
        if first >= t:
            empty = self.pos.new_zeros(codes.shape[0], 0, self.pos.shape[1])
            return empty, empty, torch.zeros(0, dtype=torch.long, device=self.pos.device)
        b = codes.shape[0]
        with torch.no_grad():  # teacher forcing: the transformer's loss leaves the codes be
            inputs, _ = self.quantizer.teacher_inputs(
                self.split_codes(codes[:, first:].flatten(0, 1))
            )
        feats = [rearrange(x, "(b t) c h w -> b t (h w) c", b=b) for x in inputs]
        act = self.action_emb(sets[:, first - 1 : t - 1])  # (B, n, dim)
        q = torch.cat([(self.start + act)[:, :, None], self.word_embed(torch.cat(feats, 2))], 2)
        q = q + self.pos + self.level[self.level_of] + self.frame_pos[first:t, None]
        q = q + self.prev_emb(codes[:, first - 1 : t - 1])  # (B, n, L, dim)
        cond = act[:, :, None].expand(-1, -1, self.code_len, -1)
        blocks = self._block_ids(first, t - 1)
        return q.flatten(1, 2), cond.flatten(1, 2), blocks

    def logits(self, tokens: Tensor, actions: Tensor) -> Tensor:
        """Teacher-forced logits (B, T-1, L, K) of frames 1..T-1 of codes (B, T, 1, L) after the
        actions (ids (B, >= T-1) or sets); for tests and analysis."""
        self._check_codes(tokens)
        codes = tokens[:, :, 0].long()
        sets = self.action_sets(actions, codes.shape[1] - 1)
        x, cond, blocks = self.sequence(codes, sets)
        hidden = self.transformer(x, cond, blocks)  # (B, (T-1) L, dim)
        return rearrange(self.head(hidden), "b (t l) k -> b t l k", l=self.code_len)

    # ------------------------------------------------------------------ training
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Next-scale code cross-entropy of frames 1..T-1 (+ latent reconstruction + commitment).

        batch: `latents` (B, T, h, w, D) (the pipeline's) or `tokens` (B, T, 1, L) = this
        model's codes; `actions` ids (B, T) or sets (B, T, A); optional `mask` (B, T) bool.
        """
        actions = batch["actions"]
        metrics: dict[str, Tensor] = {}
        loss = torch.zeros((), device=actions.device)
        if "latents" in batch:
            latents = batch["latents"]
            self._check_latents(latents)
            b, t = latents.shape[:2]
        elif "tokens" in batch:
            self._check_codes(batch["tokens"])
            b, t = batch["tokens"].shape[:2]
        else:
            raise ValueError(f"batch needs 'latents' or 'tokens', got keys {sorted(batch)}")
        if t < 2:
            raise ValueError(f"clips must hold >= 2 frames to predict a next frame, got T={t}")
        if t > self.max_frames:
            raise ValueError(f"clips of T={t} frames exceed max_frames={self.max_frames}")
        if actions.shape[:2] != (b, t):
            raise ValueError(f"actions must be (B, T, ...)=({b}, {t}), got {tuple(actions.shape)}")
        real = batch.get("mask")
        real = torch.ones(b, t, dtype=torch.bool) if real is None else real.bool()
        real = real.to(actions.device)
        # actions[:, i] drives frame i + 1: the last one drives none
        sets = used_action_sets(actions, real, self.num_actions)[:, : t - 1]  # (B, T-1, A)

        if "latents" in batch:
            z = rearrange(latents.float(), "b t h w d -> (b t) d h w")
            f_hat, ids, commit, stats = self.quantizer.quantize(self.quantizer.encoder(z))
            z_hat = self.quantizer.decode(f_hat)
            per_frame = rearrange((z_hat - z).pow(2).mean(dim=(1, 2, 3)), "(b t) -> b t", b=b)
            w = real.float()
            rec = (per_frame * w).sum() / w.sum().clamp_min(1.0)
            loss = loss + self.rec_weight * rec + self.quantizer_weight * commit
            codes = rearrange(torch.cat([i.flatten(1) for i in ids], 1), "(b t) l -> b t l", b=b)
            metrics.update(
                {
                    "rec_mse": rec.detach(),
                    "rec_rel": (rec / z.var().clamp_min(1e-8)).detach(),
                    "quantizer_loss": commit.detach(),
                    "codebook/usage": stats["usage"],
                    "codebook/perplexity": stats["perplexity"],
                }
            )
        else:
            codes = batch["tokens"][:, :, 0].long()

        x, cond, blocks = self.sequence(codes, sets)
        hidden = self.transformer(x, cond, blocks)  # (B, (T-1) L, dim): Q_1 .. Q_{T-1}
        hidden = rearrange(hidden, "b (t l) d -> b t l d", l=self.code_len)
        pred = real[:, 1:] & real[:, :-1]  # (B, T-1)
        if not bool(pred.any()):
            zero = hidden.sum() * 0.0
            metrics.update({"ce": zero.detach(), "masked_acc": zero.detach()})
            return loss + zero, metrics
        logits = self.head(hidden[pred]).float()  # (M, L, K)
        target = codes[:, 1:][pred]  # (M, L)
        ce = F.cross_entropy(
            logits.flatten(0, 1), target.flatten(), label_smoothing=self.label_smoothing
        )
        with torch.no_grad():
            plain = (
                ce
                if self.label_smoothing == 0
                else F.cross_entropy(logits.flatten(0, 1), target.flatten())
            )
            hit = (logits.argmax(-1) == target).float()  # (M, L)
            metrics["ce"] = plain.detach()
            metrics["masked_acc"] = hit.mean()
            for k, part in enumerate(hit.split(self.sizes, dim=1)):
                metrics[f"acc_scale{k + 1}"] = part.mean()
        return loss + ce, metrics

    # ------------------------------------------------------------------ sampling
    def new_cache(self, tokens: Tensor, actions: Tensor) -> VARCache:
        """A cache with the context codes (B, L, 1, Lc) and the actions between them (B, >= L-1)
        committed (one pass; none for a single frame, which has no query blocks)."""
        self._check_codes(tokens, "tokens_context")
        n = tokens.shape[1]
        if actions.shape[0] != tokens.shape[0] or actions.dim() < 2 or actions.shape[1] < n - 1:
            raise ValueError(
                f"actions must be (B, >= L-1)=({tokens.shape[0]}, {n - 1}) for {n} context "
                f"frames, got {tuple(actions.shape)}"
            )
        cache = VARCache(capacity=self._capacity())
        codes = tokens[:, :, 0].long()
        sets = self.action_sets(actions, n - 1)
        with torch.no_grad():
            x, cond, blocks = self.sequence(codes, sets)
            if x.shape[1]:
                self.transformer(x, cond, blocks, cache=cache, start=0)
        cache.length, cache.frames, cache.sets = x.shape[1], codes.clone(), sets.clone()
        return cache

    def _capacity(self) -> int:
        """Tokens of a full window: the query blocks of frames 1 .. max_frames - 1."""
        return (self.max_frames - 1) * self.code_len

    def _sample(
        self, hidden: Tensor, temperature: float, top_k: int, generator: torch.Generator | None
    ) -> Tensor:
        """Ids (B, n) from hidden states (B, n, dim): top-k, then Gumbel-max at `temperature`."""
        logits = self.head(hidden).float()  # (B, n, K)
        if temperature == 0:
            return logits.argmax(-1)
        logits = top_k_filter(logits, top_k)
        noise = gumbel_noise(logits.shape, generator, logits.device)
        return (logits / temperature + noise).argmax(-1)

    @torch.no_grad()
    def generate_next(
        self,
        tokens_context: Tensor,
        actions: Tensor,
        cache: VARCache | None = None,
        steps: int = 1,
        temperature: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Sample the frame after `tokens_context` (B, t, 1, L) -> its codes (B, 1, L), scale by
        scale: exactly len(scales) transformer passes.

        `actions` ids (B, >= t) or sets (B, >= t, A): actions[:, t-1] leads to the new frame.
        `cache` (from `new_cache` or an earlier call over a prefix of this context) is extended
        in place; `use_cache=False` re-runs the whole sequence at every scale (reference path:
        the same codes for the same generator). `steps` is accepted for the world-model
        interface (the scales fix the passes); `temperature` 0 is greedy; `top_k` 0 = all codes.
        """
        self._check_codes(tokens_context, "tokens_context")
        b, t = tokens_context.shape[:2]
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if actions.shape[0] != b or actions.dim() < 2 or actions.shape[1] < t:
            raise ValueError(
                f"actions must be (B, >= t)=({b}, {t}) for a {t}-frame context, "
                f"got {tuple(actions.shape)}"
            )
        if t + 1 > self.max_frames:
            raise ValueError(
                f"context of {t} frames + 1 new frame exceeds max_frames={self.max_frames}; "
                "use rollout(), which slides the window"
            )
        codes = tokens_context[:, :, 0].long()  # (B, t, L)
        sets = self.action_sets(actions, t)  # (B, t, A): sets[:, t-1] leads to frame t
        if use_cache:
            if cache is None:
                cache = VARCache(capacity=self._capacity())
            prefix, pos = self._catch_up(cache, codes, sets)
        else:  # the whole context, re-run with the query blocks so far at every pass
            prefix, pos = self.sequence(codes, sets[:, : t - 1]), 0
        queries: list[tuple[Tensor, Tensor, Tensor]] = []

        def run(x: Tensor, cond: Tensor, blocks: Tensor) -> Tensor:
            """One network pass for the query block x (B, n, dim) -> its hidden states."""
            nonlocal prefix, pos
            n = x.shape[1]
            if use_cache:
                parts = [(x, cond, blocks)] if prefix is None else [prefix, (x, cond, blocks)]
                prefix = None  # the context the cache lacked rides along in the first pass
                x, cond, blocks = _cat(parts)
                hidden = self.transformer(x, cond, blocks, cache=cache, start=pos)
                pos += x.shape[1]
            else:
                queries.append((x, cond, blocks))
                hidden = self.transformer(*_cat([prefix, *queries]))
            return hidden[:, -n:]

        k = len(self.scales)
        first_block = t * k  # block id of Q_t^1
        device = codes.device
        x, cond = self._first_query(sets[:, t - 1], t, codes[:, t - 1])
        hidden = run(x, cond, torch.full((1,), first_block, device=device))
        ids = [self._sample(hidden, temperature, top_k, generator)]  # (B, 1)
        f_hat = None
        for j in range(1, k):
            prev = ids[-1].view(b, *self.scales[j - 1])  # (B, h_{j-1}, w_{j-1})
            term = self.quantizer.contribution(
                j - 1, self.quantizer.vq.indices_to_codes(prev).float()
            )
            f_hat = term if f_hat is None else f_hat + term  # (B, c, h, w)
            feats = _down(f_hat, self.scales[j])  # (B, c, h_j, w_j)
            x, cond = self._scale_query(feats, j, sets[:, t - 1], t, codes[:, t - 1])
            blocks = torch.full((x.shape[1],), first_block + j, device=device)
            ids.append(self._sample(run(x, cond, blocks), temperature, top_k, generator))
        frame = torch.cat(ids, dim=1)  # (B, L)
        if cache is not None:
            cache.pending = (frame, sets[:, t - 1].clone())
        return frame[:, None]

    def _catch_up(
        self, cache: VARCache, codes: Tensor, sets: Tensor
    ) -> tuple[tuple[Tensor, Tensor, Tensor] | None, int]:
        """Check that `cache` holds a prefix of the context codes (B, t, L) / sets (B, t, A),
        commit its pending query blocks when the context goes on with that frame, and return the
        tokens of the context it still lacks (None when none) and where they start."""
        n, t = cache.num_frames, codes.shape[1]
        if n > 0 and (
            n > t
            or cache.frames.shape[0] != codes.shape[0]
            or not torch.equal(cache.frames, codes[:, :n])
            or not torch.equal(cache.sets, sets[:, : n - 1])
        ):
            raise ValueError(
                "cache does not match tokens_context/actions (it must hold a prefix of this "
                "context); pass cache=None to start a new one"
            )
        pending, cache.pending = cache.pending, None
        if n == t:
            return None, cache.length
        first = n
        if (
            n > 0
            and pending is not None
            and torch.equal(pending[0], codes[:, n])
            and torch.equal(pending[1], sets[:, n - 1])
        ):  # frame n's query blocks, written while it was generated, are kept
            cache.length += self.code_len
            first = n + 1
        x, cond, blocks = self.sequence(codes, sets[:, : t - 1], first=first)
        start = cache.length
        cache.length += x.shape[1]
        cache.frames, cache.sets = codes.clone(), sets[:, : t - 1].clone()
        return ((x, cond, blocks) if x.shape[1] else None), start

    @torch.no_grad()
    def rollout(
        self,
        tokens: Tensor,
        actions: Tensor,
        horizon: int,
        steps: int = 1,
        temperature: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """`horizon` frames (B, horizon, 1, L) after the context codes (B, t0, 1, L); actions
        ids (B, >= t0 + horizon - 1) or sets, actions[:, i] taken after frame i. The window
        holds max_frames - 1 context frames; when it slides, the cache is rebuilt."""
        self._check_codes(tokens, "context_tokens")
        b, t0 = tokens.shape[:2]
        need = check_rollout_actions(actions, b, t0, horizon)
        sets = self.action_sets(actions, need)
        return sliding_rollout(
            self,
            tokens,
            sets,
            horizon,
            window=self.max_frames - 1,
            use_cache=use_cache,
            steps=steps,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
        )
