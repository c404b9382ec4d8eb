"""Phenaki's masked video transformer: MaskGIT over (T, h, w) video tokens, conditioned on text.

Model (Villegas et al., 2022, "Phenaki"; MaskGIT, Chang et al., 2022): token ids of every frame
(plus one mask id) are embedded with learned space and time positions and run through
`PhenakiBlock`s -- spatial self-attention within a frame (the shared `Attention` with a
relative-position bias), bidirectional temporal self-attention per spatial position, cross-attention
from every video token to the text, MLP -- and a linear head predicts the token ids.

Text: `text_encoder="minilm"` reads the frozen all-MiniLM-L6-v2 token features (see
`models/text.py`; projected to the model width), `"trainable"` a small byte-level encoder trained
with the model. A batch gives its captions as `text` (a (B, L) byte-id tensor from
`text.encode_bytes`) or, for the captioned procgen data, through its joint action ids
(`games` names the games; `data/captions.py` renders "<game>, <motion>").

`video_frame_mask` (B, T) bool (the batch's `mask` when no `video_frame_mask` is given): padded
frames of shorter clips -- or frames 1.. of an image in image/video co-training -- get no loss and
no other frame attends to them (a temporal key mask), so their token ids change nothing.

Classifier-free guidance: in training, each clip's text is replaced by a learned null context with
probability `cond_drop_prob`; in sampling, logits = uncond + cond_scale * (cond - uncond)
(`cond_scale=1` runs the conditional pass alone: plain conditional sampling).

Training mask (MaskGIT): per clip a masked fraction r = cos(pi/2 * u), u ~ U(0, 1), of the tokens
of the real frames; with probability `prime_prob` the first k ~ U{1..T-1} frames stay unmasked,
which teaches continuing a video from its first frames (Phenaki's conditioning on past tokens).
Which tokens hide: `mask_strategy` (random | block | multiscale, see `models/masking.py`).

Sampling (`sample`): all tokens of the frames after the `prime_tokens` start masked; each of
`steps` iterations samples every masked token, then re-masks the number the schedule leaves
masked. What to re-mask: `critic=None` -- the newly sampled tokens the generator was least sure of
(MaskGIT; committed tokens stay); `critic="self"` -- every generated token, scored by the
generator's own probability of it given the whole current video (committed ones can be
re-masked); `critic=TokenCritic` -- every generated token, scored by a separate critic trained to
tell re-sampled tokens from real ones (Lezama et al., 2022, "Token-Critic"). `rollout` /
`generate_next` give the world-model interface of `models/dynamics.py` (the text comes from
`text=` or from the actions' captions).

Primed frames are context, not output: in training (when the first k frames are kept) and in
sampling they attend to each other only, while the frames after them attend to every real frame
(`prime_time_mask`). Their keys and values therefore do not depend on the frames being generated:
`sample` encodes the prime frames once (`PrimeCache`) and each MaskGIT step runs the new frames
alone, which makes continuing a video -- and every frame of a rollout, primed on the frames
before it -- cost the new frames only (`use_cache=False` runs the whole clip at every step, the
reference path; both give the same tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from omegaconf import DictConfig
from timm.layers import Mlp
from torch import Tensor, nn

from worldmodel.data.captions import captions_from_actions
from worldmodel.models.dynamics import SCHEDULES, masked_counts
from worldmodel.models.interfaces import TokenModel, WorldModel
from worldmodel.models.masking import (
    check_mask_strategy,
    draw_mask,
    mask_strategy_problems,
    masked_ce,
)
from worldmodel.models.sampling import gumbel_noise
from worldmodel.models.st_transformer import (
    Attention,
    RelativePositionBias,
    STTransformer,
    init_weights,
)
from worldmodel.models.text import (
    TEXT_ENCODERS,
    ByteTextEncoder,
    MiniLMTextEncoder,
    decode_bytes,
)

CRITICS = (None, "self")  # or a TokenCritic instance


class ContextAttention(nn.Module):
    """Attention of queries x (S, Lq, D) over a context (S, Lk, Dc) whose keys are masked by
    `key_mask` (S, Lk) bool (True = attend). Serves as temporal self-attention over the real
    frames (context = x) and as cross-attention to the text."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        key_mask: Tensor,
        past: tuple[Tensor, Tensor] | None = None,
        record: list[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """`key_mask` (S, Lk) or per query (S, Lq, Lk); `past`: keys and values (S, h, Lp, d)
        read before the context's own (Lk = Lp + context length); `record` collects the
        context's keys and values."""
        q = rearrange(self.to_q(x), "s l (h d) -> s h l d", h=self.heads)
        k, v = rearrange(self.to_kv(context), "s l (two h d) -> two s h l d", two=2, h=self.heads)
        if record is not None:
            record.append((k, v))
        if past is not None:
            k, v = (
                torch.cat([past[0].to(k.dtype), k], dim=2),
                torch.cat([past[1].to(v.dtype), v], 2),
            )
        # (S, 1, 1 | Lq, Lk): broadcast over heads (and queries)
        mask = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]
        if q.dtype != k.dtype:  # under autocast the context may arrive in fp32
            k, v = k.to(q.dtype), v.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(rearrange(out, "s h l d -> s l (h d)"))


class PhenakiBlock(nn.Module):
    """Pre-norm block on (B, T, N, D): spatial attention, masked bidirectional temporal attention,
    cross-attention to the text, MLP."""

    def __init__(
        self,
        dim: int,
        heads: int,
        grid: tuple[int, int],
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        rel_pos_bias: bool = True,
    ) -> None:
        super().__init__()
        self.rel_bias = RelativePositionBias(grid, heads) if rel_pos_bias else None
        self.norm_space = nn.LayerNorm(dim)
        self.attn_space = Attention(dim, heads, proj_dropout=dropout)
        self.norm_time = nn.LayerNorm(dim)
        self.attn_time = ContextAttention(dim, heads)
        self.norm_text = nn.LayerNorm(dim)
        self.attn_text = ContextAttention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=dropout)

    def forward(
        self,
        x: Tensor,
        frame_mask: Tensor,
        text: Tensor,
        text_mask: Tensor,
        time_mask: Tensor | None = None,
        past: tuple[Tensor, Tensor] | None = None,
        record: list[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """x (B, T, N, D), frame_mask (B, Tp + T) bool over the `past` frames (cached temporal
        keys/values, Tp of them) and x's, text (B, L, D), text_mask (B, L) bool; `time_mask`
        (B, T, T) bool: which frames each frame may read (None = every real frame)."""
        b, t, n, _ = x.shape
        h = rearrange(self.norm_space(x), "b t n d -> (b t) n d")
        h = self.attn_space(h, bias=None if self.rel_bias is None else self.rel_bias())
        x = x + rearrange(h, "(b t) n d -> b t n d", b=b)

        h = rearrange(self.norm_time(x), "b t n d -> (b n) t d")
        if time_mask is None:
            keys = repeat(frame_mask, "b t -> (b n) t", n=n)  # padded frames are never read
        else:
            keys = repeat(time_mask & frame_mask[:, None], "b q k -> (b n) q k", n=n)
        h = self.attn_time(h, h, keys, past, record)
        x = x + rearrange(h, "(b n) t d -> b t n d", b=b)

        h = rearrange(self.norm_text(x), "b t n d -> b (t n) d")
        h = self.attn_text(h, text, text_mask)
        x = x + rearrange(h, "b (t n) d -> b t n d", t=t)
        return x + self.mlp(self.norm_mlp(x))


@dataclass
class TextContext:
    """Encoded captions for cross-attention: features (B, L, D), mask (B, L), and the strings."""

    features: Tensor
    mask: Tensor
    texts: list[str]


@dataclass
class PrimeCache:
    """Temporal keys and values (per block, each (B N, heads, K, d)) of K prime frames."""

    kv: list[tuple[Tensor, Tensor]]
    frames: int


def prime_time_mask(prime: Tensor, t: int) -> Tensor:
    """(B, T, T) bool: frame i may read frame j unless i is a prime frame and j is not
    (`prime` (B,) long: the number of leading prime frames of each clip, 0 = none)."""
    idx = torch.arange(t, device=prime.device)
    query_free = idx[None, :, None] >= prime[:, None, None]  # (B, T, 1): not a prime frame
    key_prime = idx[None, None, :] < prime[:, None, None]  # (B, 1, T): a prime frame
    return query_free | key_prime | torch.eye(t, dtype=torch.bool, device=prime.device)


def sample_tokens(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Token ids from logits (..., V): softmax(logits / temperature) sampled by inverse CDF with
    one uniform per token (reproducible under `generator`); temperature 0 = argmax."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    u = torch.rand((*probs.shape[:-1], 1), generator=generator, device=probs.device)
    ids = torch.searchsorted(probs.cumsum(dim=-1), u)[..., 0]
    return ids.clamp_max(logits.shape[-1] - 1)  # the cumsum may end just below u


class PhenakiModel(nn.Module, WorldModel):
    """Text-conditioned MaskGIT video transformer (Phenaki's generator over video tokens)."""

    conditioning = "text"

    def __init__(
        self,
        vocab_size: int = 1000,
        grid: list[int] | tuple[int, int] = (8, 8),
        max_frames: int = 16,
        num_actions: int = 60,
        games: list[str] | None = None,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        rel_pos_bias: bool = True,
        text_encoder: str = "trainable",
        text_encoder_path: str | None = None,
        text_dim: int = 128,
        text_depth: int = 2,
        text_max_len: int = 64,
        cond_drop_prob: float = 0.1,
        prime_prob: float = 0.3,
        label_smoothing: float = 0.0,
        mask_strategy: str = "random",
    ) -> None:
        super().__init__()
        if len(grid) != 2:
            raise ValueError(f"grid must be [h, w], got {grid}")
        if text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder={text_encoder!r}; choose one of {TEXT_ENCODERS}")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob={cond_drop_prob} must be in [0, 1)")
        if not 0.0 <= prime_prob <= 1.0:
            raise ValueError(f"prime_prob={prime_prob} must be in [0, 1]")
        check_mask_strategy(mask_strategy, (int(grid[0]), int(grid[1])))
        self.mask_strategy = mask_strategy
        self.vocab_size = vocab_size
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_tokens = self.grid[0] * self.grid[1]
        self.max_frames = max_frames
        self.num_actions = num_actions
        self.games = list(games) if games else None
        self.mask_id = vocab_size
        self.cond_drop_prob = cond_drop_prob
        self.prime_prob = prime_prob
        self.label_smoothing = label_smoothing

        self.token_emb = nn.Embedding(vocab_size + 1, dim)
        self.pos_space = nn.Parameter(torch.zeros(self.num_tokens, dim))
        self.pos_time = nn.Parameter(torch.zeros(max_frames, dim))
        if text_encoder == "minilm":
            # frozen, outside the state_dict: see MiniLMTextEncoder
            self.text_encoder = MiniLMTextEncoder(text_encoder_path)
            encoder_dim = MiniLMTextEncoder.dim
        else:
            self.text_encoder = ByteTextEncoder(text_dim, text_depth, heads, text_max_len)
            encoder_dim = text_dim
        self.text_proj = nn.Linear(encoder_dim, dim)
        self.null_text = nn.Parameter(torch.zeros(1, dim))  # the "no text" context of CFG
        self.blocks = nn.ModuleList(
            PhenakiBlock(dim, heads, self.grid, mlp_ratio, dropout, rel_pos_bias)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        for m in (self.token_emb, self.text_proj, self.blocks, self.head):
            m.apply(init_weights)
        for p in (self.pos_space, self.pos_time, self.null_text):
            nn.init.trunc_normal_(p, std=0.02)

    @staticmethod
    def check_config(model: DictConfig, data: DictConfig, ev: DictConfig) -> list[str]:
        """What `validate` reports about this model's config: the training mask's strategy."""
        strategy = model.get("mask_strategy", "random")
        return mask_strategy_problems(strategy, list(model.get("grid") or (8, 8)))

    # ------------------------------------------------------------------ text
    def encode_text(self, texts: list[str]) -> TextContext:
        """Captions -> cross-attention context (B, L, D) and its mask (B, L)."""
        if not isinstance(texts, list | tuple) or not texts:
            raise ValueError(f"text must be a non-empty list of strings, got {texts!r}")
        features, mask = self.text_encoder(list(texts))
        features = self.text_proj(features.to(self.null_text.device))
        return TextContext(features, mask.to(self.null_text.device), list(texts))

    def null_context(self, b: int, length: int = 1) -> tuple[Tensor, Tensor]:
        """The learned unconditional context, (B, length, D) with only position 0 attended."""
        features = self.null_text.new_zeros(b, length, self.null_text.shape[-1])
        features[:, 0] = self.null_text[0]
        mask = torch.zeros(b, length, dtype=torch.bool, device=features.device)
        mask[:, 0] = True
        return features, mask

    def texts_of(self, batch: dict[str, Tensor]) -> list[str]:
        """A batch's captions: its `text` byte ids, or the captions of its joint action ids."""
        if "text" in batch:
            return decode_bytes(batch["text"])
        if self.games is None:
            raise ValueError(
                "the batch has no `text` and model.games is not set, so captions cannot be "
                "rendered from its actions (use data=procgen_captions or pass text)"
            )
        return captions_from_actions(batch["actions"], self.games, batch.get("mask"))

    # ------------------------------------------------------------------ model
    def _check_tokens(self, tokens: Tensor, name: str = "tokens") -> None:
        if tokens.dim() != 4 or tuple(tokens.shape[2:]) != self.grid:
            raise ValueError(
                f"{name} must be (B, T, h, w) with (h, w) = the model's grid {self.grid}, "
                f"got shape {tuple(tokens.shape)}"
            )
        if tokens.shape[1] > self.max_frames:
            raise ValueError(
                f"{name} has {tokens.shape[1]} frames, more than max_frames={self.max_frames}"
            )

    def forward(
        self,
        tokens: Tensor,
        context: Tensor,
        context_mask: Tensor,
        frame_mask: Tensor,
        time_mask: Tensor | None = None,
        cache: PrimeCache | None = None,
        record: list[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """Hidden states (B, T, N, D) of token ids (B, T, N) (mask id allowed) given the text
        context (B, L, D) / (B, L) and the real frames (B, T); `head` maps them to logits.

        `time_mask` (B, T, T): which frames each frame reads (`prime_time_mask`). With `cache`
        (K prime frames) `tokens` are the frames after them (positions K..) and `frame_mask`
        (B, K + T) covers both; `record` collects every block's temporal keys and values."""
        t0 = 0 if cache is None else cache.frames
        t = tokens.shape[1]
        x = self.token_emb(tokens) + self.pos_space + self.pos_time[t0 : t0 + t, None]
        for i, block in enumerate(self.blocks):
            past = None if cache is None else cache.kv[i]
            x = block(x, frame_mask, context, context_mask, time_mask, past, record)
        return self.norm(x)  # (B, T, N, D)

    def all_logits(
        self,
        tokens: Tensor,
        context: Tensor,
        context_mask: Tensor,
        frame_mask: Tensor,
        time_mask: Tensor | None = None,
        cache: PrimeCache | None = None,
    ) -> Tensor:
        """Logits (B, T, N, V) of every position (arguments as in `forward`)."""
        return self.head(self.forward(tokens, context, context_mask, frame_mask, time_mask, cache))

    def _guidance_batch(self, text: TextContext, cond_scale: float) -> tuple[Tensor, Tensor, int]:
        """(features, mask, copies): the text alone, or text then null context (guidance)."""
        if cond_scale == 1.0:
            return text.features, text.mask, 1
        b, length = text.features.shape[:2]
        null, null_mask = self.null_context(b, length)
        return torch.cat([text.features, null]), torch.cat([text.mask, null_mask]), 2

    def guided_logits(
        self,
        tokens: Tensor,
        text: TextContext,
        frame_mask: Tensor,
        cond_scale: float = 1.0,
        time_mask: Tensor | None = None,
        cache: PrimeCache | None = None,
    ) -> Tensor:
        """Classifier-free guided logits (B, T, N, V): uncond + cond_scale * (cond - uncond).

        The conditional and unconditional passes run as one batch of 2B (a `cache` must hold
        the prime frames of both: `prime_cache(..., cond_scale)`); cond_scale=1 runs the
        conditional pass alone.
        """
        features, mask, copies = self._guidance_batch(text, cond_scale)
        logits = self.all_logits(
            torch.cat([tokens] * copies),
            features,
            mask,
            torch.cat([frame_mask] * copies),
            None if time_mask is None else torch.cat([time_mask] * copies),
            cache,
        ).float()
        if copies == 1:
            return logits
        cond, uncond = logits.chunk(2)
        return uncond + cond_scale * (cond - uncond)

    @torch.no_grad()
    def prime_cache(
        self, prime: Tensor, text: TextContext, frame_mask: Tensor, cond_scale: float = 1.0
    ) -> PrimeCache:
        """Encode K prime frames (B, K, N) once: their temporal keys/values in every block
        (prime frames read only each other, so the frames after them cannot change these)."""
        features, mask, copies = self._guidance_batch(text, cond_scale)
        record: list[tuple[Tensor, Tensor]] = []
        self.forward(
            torch.cat([prime] * copies),
            features,
            mask,
            torch.cat([frame_mask] * copies),
            record=record,
        )
        return PrimeCache(record, prime.shape[1])

    def logits(
        self,
        tokens: Tensor,
        text: list[str] | TextContext,
        frame_mask: Tensor | None = None,
        cond_scale: float = 1.0,
    ) -> Tensor:
        """Logits (B, T, h, w, V) of token ids (B, T, h, w) (mask id allowed) for captions."""
        self._check_tokens(tokens)
        b, t = tokens.shape[:2]
        ctx = text if isinstance(text, TextContext) else self.encode_text(text)
        if frame_mask is None:
            frame_mask = torch.ones(b, t, dtype=torch.bool, device=tokens.device)
        x = rearrange(tokens.long(), "b t h w -> b t (h w)")
        if cond_scale == 1.0:
            out = self.all_logits(x, ctx.features, ctx.mask, frame_mask.bool())
        else:
            out = self.guided_logits(x, ctx, frame_mask.bool(), cond_scale)
        return rearrange(out, "b t (h w) v -> b t h w v", h=self.grid[0])

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        tokens = batch["tokens"]
        self._check_tokens(tokens)
        b, t = tokens.shape[:2]
        frame_mask = batch.get("video_frame_mask", batch.get("mask"))
        real = (
            torch.ones(b, t, dtype=torch.bool, device=tokens.device)
            if frame_mask is None
            else frame_mask.bool()
        )
        if not bool(real.any(dim=1).all()):
            raise ValueError("video_frame_mask: every clip needs at least one real frame")
        x = rearrange(tokens.long(), "b t h w -> b t (h w)")
        x = torch.where(real[:, :, None], x, 0)  # padded frames: any valid id (never read)
        bad = (x < 0) | (x >= self.vocab_size)
        if bool(bad.any()):
            raise ValueError(f"tokens must be in [0, {self.vocab_size}), got {x[bad][:5].tolist()}")

        ctx = self.encode_text(self.texts_of(batch))
        features, mask = ctx.features, ctx.mask
        if self.training and self.cond_drop_prob > 0:
            drop = torch.rand(b, device=x.device) < self.cond_drop_prob
            null, null_mask = self.null_context(b, features.shape[1])
            features = torch.where(drop[:, None, None], null, features)
            mask = torch.where(drop[:, None], null_mask, mask)

        # MaskGIT: a cosine-distributed masked fraction per clip
        u = torch.rand(b, 1, 1, device=x.device)
        rate = torch.cos(math.pi / 2 * u)
        masked = draw_mask(rate, x.shape, self.grid, self.mask_strategy)  # (B, T, N)
        primed = torch.rand(b, device=x.device) < self.prime_prob
        k = torch.randint(1, max(t, 2), (b,), device=x.device)
        keep = (torch.arange(t, device=x.device)[None] < k[:, None]) & primed[:, None]  # (B, T)
        masked &= ~keep[:, :, None] & real[:, :, None]
        if not bool(masked.any()):
            masked[:, -1, 0] = real[:, -1]  # a degenerate draw: predict one token, not none
            if not bool(masked.any()):
                masked[0, 0, 0] = True
        time_mask = prime_time_mask(torch.where(primed, k, 0), t)  # prime frames read primes
        hidden = self.forward(x.masked_fill(masked, self.mask_id), features, mask, real, time_mask)
        # the head on the masked positions, padded to a few fixed sizes (see models/masking.py)
        ce, metrics = masked_ce(self.head, hidden, x, masked, self.label_smoothing)
        metrics["mask_rate"] = masked.float().sum() / (real.sum() * self.num_tokens)
        return ce, metrics

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        text: list[str] | TextContext,
        num_frames: int | None = None,
        prime_tokens: Tensor | None = None,
        steps: int = 8,
        temperature: float = 1.0,
        cond_scale: float = 1.0,
        critic: str | nn.Module | None = None,
        schedule: str = "cosine",
        generator: torch.Generator | None = None,
        confidence_noise: float = 0.0,
        use_cache: bool = True,
    ) -> Tensor:
        """Generate a video (B, num_frames, h, w) for captions; the first K frames are
        `prime_tokens` (B, K, h, w), kept as given (video continuation).

        `critic`: None (confidence), "self" or a `TokenCritic` (see the module docstring).
        `confidence_noise` > 0 adds MaskGIT's annealed Gumbel noise to the re-mask scores.
        `use_cache`: encode the prime frames once (`PrimeCache`) and run only the new frames at
        each step; False runs the whole clip every step (same tokens).
        """
        ctx = text if isinstance(text, TextContext) else self.encode_text(text)
        b = ctx.features.shape[0]
        num_frames = self.max_frames if num_frames is None else int(num_frames)
        k = 0 if prime_tokens is None else prime_tokens.shape[1]
        if not k < num_frames <= self.max_frames:
            raise ValueError(
                f"num_frames={num_frames} must be in ({k}, max_frames={self.max_frames}] "
                f"after {k} prime frames"
            )
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
        if not (critic in CRITICS or isinstance(critic, TokenCritic)):
            raise ValueError(f"critic={critic!r}: expected None, 'self' or a TokenCritic")
        device = self.null_text.device
        x = torch.full((b, num_frames, self.num_tokens), self.mask_id, device=device)
        if prime_tokens is not None:
            self._check_tokens(prime_tokens, "prime_tokens")
            if prime_tokens.shape[0] != b:
                raise ValueError(f"prime_tokens has {prime_tokens.shape[0]} clips for {b} texts")
            x[:, :k] = rearrange(prime_tokens.long().to(device), "b t h w -> b t (h w)")
        frame_mask = torch.ones(b, num_frames, dtype=torch.bool, device=device)
        m = (num_frames - k) * self.num_tokens
        counts = masked_counts(steps, m, schedule)
        cache = time_mask = None
        if k and use_cache:
            cache = self.prime_cache(x[:, :k], ctx, frame_mask[:, :k], cond_scale)
        elif k:
            time_mask = prime_time_mask(torch.full((b,), k, device=device), num_frames)

        def generated_logits(video: Tensor) -> Tensor:
            """(B, M, V) logits of the generated frames' tokens of `video` (B, T, N)."""
            if cache is not None:
                out = self.guided_logits(video[:, k:], ctx, frame_mask, cond_scale, cache=cache)
            else:
                out = self.guided_logits(video, ctx, frame_mask, cond_scale, time_mask)[:, k:]
            return out.reshape(b, m, -1)

        for s in range(steps):
            region = x[:, k:].reshape(b, m)  # (B, M) the generated frames' tokens
            still = region == self.mask_id
            if not bool(still.any()):
                break
            logits = generated_logits(x)  # (B, M, V)
            sampled = sample_tokens(logits, temperature, generator)
            region = torch.where(still, sampled, region)  # commit every masked token
            remask = counts[s + 1]
            if remask > 0:
                probs = F.softmax(logits / temperature if temperature > 0 else logits, dim=-1)
                if critic is None:
                    # MaskGIT: the confidence of the new samples; committed tokens stay
                    score = probs.gather(-1, region[..., None])[..., 0]
                    score = score.masked_fill(~still, float("inf"))
                elif critic == "self":
                    # the generator's own probability of every token given the whole video
                    full = x.clone()
                    full[:, k:] = region.view(b, num_frames - k, -1)
                    again = generated_logits(full)
                    score = F.softmax(again, dim=-1).gather(-1, region[..., None])[..., 0]
                else:
                    full = x.clone()
                    full[:, k:] = region.view(b, num_frames - k, -1)
                    replaced = critic.replaced_prob(full)[:, k:].reshape(b, m)
                    score = 1.0 - replaced
                if confidence_noise > 0:
                    gumbel = gumbel_noise(score.shape, generator, score.device)
                    score = score.clamp_min(1e-20).log()
                    score = score + confidence_noise * (1 - (s + 1) / steps) * gumbel
                lowest = score.topk(remask, dim=-1, largest=False).indices  # (B, remask)
                region = region.scatter(1, lowest, self.mask_id)
            x[:, k:] = region.view(b, num_frames - k, -1)
        return rearrange(x, "b t (h w) -> b t h w", h=self.grid[0])

    # ------------------------------------------------------------------ world-model interface
    def _context_text(
        self, tokens: Tensor, actions: Tensor | None, text: list[str] | TextContext | None
    ) -> TextContext:
        """The text context: `text`, or the caption of all of `actions` (B, T) -- the whole clip's
        actions, context and generated frames alike, as the training captions were rendered."""
        if isinstance(text, TextContext):
            return text
        if text is None:
            if actions is None or actions.shape[1] == 0:
                raise ValueError("pass text= or actions whose captions model.games can render")
            text = self.texts_of({"actions": actions})
        return self.encode_text(list(text))

    def new_cache(
        self, tokens: Tensor, actions: Tensor | None = None, text: list[str] | None = None
    ) -> TextContext:
        """The encoded captions of a context (temporal attention is bidirectional, so past
        frames have no fixed keys/values to keep; the text is what repeats)."""
        return self._context_text(tokens, actions, text)

    @torch.no_grad()
    def generate_next(
        self,
        tokens_context: Tensor,
        actions: Tensor | None = None,
        cache: TextContext | None = None,
        steps: int = 8,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        text: list[str] | None = None,
        **sampling: object,
    ) -> Tensor:
        """The frame after `tokens_context` (B, t, h, w) -> (B, h, w), primed on its last
        max_frames - 1 frames; `sampling`: cond_scale, critic, schedule, confidence_noise."""
        self._check_tokens(tokens_context[:, -(self.max_frames - 1) :], "tokens_context")
        ctx = cache if cache is not None else self._context_text(tokens_context, actions, text)
        prime = tokens_context[:, -(self.max_frames - 1) :]
        video = self.sample(
            ctx,
            prime.shape[1] + 1,
            prime,
            steps=steps,
            temperature=temperature,
            generator=generator,
            **sampling,
        )
        return video[:, -1]

    @torch.no_grad()
    def rollout(
        self,
        tokens_ctx: Tensor,
        actions: Tensor | None,
        horizon: int,
        text: list[str] | None = None,
        **kwargs: object,
    ) -> Tensor:
        """`horizon` frames after tokens_ctx (B, t0, h, w) -> (B, horizon, h, w), one at a time."""
        ctx = self._context_text(tokens_ctx, actions, text)
        frames = tokens_ctx.long()
        out = []
        for _ in range(horizon):
            frame = self.generate_next(frames, cache=ctx, **kwargs)
            out.append(frame)
            frames = torch.cat([frames, frame[:, None]], dim=1)
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def continue_video(
        self,
        tokens: Tensor,
        text: list[str] | TextContext,
        num_frames: int,
        prime_frames: int,
        **sampling: object,
    ) -> Tensor:
        """A new clip of `num_frames` frames (B, num_frames, h, w) whose first `prime_frames`
        frames are the last `prime_frames` frames of `tokens` (B, T, h, w)."""
        if not 0 < prime_frames <= tokens.shape[1]:
            raise ValueError(
                f"prime_frames={prime_frames} must be in [1, {tokens.shape[1]}] (frames given)"
            )
        return self.sample(text, num_frames, tokens[:, -prime_frames:], **sampling)


class TokenCritic(nn.Module, TokenModel):
    """Token-Critic: which tokens of a video were re-sampled? A per-token binary classifier.

    Training (`loss`): real token clips; a cosine-distributed fraction of the tokens of each clip
    is masked and re-sampled -- by the frozen generator named by `generator_checkpoint` (one
    MaskGIT pass at temperature 1, conditioned on the clip's captions), or, without one, by
    uniform random ids -- and the critic learns to say which positions were re-sampled (BCE).
    At sampling, `PhenakiModel.sample(critic=...)` re-masks the tokens it finds most likely
    re-sampled. The generator is kept outside the state_dict (it has its own checkpoint).
    """

    def __init__(
        self,
        vocab_size: int = 1000,
        grid: list[int] | tuple[int, int] = (8, 8),
        max_frames: int = 16,
        dim: int = 64,
        depth: int = 2,
        heads: int = 2,
        num_actions: int | None = None,
    ) -> None:
        super().__init__()
        self.num_actions = num_actions  # of the token clips it reads (checked by the pipeline)
        self.vocab_size = vocab_size
        self.grid = (int(grid[0]), int(grid[1]))
        self.max_frames = max_frames
        self.token_emb = nn.Embedding(vocab_size + 1, dim)  # + the mask id of the generator
        self.transformer = STTransformer(
            dim,
            depth,
            heads,
            self.grid[0] * self.grid[1],
            max_frames,
            causal=False,
            grid=self.grid,
            rel_pos_bias=True,
        )
        self.head = nn.Linear(dim, 1)
        for mod in (self.token_emb, self.head):
            mod.apply(init_weights)
        # the frozen generator is loaded by the pipeline (`model.pipeline.generator_checkpoint`)
        # and handed over through `set_generator`
        self._generator: tuple[PhenakiModel, ...] = ()

    def set_generator(self, generator: PhenakiModel | None) -> None:
        """Re-sample with this (frozen) generator; None = uniform random ids."""
        if generator is not None:
            generator.eval().requires_grad_(False)
        self._generator = (generator,) if generator is not None else ()

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits (B, T, N) that each token of (B, T, N) ids was re-sampled."""
        h = self.transformer(self.token_emb(tokens))  # (B, T, N, D)
        return self.head(h)[..., 0]

    @torch.no_grad()
    def replaced_prob(self, tokens: Tensor) -> Tensor:
        """P(re-sampled) (B, T, N) of token ids (B, T, N)."""
        return torch.sigmoid(self.forward(tokens.long()).float())

    def corrupt(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(re-sampled tokens (B, T, N), which positions were re-sampled (B, T, N))."""
        tokens = batch["tokens"]
        if tokens.dim() != 4 or tuple(tokens.shape[2:]) != self.grid:
            raise ValueError(
                f"tokens must be (B, T, {self.grid[0]}, {self.grid[1]}), got {tuple(tokens.shape)}"
            )
        x = rearrange(tokens.long(), "b t h w -> b t (h w)")
        b = x.shape[0]
        rate = torch.cos(math.pi / 2 * torch.rand(b, 1, 1, device=x.device))  # (B, 1, 1)
        masked = draw_mask(rate, x.shape, self.grid)  # (B, T, N) random, as MaskGIT samples
        with torch.no_grad():
            if self._generator:
                gen = self._generator[0]
                ctx = gen.encode_text(gen.texts_of(batch))
                real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
                logits = gen.all_logits(
                    x.masked_fill(masked, gen.mask_id), ctx.features, ctx.mask, real
                )
                fresh = sample_tokens(logits.float(), 1.0, None)
            else:
                fresh = torch.randint(0, self.vocab_size, x.shape, device=x.device)
        return torch.where(masked, fresh, x), masked

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        inputs, masked = self.corrupt(batch)
        real = batch.get("mask")
        keep = (
            torch.ones_like(masked) if real is None else real.bool()[:, :, None].expand_as(masked)
        )
        logits = self.forward(inputs)[keep].float()
        target = masked[keep].float()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        with torch.no_grad():
            acc = ((logits > 0).float() == target).float().mean()
        return bce, {"bce": bce.detach(), "acc": acc, "replaced_rate": target.mean()}
