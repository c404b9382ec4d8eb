"""TECO: a long-context world model over a frozen tokenizer's frame latents.

Yan, Hafner, James, Abbeel, 2023, "Temporally Consistent Transformers for Video Generation"
(TECO). The image encoder is the project's frozen video tokenizer, used before its quantizer:
the pipeline (`model.pipeline.inputs: latents`) caches its continuous latents z (T, h, w, D), one
frame at a time. On top of them, as in the paper:

    conditional encoder   e_t = E([f(z_t), f(z_{t-1})])  (z_{-1} = 0)  --VQ-->  codes c_t (h, w)
    temporal transformer  s_t = Down(c_t) (one vector per frame)  ->  causal  ->  h_t = state of
                          frames < t (h_0 a learned start state)
    MaskGIT prior         p(c_t | h_t, a_{t-1})   masked training, iterative decoding
    decoder               z_hat_t = Dec(c_t, Up(h_t))          trained with ||z_hat_t - z_t||^2

so the codes of frame t spend their capacity on what changed since frame t-1 (the encoder sees
both frames, the decoder gets the past through h_t), and the long-range memory is the temporal
transformer's state, cheap because each frame is one down-sampled vector there. Pixels: the
reconstructed latents go through the tokenizer's own quantizer and decoder (`decode_pixels`).

What is simplified, and why:
- Actions. The paper feeds actions into the temporal transformer; here h_t is over codes only and
  the action a_{t-1} that leads to frame t conditions the prior (added to its tokens and
  modulating its norms). The decoder reads h_t, and the rest of the house decodes a world model's
  codes without their actions (`World.decode`), so h_t must not depend on them; past actions are
  visible to the prior through the frames they produced.
- Sizes: one small conv encoder/decoder over the tokenizer's latent grid (no extra spatial
  down-sampling), a single-frame spatial transformer as the prior, the codes into the temporal
  transformer detached (the encoder learns from the reconstruction and the VQ commitment only,
  which keeps the prior's targets from being pulled towards collapse on a CPU budget); no
  DropLoss (the paper's trick of skipping the decoder on random frames), no classifier-free
  guidance.

Long context. The temporal transformer uses rotary positions (RoPE: attention sees only
relative distances) and a sliding window: each frame attends to the last `state_window` frames
(itself included; default `max_frames`, the training clip length, so every distance it sees at
sampling time was seen in training). Sampling caches the window's keys/values per layer, so a
new frame costs one temporal-transformer position plus `steps` prior passes over one frame,
whatever the length of the video; `rollout` never re-encodes (no position ever moves), and
deeper layers reach further back than the window (depth x window frames). Training clips hold at
most `max_frames` frames; rollouts of any length run.

Decoding reads the past: a frame's codes are decoded with the state of the frames before it, so
`decodes_in_context` is True and `decode_pixels(tokenizer, tokens, context)` takes the codes of
the frames before `tokens` (none: `tokens` starts a clip).

Actions, exactly: `actions[:, t]` is what was pressed after frame t; ids (B, T) long or multi-hot
sets (B, T, num_actions) (their embeddings summed, as in genie2). Frame 0 gets a learned start
embedding instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import DictConfig
from timm.layers import Mlp
from torch import Tensor, nn

from worldmodel.models.checks import (
    action_sets,
    check_code_ids,
    check_latents,
    check_rollout_actions,
    used_action_sets,
)
from worldmodel.models.dynamics import SCHEDULES, maskgit_fill
from worldmodel.models.interfaces import WorldModel
from worldmodel.models.masking import (
    check_mask_strategy,
    draw_mask,
    mask_strategy_problems,
    masked_ce,
)
from worldmodel.models.quantize import build_quantizer
from worldmodel.models.st_transformer import STTransformer, init_weights

# ------------------------------------------------------------------------------------------------
# Temporal transformer: causal, rotary positions, sliding window, KV cache
# ------------------------------------------------------------------------------------------------


def rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (RoPE, Su et al. 2021) of x (B, heads, L, Dh) at absolute
    `positions` (L,): pairs of channels rotated by position * frequency, so q.k depends on the
    distance between positions only."""
    dh = x.shape[-1]
    freqs = base ** (-torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh)
    angles = positions.float()[:, None] * freqs[None]  # (L, Dh/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]  # (B, heads, L, Dh/2) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, heads, L, Dh/2, 2)
    return out.flatten(-2).to(x.dtype)  # (B, heads, L, Dh)


@dataclass
class StateKV:
    """Keys/values of the temporal transformer for the last `window - 1` committed frames, per
    layer (B, heads, <= window - 1, Dh), keys already rotated at their absolute positions;
    `length` counts every frame committed so far (the next frame's absolute position)."""

    window: int
    length: int = 0
    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)


class TemporalBlock(nn.Module):
    """Pre-norm causal self-attention (RoPE, sliding window) + MLP over per-frame vectors."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"dim={dim} must split into heads={heads} of an even width (RoPE)")
        self.heads = heads
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=dropout)
        self.dropout = dropout

    def forward(
        self, x: Tensor, positions: Tensor, window: int, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, dim) at absolute `positions` (L,) -> (x (B, L, dim), k, v (B, heads, P + L,
        Dh)), the keys/values of the `past` frames (P of them, the positions just before) and of
        these, for the cache."""
        q, k, v = rearrange(
            self.qkv(self.norm_attn(x)), "b l (three h d) -> three b h l d", three=3, h=self.heads
        )
        q, k = rotary(q, positions), rotary(k, positions)
        p = 0
        if past is not None:
            p = past[0].shape[2]
            k = torch.cat([past[0], k], dim=2)  # (B, heads, P + L, Dh)
            v = torch.cat([past[1], v], dim=2)
        kpos = torch.arange(k.shape[2], device=x.device) + positions[0] - p  # (P + L,)
        # query at p sees keys at p - window < k <= p: causal, within the window
        dist = positions[:, None] - kpos[None, :]  # (L, P + L)
        mask = (dist >= 0) & (dist < window)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, heads, L, Dh)
        x = x + self.proj(rearrange(out, "b h l d -> b l (h d)"))
        x = x + self.mlp(self.norm_mlp(x))
        return x, k, v


class TemporalTransformer(nn.Module):
    """Causal transformer over one vector per frame with rotary positions and a sliding window
    of `window` frames; `forward` runs frames with or without a `StateKV` cache (the same
    result: the window is applied both ways)."""

    def __init__(
        self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float, dropout: float
    ) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"state_window must be >= 1, got {window}")
        self.window = window
        self.blocks = nn.ModuleList(
            TemporalBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def new_cache(self) -> StateKV:
        return StateKV(window=self.window)

    def forward(self, x: Tensor, cache: StateKV | None = None) -> Tensor:
        """Frame vectors (B, L, dim) -> outputs (B, L, dim); output t summarises frames <= t.
        With `cache`, x follows the `cache.length` frames committed, and is committed."""
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + x.shape[1], device=x.device)  # (L,)
        keep = self.window - 1  # keys a later frame can still see
        for i, block in enumerate(self.blocks):
            past = None
            if cache is not None and cache.length > 0:
                past = (cache.keys[i], cache.values[i])
            x, k, v = block(x, positions, self.window, past)
            if cache is not None:
                cut = k.shape[2] - min(keep, k.shape[2])  # the oldest keys leave the window
                k, v = k[:, :, cut:], v[:, :, cut:]
                if len(cache.keys) <= i:
                    cache.keys.append(k)
                    cache.values.append(v)
                else:
                    cache.keys[i], cache.values[i] = k, v
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)


# ------------------------------------------------------------------------------------------------
# The world model
# ------------------------------------------------------------------------------------------------


@dataclass
class TecoCache:
    """The committed context of a sampling run: its codes, the temporal transformer's keys and
    values over the last `state_window` frames, and the state h of the frame after them."""

    tokens: Tensor  # (B, n, h, w) long: the committed frames
    kv: StateKV
    state: Tensor  # (B, dim): h of frame n (from frames < n)

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


class TecoWorldModel(nn.Module, WorldModel):
    """TECO over the tokenizer's frame latents: conditional VQ encoder, temporal transformer
    state, MaskGIT prior, state-conditioned decoder (see the module docstring).

    Sizes: `latent_dim` = the tokenizer's latent width D, `grid` = its (h, w); `codebook_size`,
    `code_dim`, `hidden_dim`, `vq` (extra VQ settings, `models/quantize.py`) for the encoder's
    quantizer; `state_downsample` (stride of the conv that shrinks a frame's codes before the
    temporal transformer), `state_channels`, `dim`, `depth`, `heads`, `state_window` (frames a
    state attends to; null = max_frames) for the temporal transformer; `prior_dim`,
    `prior_depth`, `prior_heads` for the MaskGIT prior, trained with a rate per clip drawn from
    [mask_rate_min, mask_rate_max] and `mask_strategy`. Loss weights: `rec_weight` (latent MSE),
    `quantizer_weight` (VQ commitment), `label_smoothing` of the prior's cross-entropy.
    """

    inputs = "latents"
    own_codes = True
    decodes_in_context = True

    def __init__(
        self,
        latent_dim: int = 4,
        num_actions: int = 15,
        grid: list[int] | tuple[int, int] = (8, 8),
        max_frames: int = 16,
        codebook_size: int = 512,
        code_dim: int = 16,
        hidden_dim: int = 64,
        vq: dict[str, Any] | None = None,
        state_downsample: int = 4,
        state_channels: int = 16,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        state_window: int | None = None,
        prior_dim: int = 128,
        prior_depth: int = 2,
        prior_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        mask_rate_min: float = 0.5,
        mask_rate_max: float = 1.0,
        mask_strategy: str = "random",
        rec_weight: float = 1.0,
        quantizer_weight: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if len(grid) != 2:
            raise ValueError(f"grid must be [h, w], got {list(grid)}")
        self.grid = (int(grid[0]), int(grid[1]))
        problems = self.problems(
            self.grid, int(state_downsample), int(max_frames), state_window, mask_strategy
        )
        if num_actions < 1:
            problems.append(f"num_actions must be >= 1, got {num_actions}")
        if not 0.0 < mask_rate_min <= mask_rate_max <= 1.0:
            problems.append(
                f"need 0 < mask_rate_min <= mask_rate_max <= 1, got {mask_rate_min}, "
                f"{mask_rate_max}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        check_mask_strategy(mask_strategy, self.grid)
        self.latent_dim = int(latent_dim)
        self.num_actions = int(num_actions)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.max_frames = int(max_frames)
        self.state_window = int(state_window or max_frames)
        self.codebook_size = int(codebook_size)
        self.mask_id = self.codebook_size  # the prior's extra embedding row
        self.mask_rate_min, self.mask_rate_max = float(mask_rate_min), float(mask_rate_max)
        self.mask_strategy = mask_strategy
        self.rec_weight, self.quantizer_weight = float(rec_weight), float(quantizer_weight)
        self.label_smoothing = float(label_smoothing)
        s = int(state_downsample)
        self.small = (self.grid[0] // s, self.grid[1] // s)  # (h/s, w/s) the state's grid
        flat = state_channels * self.small[0] * self.small[1]

        # conditional encoder: a shared per-frame embedding f, then [f(z_t), f(z_{t-1})] -> codes
        self.frame_in = nn.Conv2d(self.latent_dim, hidden_dim, 3, padding=1)
        self.encoder = nn.Sequential(
            nn.SiLU(),
            nn.Conv2d(2 * hidden_dim, hidden_dim, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden_dim, code_dim, 1),
        )
        vq = dict(vq or {})
        vq.setdefault("rotation_trick", True)
        self.vq = build_quantizer("vq", code_dim, codebook_size=self.codebook_size, **vq)
        # temporal transformer over one down-sampled vector per frame
        self.down = nn.Conv2d(code_dim, state_channels, s, stride=s)
        self.down_proj = nn.Linear(flat, dim)
        self.start_state = nn.Parameter(torch.zeros(dim))  # h_0: no frame before
        self.temporal = TemporalTransformer(
            dim, depth, heads, self.state_window, mlp_ratio, dropout
        )
        # the state back on the token grid, for the prior and the decoder
        self.up_proj = nn.Linear(dim, flat)
        self.up = nn.ConvTranspose2d(state_channels, state_channels, s, stride=s)
        self.decoder = nn.Sequential(
            nn.Conv2d(code_dim + state_channels, hidden_dim, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden_dim, self.latent_dim, 1),
        )
        # MaskGIT prior: one frame's codes from its state and the action that led to it
        self.token_emb = nn.Embedding(self.codebook_size + 1, prior_dim)
        self.state_in = nn.Conv2d(state_channels, prior_dim, 1)
        self.state_cond = nn.Linear(dim, prior_dim)
        self.action_emb = nn.Linear(self.num_actions, prior_dim)  # sum of pressed + bias
        self.start_action = nn.Parameter(torch.zeros(prior_dim))  # frame 0: no action before
        self.prior = STTransformer(
            dim=prior_dim,
            depth=prior_depth,
            heads=prior_heads,
            num_tokens=self.num_tokens,
            max_frames=1,  # frames are independent given their state: spatial attention only
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            cond_mode="adaln",
            grid=self.grid,
            rel_pos_bias=True,
            local_conv=True,
        )
        self.head = nn.Linear(prior_dim, self.codebook_size)
        for m in (self.temporal, self.down_proj, self.up_proj, self.token_emb, self.state_cond):
            m.apply(init_weights)
        for m in (self.action_emb, self.head):
            m.apply(init_weights)
        nn.init.trunc_normal_(self.start_state, std=0.02)
        nn.init.trunc_normal_(self.start_action, std=0.02)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def problems(
        grid: tuple[int, int],
        state_downsample: int,
        max_frames: int,
        state_window: int | None,
        mask_strategy: object,
        prefix: str = "",
    ) -> list[str]:
        """What is wrong with these sizes, naming the keys (with `prefix`, e.g. "model.")."""
        out = list(mask_strategy_problems(mask_strategy, grid, f"{prefix}mask_strategy"))
        if state_downsample < 1 or any(g % state_downsample for g in grid):
            out.append(
                f"{prefix}state_downsample={state_downsample} must divide the token grid "
                f"{prefix}grid={list(grid)}"
            )
        if max_frames < 2:
            out.append(f"{prefix}max_frames must be >= 2, got {max_frames}")
        if state_window is not None and int(state_window) < 1:
            out.append(
                f"{prefix}state_window must be >= 1 (or null = max_frames), got {state_window}"
            )
        return out

    @staticmethod
    def check_config(model: DictConfig, data: DictConfig, ev: DictConfig) -> list[str]:
        """What `validate` reports about a teco config before any work."""
        grid = tuple(int(g) for g in (model.get("grid") or (8, 8)))
        max_frames = int(model.get("max_frames", 16))
        out = TecoWorldModel.problems(
            grid,
            int(model.get("state_downsample", 4)),
            max_frames,
            model.get("state_window"),
            model.get("mask_strategy", "random"),
            "model.",
        )
        clip = data.get("clip_length") if data is not None else None
        if clip is not None and int(clip) > max_frames:
            out.append(
                f"data.clip_length={clip} exceeds model.max_frames={max_frames} (the training "
                "clip length); raise model.max_frames (sampling runs longer by itself)"
            )
        return out

    def _check_codes(self, tokens: Tensor, name: str = "tokens") -> None:
        """Codes (B, T, h, w) of this model's grid, ids in [0, codebook_size)."""
        check_code_ids(tokens, name, self.grid, self.codebook_size)

    def _check_latents(self, latents: Tensor) -> None:
        check_latents(latents, self.grid, self.latent_dim)

    # ------------------------------------------------------------------ parts
    def quantize(self, latents: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Latents (B, T, h, w, D) -> (codes (B, T, c, h, w), ids (B, T, h, w), aux, stats);
        frame t is encoded together with frame t - 1 (frame 0 with zeros)."""
        b = latents.shape[0]
        x = rearrange(latents.float(), "b t h w d -> (b t) d h w")
        f = rearrange(self.frame_in(x), "(b t) c h w -> b t c h w", b=b)  # (B, T, hid, h, w)
        before = torch.cat([torch.zeros_like(f[:, :1]), f[:, :-1]], dim=1)  # f(z_{t-1})
        pair = rearrange(torch.cat([f, before], dim=2), "b t c h w -> (b t) c h w")
        e = rearrange(self.encoder(pair), "(b t) c h w -> b c t h w", b=b)  # (B, c, T, h, w)
        codes, ids, aux, stats = self.vq(e)
        return rearrange(codes, "b c t h w -> b t c h w"), ids, aux, stats

    def codes_of(self, tokens: Tensor) -> Tensor:
        """Ids (B, T, h, w) -> code vectors (B, T, c, h, w)."""
        return rearrange(self.vq.indices_to_codes(tokens.long()), "b c t h w -> b t c h w")

    def frame_vectors(self, codes: Tensor) -> Tensor:
        """Codes (B, T, c, h, w) -> one down-sampled vector per frame (B, T, dim)."""
        b = codes.shape[0]
        small = self.down(rearrange(codes, "b t c h w -> (b t) c h w"))  # (B T, S, h/s, w/s)
        return self.down_proj(rearrange(small, "(b t) c h w -> b t (c h w)", b=b))

    def states(self, codes: Tensor) -> Tensor:
        """h_t of every frame of codes (B, T, c, h, w) -> (B, T, dim): h_0 the start state, h_t
        the temporal transformer's output at frame t - 1 (frames < t only)."""
        out = self.temporal(self.frame_vectors(codes))  # (B, T, dim): frames <= t
        start = self.start_state.to(out.dtype).expand(out.shape[0], 1, -1)  # (B, 1, dim)
        return torch.cat([start, out[:, :-1]], dim=1)

    def state_map(self, state: Tensor) -> Tensor:
        """States (B, T, dim) -> maps on the token grid (B, T, S, h, w)."""
        b = state.shape[0]
        small = rearrange(
            self.up_proj(state), "b t (c h w) -> (b t) c h w", h=self.small[0], w=self.small[1]
        )  # (B T, S, h/s, w/s)
        return rearrange(self.up(small), "(b t) c h w -> b t c h w", b=b)

    def decode_codes(self, codes: Tensor, up: Tensor) -> Tensor:
        """Codes (B, T, c, h, w) + state maps (B, T, S, h, w) -> latents (B, T, h, w, D)."""
        b = codes.shape[0]
        x = rearrange(torch.cat([codes, up.to(codes.dtype)], dim=2), "b t c h w -> (b t) c h w")
        return rearrange(self.decoder(x), "(b t) d h w -> b t h w d", b=b)

    def frame_actions(self, sets: Tensor, num_frames: int) -> Tensor:
        """Action conditioning per frame (B, T, prior_dim): the start embedding for frame 0,
        the embedding of sets[:, t - 1] (B, >= T - 1, A) for frame t."""
        b = sets.shape[0]
        start = self.start_action.expand(b, 1, -1)  # (B, 1, pd)
        return torch.cat([start, self.action_emb(sets[:, : num_frames - 1])], dim=1)

    def prior_hidden(self, tokens: Tensor, state: Tensor, up: Tensor, act: Tensor) -> Tensor:
        """Prior features (B, T, N, prior_dim) of ids (B, T, N) (mask id allowed), each frame
        from its state (B, T, dim), state map (B, T, S, h, w) and action (B, T, prior_dim)."""
        b, t = tokens.shape[:2]
        x = self.token_emb(tokens) + rearrange(
            self.state_in(up.flatten(0, 1)), "f c h w -> f (h w) c"
        ).view(b, t, self.num_tokens, -1)  # (B, T, N, pd)
        cond = act + self.state_cond(state)  # (B, T, pd)
        hidden = self.prior(
            x.flatten(0, 1)[:, None], cond.flatten(0, 1)[:, None]
        )  # (B T, 1, N, pd)
        return hidden.view(b, t, self.num_tokens, -1)

    # ------------------------------------------------------------------ interface
    def encode(self, latents: Tensor) -> Tensor:
        """Frame latents (B, T, h, w, D) -> this model's codes (B, T, h, w) long."""
        self._check_latents(latents)
        return self.quantize(latents)[1]

    def decode_latents(self, tokens: Tensor, context: Tensor | None = None) -> Tensor:
        """Codes (B, T, h, w), after the context codes (B, c, h, w) (None: none) ->
        reconstructed latents (B, T, h, w, D) of `tokens`' frames."""
        self._check_codes(tokens)
        t = tokens.shape[1]
        if context is not None and context.shape[1] > 0:
            self._check_codes(context, "context")
            tokens = torch.cat([context.to(tokens), tokens], dim=1)  # (B, c + T, h, w)
        codes = self.codes_of(tokens)  # (B, c + T, c, h, w)
        state = self.states(codes)[:, -t:]  # (B, T, dim)
        return self.decode_codes(codes[:, -t:], self.state_map(state))

    @torch.no_grad()
    def decode_pixels(
        self, tokenizer: nn.Module, tokens: Tensor, context: Tensor | None = None
    ) -> Tensor:
        """Codes (B, T, h, w) after `context` (B, c, h, w) -> video (B, C, T, H, W) in [-1, 1]
        through the frozen tokenizer, each frame alone (the pipeline encoded them alone); its
        decoder reads quantized latents, so the latents go through its quantizer first."""
        b = tokens.shape[0]
        z = self.decode_latents(tokens, context)  # (B, T, h, w, D)
        z = rearrange(z, "b t h w d -> (b t) d 1 h w")  # every frame its own 1-frame clip
        codes = tokenizer.quantize(z.float())[0]
        video = tokenizer.decode(codes).float().clamp(-1.0, 1.0)  # (B T, C, 1, H, W)
        return rearrange(video, "(b t) c 1 h w -> b c t h w", b=b)

    def logits(self, tokens: Tensor, actions: Tensor) -> Tensor:
        """Prior logits (B, T, h, w, K) of every frame of codes (B, T, h, w), each with all of
        its own codes masked, from the frames before it and its action (ids or sets). For tests
        and analysis: frame t's logits depend on frames < t and actions[:, t - 1] only."""
        self._check_codes(tokens)
        b, t = tokens.shape[:2]
        sets = action_sets(actions, self.num_actions, t)
        state = self.states(self.codes_of(tokens))  # (B, T, dim)
        masked = torch.full((b, t, self.num_tokens), self.mask_id, device=tokens.device)
        hidden = self.prior_hidden(
            masked, state, self.state_map(state), self.frame_actions(sets, t)
        )
        return rearrange(self.head(hidden), "b t (h w) k -> b t h w k", h=self.grid[0])

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Prior cross-entropy on masked codes + latent reconstruction + VQ commitment.

        batch: `latents` (B, T, h, w, D) float (the pipeline's) or `tokens` (B, T, h, w) = this
        model's codes (then the prior only); `actions` ids (B, T) or sets (B, T, A); optional
        `mask` (B, T) bool (padding frames out of every term).
        """
        actions = batch["actions"]
        metrics: dict[str, Tensor] = {}
        if "latents" in batch:
            latents = batch["latents"]
            self._check_latents(latents)
            b, t = latents.shape[:2]
        elif "tokens" in batch:
            tokens = batch["tokens"]
            self._check_codes(tokens)
            b, t = tokens.shape[:2]
        else:
            raise ValueError(f"batch needs 'latents' or 'tokens', got keys {sorted(batch)}")
        if t > self.max_frames:
            raise ValueError(f"clips of T={t} frames exceed max_frames={self.max_frames}")
        if actions.shape[:2] != (b, t):
            raise ValueError(f"actions must be (B, T, ...)=({b}, {t}), got {tuple(actions.shape)}")
        mask = batch.get("mask")
        real = torch.ones(b, t, dtype=torch.bool, device=actions.device)
        if mask is not None:
            real = mask.bool().to(actions.device)
        sets = used_action_sets(actions, real, self.num_actions)  # (B, T, A)

        loss = torch.zeros((), device=actions.device)
        if "latents" in batch:
            z = latents.float()
            codes, tokens, aux, stats = self.quantize(z)  # (B, T, c, h, w), (B, T, h, w)
        else:
            codes = self.codes_of(tokens)
        # the state reads the codes as given: the encoder learns from reconstruction only
        state = self.states(codes.detach())  # (B, T, dim)
        up = self.state_map(state)  # (B, T, S, h, w)
        if "latents" in batch:
            z_hat = self.decode_codes(codes, up)  # (B, T, h, w, D)
            w = real.float()
            per_frame = (z_hat - z).pow(2).mean(dim=(2, 3, 4))  # (B, T)
            rec = (per_frame * w).sum() / w.sum().clamp_min(1.0)
            loss = loss + self.rec_weight * rec + self.quantizer_weight * aux
            metrics.update(
                {
                    "rec_mse": rec.detach(),
                    # share of the latents' variance the codes and state do not explain
                    "rec_rel": (rec / z[real].var().clamp_min(1e-8)).detach(),
                    "quantizer_loss": aux.detach().float(),
                    "codebook/usage": stats["usage"],
                    "codebook/perplexity": stats["perplexity"],
                }
            )

        x = rearrange(tokens.long(), "b t h w -> b t (h w)")
        x = torch.where(real[:, :, None], x, 0)  # padding frames: any valid id
        rate = torch.empty(b, 1, 1, device=x.device).uniform_(
            self.mask_rate_min, self.mask_rate_max
        )
        masked = draw_mask(rate, x.shape, self.grid, self.mask_strategy)  # (B, T, N)
        masked &= real[:, :, None]
        if not bool(masked.any()):
            masked[:, -1, 0] = real[:, -1]  # a degenerate draw: predict one token, not nothing
        hidden = self.prior_hidden(
            x.masked_fill(masked, self.mask_id), state, up, self.frame_actions(sets, t)
        )  # (B, T, N, pd)
        if not bool(masked.any()):  # all padding: a zero loss, not NaN
            zero = hidden.sum() * 0.0
            metrics.update({"ce": zero.detach(), "masked_acc": zero.detach()})
            return loss + zero, metrics
        ce, ce_metrics = masked_ce(self.head, hidden, x, masked, self.label_smoothing)
        metrics.update(ce_metrics)
        metrics["mask_rate"] = masked.float().sum() / (real.sum() * self.num_tokens).clamp_min(1)
        return loss + ce, metrics

    # ------------------------------------------------------------------ sampling
    def new_cache(self, tokens: Tensor, actions: Tensor) -> TecoCache:
        """Commit context codes (B, L, h, w) to a cache (the state reads codes only; `actions`
        (B, >= L - 1[, A]) is checked for the interface)."""
        self._check_codes(tokens, "tokens_context")
        b, length = tokens.shape[:2]
        if actions.shape[0] != b or actions.dim() < 2 or actions.shape[1] < length - 1:
            raise ValueError(
                f"actions must be (B, >= L-1)=({b}, {length - 1}) for {length} context frames, "
                f"got {tuple(actions.shape)}"
            )
        start = self.start_state.expand(b, -1)
        cache = TecoCache(tokens=tokens[:, :0].long(), kv=self.temporal.new_cache(), state=start)
        self._advance(cache, tokens.long())
        return cache

    def _advance(self, cache: TecoCache, tokens: Tensor) -> Tensor:
        """Bring `cache` up to the context codes (B, t, h, w): the temporal transformer runs on
        the frames it lacks only. Returns the state of frame t (B, dim)."""
        n, t = cache.length, tokens.shape[1]
        if (
            n > t
            or cache.tokens.shape[0] != tokens.shape[0]
            or not torch.equal(cache.tokens, tokens[:, :n])
        ):
            raise ValueError(
                "cache does not match tokens_context (it must hold a prefix of this context); "
                "pass cache=None to start a new one"
            )
        if n < t:
            new = self.frame_vectors(self.codes_of(tokens[:, n:]))  # (B, t - n, dim)
            cache.state = self.temporal(new, cache.kv)[:, -1]  # (B, dim)
            cache.tokens = tokens.clone()
        return cache.state

    def context_state(self, tokens: Tensor) -> Tensor:
        """State of the frame after codes (B, t, h, w), without a cache -> (B, dim)."""
        if tokens.shape[1] == 0:
            return self.start_state.expand(tokens.shape[0], -1)
        return self.temporal(self.frame_vectors(self.codes_of(tokens)))[:, -1]

    @torch.no_grad()
    def generate_next(
        self,
        tokens_context: Tensor,
        actions: Tensor,
        cache: TecoCache | None = None,
        steps: int = 8,
        temperature: float = 1.0,
        schedule: str = "cosine",
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        confidence_noise: float = 0.0,
    ) -> Tensor:
        """Sample the frame after `tokens_context` (B, t, h, w) -> codes (B, h, w) long.

        `actions` ids (B, >= t) or sets (B, >= t, A): actions[:, t-1] drives the new frame. The
        context may be any length (the state attends to its last `state_window` frames).
        `cache`: a `TecoCache` over a prefix of this context (from `new_cache` or an earlier
        call), extended in place; `use_cache=False` re-runs the temporal transformer over the
        whole context (reference path). MaskGIT decoding in `steps` passes of the prior: sample
        every masked code (Gumbel-max at `temperature`, 0 = greedy), keep the most confident,
        re-mask the rest following `schedule`; `confidence_noise` > 0 adds MaskGIT's annealed
        Gumbel noise to the confidences.
        """
        self._check_codes(tokens_context, "tokens_context")
        b, t = tokens_context.shape[:2]
        if t < 1:
            raise ValueError("generate_next needs at least one context frame")
        if actions.shape[0] != b or actions.dim() < 2 or actions.shape[1] < t:
            raise ValueError(
                f"actions must be (B, >= t)=({b}, {t}) for a {t}-frame context, "
                f"got {tuple(actions.shape)}"
            )
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        sets = action_sets(actions[:, t - 1 : t], self.num_actions)  # (B, 1, A)
        if use_cache:
            if cache is None:
                cache = self.new_cache(tokens_context, actions)
            state = self._advance(cache, tokens_context.long())
        else:
            state = self.context_state(tokens_context.long())
        state = state[:, None]  # (B, 1, dim)
        up = self.state_map(state)  # (B, 1, S, h, w)
        act = self.action_emb(sets)  # (B, 1, pd)
        return self._maskgit(
            state, up, act, steps, temperature, schedule, generator, confidence_noise
        )

    def _maskgit(
        self,
        state: Tensor,
        up: Tensor,
        act: Tensor,
        steps: int,
        temperature: float,
        schedule: str,
        generator: torch.Generator | None,
        confidence_noise: float,
    ) -> Tensor:
        """One frame (B, h, w) decoded by the prior in `steps` passes from its state (B, 1, dim),
        state map (B, 1, S, h, w) and action conditioning (B, 1, pd)."""
        frame = maskgit_fill(
            lambda frame: self.prior_hidden(frame[:, None], state, up, act)[:, 0],  # (B, N, pd)
            self.head,
            (state.shape[0], self.num_tokens),
            self.mask_id,
            steps,
            temperature,
            schedule,
            generator,
            confidence_noise,
            state.device,
            gumbel_max=True,
        )  # (B, N)
        return rearrange(frame, "b (h w) -> b h w", h=self.grid[0])

    @torch.no_grad()
    def rollout(
        self,
        context_tokens: Tensor,
        actions: Tensor,
        horizon: int,
        steps: int = 8,
        temperature: float = 1.0,
        schedule: str = "cosine",
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        confidence_noise: float = 0.0,
    ) -> Tensor:
        """Generate `horizon` frames after context codes (B, t0, h, w) -> (B, horizon, h, w).

        actions ids (B, >= t0 + horizon - 1) or sets (B, ..., A): actions[:, i] is taken after
        frame i. Any horizon: the cache keeps the last `state_window` frames' keys/values, so
        each frame costs one temporal-transformer position and `steps` prior passes.
        """
        self._check_codes(context_tokens, "context_tokens")
        b, t0 = context_tokens.shape[:2]
        need = check_rollout_actions(actions, b, t0, horizon)
        sets = action_sets(actions, self.num_actions, need)  # (B, need, A)
        frames = context_tokens.long()
        cache = self.new_cache(frames, sets) if use_cache else None
        out = []
        for _ in range(horizon):
            t = frames.shape[1]
            frame = self.generate_next(
                frames,
                sets[:, :t],
                cache=cache,
                steps=steps,
                temperature=temperature,
                schedule=schedule,
                generator=generator,
                use_cache=use_cache,
                confidence_noise=confidence_noise,
            )  # (B, h, w)
            out.append(frame)
            frames = torch.cat([frames, frame[:, None]], dim=1)  # (B, t + 1, h, w)
        return torch.stack(out, dim=1)
