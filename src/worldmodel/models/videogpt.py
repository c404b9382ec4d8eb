"""VideoGPT's prior: a GPT over the flattened latent tokens of a clip, conditioned on frames and
actions, usable as a world model over per-frame tokens.

Sequence (Yan et al. 2021): the (T, h, w) token grid is flattened in raster order (frame by
frame, row by row) into L = T h w tokens and modelled autoregressively, p(x_i | x_<i). The input
is shifted right by one start-of-sequence token, and position i carries the embedding of the
position it predicts: learned T, H and W tables summed (`AxisPositions`, shared with the VQ-VAE).
Embedding, attention and residual dropout as in GPT.

Conditioning:
- frames: the first `cond_frames` frames of a clip are the prompt. Their tokens are embedded and
  encoded by a small 3D ResNet (VideoGPT encodes prompt *pixels* with a 3D ResNet; here the
  prompt is the frozen tokenizer's tokens, so the prior trains and samples in the token pipeline
  with no pixels at all), and every block cross-attends to that encoding. The prompt frames are
  not part of the modelled sequence (no loss on them): the sequence is frames cond_frames..T-1.
- actions (or classes): conditional layer norms. Every LayerNorm's gain and bias are predicted
  from the embedding of the action that leads into the frame of the predicted position (VideoGPT
  conditions its norms on a class the same way; a class label is an action constant over a clip).
  `actions[:, t]` is the action taken after frame t, so frame t+1 is conditioned on it and frame
  0 on a learned "start" embedding, as in `models/dynamics.py`.

World-model interface (as `DynamicsModel`, so `eval/world.py` and `task=play` drive it):
`loss(batch)` reports `ce` and `masked_acc` (here: next-token accuracy over all predicted
positions); `generate_next` samples the h w tokens of the next frame one by one (temperature,
optional `top_k`; `steps` is accepted and ignored, there are no MaskGIT iterations);
`rollout` slides a window of `max_frames` frames. Sampling keeps the keys/values of the
committed context positions in a `KVCache`; the tokens of the frame being generated are written
after them and rolled back at the end, so the same cache serves teacher-forced evaluation (where
the next context frame is the real one, not the sample). `use_cache=False` recomputes the whole
sequence for every token (the reference path; same tokens for the same generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import DictConfig
from timm.layers import Mlp
from torch import Tensor, nn

from worldmodel.models.checks import check_action_ids, check_token_ids
from worldmodel.models.dynamics import frame_conditions
from worldmodel.models.interfaces import WorldModel
from worldmodel.models.sampling import sliding_rollout, top_k_filter
from worldmodel.models.st_transformer import Attention, KVCache, init_weights
from worldmodel.models.videogpt_vqvae import AxisPositions, SamePadConv3d


class ConditionalLayerNorm(nn.Module):
    """LayerNorm whose gain and bias are predicted from a conditioning vector (VideoGPT).

    y = LN(x) * (1 + W_g c) + W_b c; without a conditioning width it is a plain LayerNorm.
    """

    def __init__(self, dim: int, cond_dim: int | None) -> None:
        super().__init__()
        self.dim = dim
        # the affine part is the predicted gain/bias when conditional
        self.norm = nn.LayerNorm(dim) if not cond_dim else None
        self.gain = nn.Linear(cond_dim, dim) if cond_dim else None
        self.bias = nn.Linear(cond_dim, dim) if cond_dim else None

    def forward(self, x: Tensor, cond: Tensor | None) -> Tensor:
        """x (B, L, D), cond (B, L, Dc) per position (or None)."""
        if self.norm is not None:
            return self.norm(x)
        y = F.layer_norm(x, (self.dim,))
        if cond is None:
            raise ValueError("this norm is conditional: it needs a conditioning vector")
        return y * (1 + self.gain(cond)) + self.bias(cond)


class CrossAttention(nn.Module):
    """Multi-head attention of queries x (B, L, D) over a memory (B, M, D) (no mask)."""

    def __init__(self, dim: int, heads: int, attn_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        q = rearrange(self.q(x), "b l (h d) -> b h l d", h=self.heads)
        k, v = rearrange(self.kv(memory), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        dropout = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), dropout_p=dropout)
        return self.proj_drop(self.proj(rearrange(out, "b h l d -> b l (h d)")))


class ResBlock3d(nn.Module):
    """Pre-activation 3D residual block: (GroupNorm, SiLU, conv 3^3) x 2 on (B, C, T, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        self.block = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            SamePadConv3d(channels, channels, 3),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            SamePadConv3d(channels, channels, 3),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class FrameEncoder(nn.Module):
    """Prompt frames' tokens (B, Tc, h, w) -> memory (B, Tc h w, D) for cross-attention."""

    def __init__(
        self,
        vocab_size: int,
        channels: int,
        dim: int,
        num_blocks: int,
        sizes: tuple[int, int, int],
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, channels)
        self.blocks = nn.Sequential(*[ResBlock3d(channels) for _ in range(num_blocks)])
        self.pos = AxisPositions(channels, sizes)
        self.out = nn.Linear(channels, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        t, h, w = tokens.shape[1:]
        x = rearrange(self.embed(tokens), "b t h w c -> b c t h w")
        x = rearrange(self.blocks(x), "b c t h w -> b t h w c") + self.pos(t, h, w).to(x.dtype)
        return self.out(rearrange(x, "b t h w c -> b (t h w) c"))  # (B, Tc h w, D)


class GPTBlock(nn.Module):
    """Pre-norm GPT block: causal self-attention, cross-attention to the prompt, MLP; every norm
    conditional on the action embedding when there is one."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
        attn_dropout: float,
        cond_dim: int | None,
        cross: bool,
    ) -> None:
        super().__init__()
        self.norm_attn = ConditionalLayerNorm(dim, cond_dim)
        self.attn = Attention(dim, heads, False, attn_dropout, dropout)
        self.norm_cross = ConditionalLayerNorm(dim, cond_dim) if cross else None
        self.cross = CrossAttention(dim, heads, attn_dropout, dropout) if cross else None
        self.norm_mlp = ConditionalLayerNorm(dim, cond_dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=dropout)

    def forward(
        self,
        x: Tensor,
        cond: Tensor | None,
        memory: Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> Tensor:
        x = x + self.attn(self.norm_attn(x, cond), causal=True, cache=cache, layer=layer)
        if self.cross is not None and self.norm_cross is not None:
            if memory is None:
                raise ValueError("cross-attention needs the prompt frames' encoding")
            x = x + self.cross(self.norm_cross(x, cond), memory)
        return x + self.mlp(self.norm_mlp(x, cond))


@dataclass
class VideoGPTCache:
    """Keys/values of the committed sequence positions, and what they were computed from."""

    kv: KVCache
    memory: Tensor | None  # (B, M, D) the prompt encoding (None without frame conditioning)
    tokens: Tensor  # (B, L, N) long: the context frames (prompt frames first)
    cond: Tensor  # (B, L) long: conditioning ids of those frames

    @property
    def frames(self) -> int:
        return self.tokens.shape[1]


class VideoGPT(nn.Module, WorldModel):
    """Autoregressive transformer prior over (T, h, w) video tokens (VideoGPT)."""

    @staticmethod
    def check_config(model: DictConfig, data: DictConfig, ev: DictConfig) -> list[str]:
        """What `validate` reports about a config of this prior, naming the keys: its window
        must hold a clip, and a clip more frames than the prompt."""
        errors: list[str] = []
        clip, frames = data.get("clip_length"), int(model.get("max_frames", 8))
        if clip is not None and int(clip) > frames:
            errors.append(f"data.clip_length={clip} exceeds model.max_frames={frames}")
        cond = int(model.get("cond_frames", 1))
        if clip is not None and not 0 <= cond < int(clip):
            errors.append(f"model.cond_frames={cond} must be in [0, data.clip_length={clip})")
        if int(model.get("dim", 128)) % int(model.get("heads", 4)):
            errors.append(f"model.dim={model.dim} is not divisible by model.heads={model.heads}")
        return errors

    def __init__(
        self,
        vocab_size: int = 1024,
        num_actions: int = 8,
        grid: list[int] | tuple[int, int] = (8, 8),
        max_frames: int = 8,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        cond_frames: int = 1,
        cond_channels: int = 64,
        cond_blocks: int = 2,
        action_cond: bool = True,
    ) -> None:
        super().__init__()
        if len(grid) != 2:
            raise ValueError(f"grid must be [h, w], got {grid}")
        if not 0 <= cond_frames < max_frames:
            raise ValueError(f"cond_frames={cond_frames} must be in [0, max_frames={max_frames})")
        if num_actions < 1:
            raise ValueError(f"num_actions must be >= 1, got {num_actions}")
        self.vocab_size = vocab_size
        self.num_actions = num_actions
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_tokens = self.grid[0] * self.grid[1]
        self.max_frames = max_frames
        self.cond_frames = cond_frames
        self.start_id = num_actions  # "no previous action": conditions frame 0
        self.sos_id = vocab_size  # the extra input row: start of sequence
        # positions of the modelled sequence: frames cond_frames .. max_frames - 1
        self.max_len = (max_frames - cond_frames) * self.num_tokens

        self.token_emb = nn.Embedding(vocab_size + 1, dim)
        self.pos = AxisPositions(dim, (max_frames - cond_frames, *self.grid))
        self.emb_drop = nn.Dropout(dropout)
        self.action_emb = nn.Embedding(num_actions + 1, dim) if action_cond else None
        cond_dim = dim if action_cond else None
        self.frame_encoder = (
            FrameEncoder(vocab_size, cond_channels, dim, cond_blocks, (cond_frames, *self.grid))
            if cond_frames > 0
            else None
        )
        self.blocks = nn.ModuleList(
            GPTBlock(dim, heads, mlp_ratio, dropout, attn_dropout, cond_dim, cond_frames > 0)
            for _ in range(depth)
        )
        self.norm = ConditionalLayerNorm(dim, cond_dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(init_weights)

    # ------------------------------------------------------------------ checks
    def _check_tokens(self, tokens: Tensor, name: str, valid: Tensor | None = None) -> None:
        check_token_ids(tokens, name, self.grid, self.vocab_size, valid)

    def _check_actions(self, actions: Tensor, valid: Tensor | None = None) -> None:
        check_action_ids(actions, self.num_actions, valid)

    # ------------------------------------------------------------------ model
    def frame_conditions(self, actions: Tensor, num_frames: int) -> Tensor:
        """Conditioning id per frame (B, T): start id for frame 0, actions[:, t-1] for frame t."""
        return frame_conditions(actions, num_frames, self.start_id)

    def encode_prompt(self, tokens: Tensor) -> Tensor | None:
        """The cross-attention memory (B, M, D) of a clip's prompt frames (B, >= cond_frames,
        h, w); None without frame conditioning."""
        if self.frame_encoder is None:
            return None
        return self.frame_encoder(tokens[:, : self.cond_frames].long())

    def forward(
        self,
        inputs: Tensor,
        cond: Tensor,
        memory: Tensor | None,
        start: int = 0,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Hidden states (B, L, D) of input ids (B, L) at sequence positions start .. start+L-1.

        `inputs[:, i]` is the token before position start + i (the start-of-sequence id at 0);
        `cond` (B, L) the conditioning id of each position's frame. With `cache`, the keys and
        values of positions < start come from it and those of these positions are written after
        them (the caller advances `cache.length`).
        """
        n = inputs.shape[1]
        if start + n > self.max_len:
            raise ValueError(f"positions {start}..{start + n - 1} exceed {self.max_len}")
        if cache is not None and cache.length != start:
            raise ValueError(f"cache holds {cache.length} positions, asked to start at {start}")
        pos = rearrange(self.pos(*self.pos.sizes), "t h w d -> (t h w) d")  # (max_len, D)
        x = self.emb_drop(self.token_emb(inputs) + pos[start : start + n])
        c = None if self.action_emb is None else self.action_emb(cond)  # (B, L, D)
        for i, block in enumerate(self.blocks):
            x = block(x, c, memory, cache, i)
        return self.norm(x, c)

    def _sequence(self, tokens: Tensor, cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Modelled frames of a clip (B, T, N) with per-frame conditions (B, T) -> (inputs,
        targets, per-position conditions), each (B, (T - cond_frames) N)."""
        x = rearrange(tokens[:, self.cond_frames :], "b t n -> b (t n)")  # raster order
        sos = torch.full((x.shape[0], 1), self.sos_id, dtype=x.dtype, device=x.device)
        inputs = torch.cat([sos, x], dim=1)[:, : x.shape[1]]  # shifted right
        pos_cond = cond[:, self.cond_frames :].repeat_interleave(self.num_tokens, dim=1)
        return inputs, x, pos_cond

    def logits(self, tokens: Tensor, actions: Tensor) -> Tensor:
        """Logits (B, L, V) of every modelled position of a clip (B, T, h, w) with actions
        (B, T); L = (T - cond_frames) h w in raster order. For tests and analysis."""
        self._check_tokens(tokens, "tokens")
        t = tokens.shape[1]
        x = rearrange(tokens.long(), "b t h w -> b t (h w)")
        inputs, _, cond = self._sequence(x, self.frame_conditions(actions, t))
        return self.head(self.forward(inputs, cond, self.encode_prompt(tokens)))

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        tokens, actions = batch["tokens"], batch["actions"]
        if tokens.dim() != 4:
            raise ValueError(f"tokens must be (B, T, h, w), got shape {tuple(tokens.shape)}")
        b, t = tokens.shape[:2]
        if not self.cond_frames < t <= self.max_frames:
            raise ValueError(
                f"clips of {t} frames: need cond_frames={self.cond_frames} < T <= "
                f"max_frames={self.max_frames}"
            )
        mask = batch.get("mask")
        real = torch.ones(b, t, dtype=torch.bool, device=tokens.device) if mask is None else mask
        real = real.bool()
        self._check_tokens(tokens, "tokens", valid=real)
        if actions.shape[:2] != (b, t):
            raise ValueError(f"actions must be (B, T)=({b}, {t}), got {tuple(actions.shape)}")
        # actions[:, i] conditions frame i+1: it must be valid wherever frame i+1 is real
        self._check_actions(actions[:, : t - 1], real[:, 1:])
        cond = self.frame_conditions(torch.where(real[:, 1:], actions[:, : t - 1], 0), t)
        x = rearrange(tokens.long(), "b t h w -> b t (h w)")
        x = torch.where(real[:, :, None], x, 0)  # padding frames: any valid id
        inputs, targets, pos_cond = self._sequence(x, cond)
        memory = self.encode_prompt(rearrange(x, "b t (h w) -> b t h w", h=self.grid[0]))
        logits = self.head(self.forward(inputs, pos_cond, memory)).float()  # (B, L, V)
        keep = real[:, self.cond_frames :].repeat_interleave(self.num_tokens, dim=1)  # (B, L)
        if not bool(keep.any()):  # nothing to predict (all padding): a zero loss, not NaN
            zero = logits.sum() * 0.0
            return zero, {"ce": zero.detach(), "masked_acc": zero.detach()}
        ce = F.cross_entropy(logits[keep], targets[keep])
        with torch.no_grad():
            acc = (logits[keep].argmax(-1) == targets[keep]).float().mean()
        return ce, {"ce": ce.detach(), "masked_acc": acc}

    # ------------------------------------------------------------------ sampling
    def _committed(self, frames: int) -> int:
        """Sequence positions whose keys/values a context of `frames` frames fixes: all the
        modelled context positions (their inputs are the start token and the context tokens
        except the very last one, which is the input of the next frame's first position)."""
        return max(frames - self.cond_frames, 0) * self.num_tokens

    def _check_context(self, tokens: Tensor, actions: Tensor, needed: int, name: str) -> None:
        self._check_tokens(tokens, name)
        b, t = tokens.shape[:2]
        if t < self.cond_frames:
            raise ValueError(
                f"{name} has {t} frames; the prior conditions on cond_frames="
                f"{self.cond_frames} prompt frames"
            )
        if actions.dim() != 2 or actions.shape[0] != b or actions.shape[1] < needed:
            raise ValueError(
                f"actions must be (B, >= {needed}) for a {t}-frame {name}, "
                f"got {tuple(actions.shape)}"
            )
        self._check_actions(actions[:, :needed])

    def new_cache(self, tokens: Tensor, actions: Tensor) -> VideoGPTCache:
        """Encode context frames (B, L, h, w) with actions (B, >= L-1) into a cache."""
        self._check_context(tokens, actions, tokens.shape[1] - 1, "tokens_context")
        b, t = tokens.shape[:2]
        cache = VideoGPTCache(
            kv=KVCache(len(self.blocks), self.max_len),
            memory=self.encode_prompt(tokens),
            tokens=tokens[:, :0].reshape(b, 0, self.num_tokens).long(),
            cond=actions[:, :0].long(),
        )
        x = rearrange(tokens.long(), "b t h w -> b t (h w)")
        self._extend_cache(cache, x, self.frame_conditions(actions, t))
        return cache

    def _extend_cache(self, cache: VideoGPTCache, x: Tensor, cond: Tensor) -> None:
        """Bring `cache` up to the context x (B, t, N) / cond (B, t): encode the positions of
        the context frames it lacks."""
        n = cache.frames
        if (
            n > x.shape[1]
            or cache.tokens.shape[0] != x.shape[0]
            or not torch.equal(cache.tokens, x[:, :n])
            or not torch.equal(cache.cond, cond[:, :n])
        ):
            raise ValueError(
                "cache does not match tokens_context/actions (it must hold a prefix of this "
                "context); pass cache=None to start a new one"
            )
        start, stop = self._committed(n), self._committed(x.shape[1])
        if stop > start:
            inputs, _, pos_cond = self._sequence(x, cond)
            self.forward(
                inputs[:, start:stop], pos_cond[:, start:stop], cache.memory, start, cache.kv
            )
            cache.kv.length = stop
        cache.tokens, cache.cond = x.clone(), cond.clone()

    def _sample(
        self,
        logits: Tensor,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        """One id per row of logits (B, V): inverse-CDF sampling (one uniform per row, so the
        cached and uncached paths consume the generator identically); temperature 0 = greedy."""
        logits = logits.float()
        if temperature <= 0:
            return logits.argmax(dim=-1)
        logits = top_k_filter(logits, top_k)
        probs = F.softmax(logits / temperature, dim=-1)
        u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device)
        ids = torch.searchsorted(probs.cumsum(dim=-1), u)[:, 0]
        return ids.clamp_max(self.vocab_size - 1)  # the cumsum may end just below u

    @torch.no_grad()
    def generate_next(
        self,
        tokens_context: Tensor,
        actions: Tensor,
        steps: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        cache: VideoGPTCache | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Sample the frame after `tokens_context` (B, t, h, w) -> (B, h, w) long, token by
        token in raster order.

        `actions` (B, >= t): actions[:, t-1] drives the new frame. `steps` is ignored (an
        autoregressive prior has no decoding iterations). `cache`: a `VideoGPTCache` over a
        prefix of this context, extended in place with the frames it lacks; the new frame is
        not committed to it (the next call may bring a different frame at that place).
        """
        del steps
        self._check_context(tokens_context, actions, tokens_context.shape[1], "tokens_context")
        b, t = tokens_context.shape[:2]
        if t + 1 > self.max_frames:
            raise ValueError(
                f"context of {t} frames + 1 new frame exceeds max_frames={self.max_frames}; "
                "use rollout(), which slides the window"
            )
        x = rearrange(tokens_context.long(), "b t h w -> b t (h w)")
        cond = self.frame_conditions(actions, t + 1)  # (B, t + 1): last = the new frame's
        n = self.num_tokens
        frame = torch.zeros(b, n, dtype=torch.long, device=x.device)
        full = torch.cat([x, frame[:, None]], dim=1)  # (B, t + 1, N): the new frame's slot
        inputs, _, pos_cond = self._sequence(full, cond)
        p0 = self._committed(t)  # position of the new frame's first token
        if use_cache:
            if cache is None:
                cache = self.new_cache(tokens_context, actions[:, : t - 1])
            else:
                self._extend_cache(cache, x, cond[:, :t])
            memory = cache.memory
        else:
            memory = self.encode_prompt(tokens_context)
        for i in range(n):
            p = p0 + i
            if use_cache:
                hidden = self.forward(
                    inputs[:, p : p + 1], pos_cond[:, p : p + 1], memory, p, cache.kv
                )
                cache.kv.length += 1  # this token's keys/values serve the rest of the frame
            else:
                hidden = self.forward(inputs[:, : p + 1], pos_cond[:, : p + 1], memory)
            token = self._sample(self.head(hidden[:, -1]), temperature, top_k, generator)
            frame[:, i] = token
            if i + 1 < n:
                inputs[:, p + 1] = token
        if use_cache:
            cache.kv.length = p0  # roll back: the sampled frame is not context yet
        return rearrange(frame, "b (h w) -> b h w", h=self.grid[0])

    @torch.no_grad()
    def rollout(
        self,
        context_tokens: Tensor,
        actions: Tensor,
        horizon: int,
        steps: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Generate `horizon` frames after context (B, t0, h, w) -> (B, horizon, h, w).

        actions (B, >= t0 + horizon - 1): actions[:, i] is taken after frame i. The window holds
        at most max_frames - 1 context frames (its first cond_frames are the prompt); when it
        slides, positions and prompt change and the cache is rebuilt.
        """
        b, t0 = context_tokens.shape[:2]
        need = t0 + horizon - 1
        self._check_context(context_tokens, actions, need, "context_tokens")
        return sliding_rollout(
            self,
            context_tokens,
            actions,
            horizon,
            window=self.max_frames - 1,
            use_cache=use_cache,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
        )
