"""Perceiver AR: a long-context autoregressive world model over a frozen tokenizer's tokens.

Hawthorne et al. 2022, "General-purpose, long-context autoregressive modeling with Perceiver
AR". The (T, h, w) token grid of a clip is flattened in raster order (frame by frame, row by row)
into L = T h w positions and modelled autoregressively, p(x_p | x_<p). The input at position p
is the token before it (a start-of-sequence id at 0) plus learned T, H, W position embeddings of
p and the embedding of the action that leads into p's frame (`actions[:, t]` leads from frame t
to t + 1; frame 0 gets a learned "start" action), as in the other world models.

What makes the context long and cheap: only the newest `latent_window` positions (W, e.g. one or
two frames of tokens) are latents. They are the queries of ONE cross-attention over the inputs
of all L positions, masked causally (the latent at position q sees inputs p <= q), followed by an
MLP; then `depth` causal self-attention blocks run on the W latents alone. A training step costs
O(W L) in the cross-attention and O(depth W^2) in the stack, instead of O(depth L^2) for a
decoder over the whole context; next-token cross-entropy is taken on the W window positions.
With `latent_window` = L the same module is a plain causal transformer of depth + 1 layers over
the whole context (the full-attention baseline of the bench).

Training context: with `random_context`, each training batch is cut to a random number of
frames T' in [min(2, T), T] (the window then sits on the last W positions of the cut clip), so
the model learns to predict frames at every place of its context, as generation asks it to (the
paper trains on random context lengths for the same reason). Evaluation (and `eval()` mode)
takes the whole clip. The paper's context dropout (training on a random subset of the context
inputs) is not used.

Generation (KV-cached): the new frame t has positions tN .. (t+1)N - 1 (N = h w) of a sequence of
(t + 1) frames, and the window is its last W positions, exactly as in training on a (t + 1)-frame
clip, so each frame is sampled from the distribution the model was trained on. The cache keeps
- the cross-attention keys/values of every committed context position (computed once, appended
  incrementally as frames are added; the tokens of the frame being sampled are appended one by
  one and rolled back at the end, so teacher-forced evaluation can commit the real frame);
- the self-attention keys/values of the window positions: the window's context part (its first
  W - N positions, when W > N) is run through the stack once per frame, then each new token costs
  one cross-attention query over <= L keys and `depth` layers over <= W keys. When the window
  start does not move (W covers the whole sequence, the full-attention case), these are kept
  across frames like a GPT's cache.
`use_cache=False` recomputes the whole forward for every token (the reference path; the same
tokens for the same generator). Sampling: greedy (temperature 0), temperature, top-k, with
Gumbel noise from `models/sampling.py`.
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
from worldmodel.models.sampling import gumbel_noise, sliding_rollout, top_k_filter
from worldmodel.models.st_transformer import Attention, KVCache, init_weights
from worldmodel.models.videogpt_vqvae import AxisPositions


class CausalCrossAttention(nn.Module):
    """Perceiver AR's cross-attend layer: latents at absolute positions q >= `start` attend to the
    keys/values of input positions 0 .. M-1, key p visible to the latent at q iff p <= q; then an
    MLP. Keys/values are a function of each input alone (`keys_values`), so they are cached."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=dropout)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, heads, M, Dh) of inputs x (B, M, D)."""
        kv = self.kv(self.norm_kv(x))  # (B, M, 2 D)
        k, v = rearrange(kv, "b m (two h d) -> two b h m d", two=2, h=self.heads)
        return k, v

    def forward(self, x: Tensor, start: int, k: Tensor, v: Tensor) -> Tensor:
        """Latents x (B, Lq, D) at absolute positions start .. start + Lq - 1 over keys/values
        (B, heads, M, Dh) of positions 0 .. M-1 -> (B, Lq, D)."""
        q = rearrange(self.q(self.norm_q(x)), "b l (h d) -> b h l d", h=self.heads)
        m, lq = k.shape[2], q.shape[2]
        mask, is_causal = None, False
        if lq == m and start == 0:
            is_causal = lq > 1  # the window is the whole sequence: plain causal attention
        elif start + lq < m or lq > 1:
            q_pos = torch.arange(start, start + lq, device=x.device)
            kpos = torch.arange(m, device=x.device)
            mask = kpos[None, :] <= q_pos[:, None]  # (Lq, M) True = attend
        # else: one query at the last key position sees every key
        out = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=is_causal
        )  # (B, heads, Lq, Dh)
        x = x + self.drop(self.proj(rearrange(out, "b h l d -> b l (h d)")))
        return x + self.mlp(self.norm_mlp(x))


class LatentBlock(nn.Module):
    """Pre-norm causal self-attention block on the latents (B, W, D), KV-cacheable."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, False, 0.0, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.norm_attn(x), causal=True, cache=cache, layer=layer)
        return x + self.mlp(self.norm_mlp(x))


@dataclass
class PerceiverARCache:
    """Keys/values of the committed context, and what they were computed from.

    `cross` holds the cross-attention keys/values of input positions 0 .. cross.length - 1;
    `window` the self-attention keys/values of the latents at positions window_start ..
    window_start + window.length - 1 (None until the first frame is generated)."""

    cross: KVCache
    window: KVCache | None
    window_start: int
    tokens: Tensor  # (B, t, N) long: the context frames
    cond: Tensor  # (B, t) long: conditioning (action) ids of those frames

    @property
    def frames(self) -> int:
        return self.tokens.shape[1]


class PerceiverAR(nn.Module, WorldModel):
    """Autoregressive model over (T, h, w) tokens with a long context read by one causal
    cross-attention into a short latent window (Perceiver AR)."""

    @staticmethod
    def check_config(model: DictConfig, data: DictConfig, ev: DictConfig) -> list[str]:
        """What `validate` reports about a config of this model, naming the keys: the window
        must hold at least one frame of tokens and at most the whole context, a clip must fit
        the context."""
        errors: list[str] = []
        grid = list(model.get("grid", [8, 8]))
        frames = int(model.get("max_frames", 32))
        window = int(model.get("latent_window", 64))
        if len(grid) == 2:
            n = int(grid[0]) * int(grid[1])
            errors += [f"model.{e}" for e in _window_errors(window, n, frames)]
        clip = data.get("clip_length")
        if clip is not None and int(clip) > frames:
            errors.append(f"data.clip_length={clip} exceeds model.max_frames={frames}")
        if int(model.get("dim", 128)) % int(model.get("heads", 4)):
            errors.append(f"model.dim={model.dim} is not divisible by model.heads={model.heads}")
        return errors

    def __init__(
        self,
        vocab_size: int = 1024,
        num_actions: int = 8,
        grid: list[int] | tuple[int, int] = (8, 8),
        max_frames: int = 32,
        latent_window: int = 64,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        random_context: bool = True,
    ) -> None:
        super().__init__()
        if len(grid) != 2:
            raise ValueError(f"grid must be [h, w], got {grid}")
        if num_actions < 1:
            raise ValueError(f"num_actions must be >= 1, got {num_actions}")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.vocab_size = vocab_size
        self.num_actions = num_actions
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_tokens = self.grid[0] * self.grid[1]
        self.max_frames = max_frames
        errors = _window_errors(latent_window, self.num_tokens, max_frames)
        if errors:
            raise ValueError("; ".join(errors))
        self.latent_window = latent_window
        self.random_context = random_context
        self.max_len = max_frames * self.num_tokens
        self.start_id = num_actions  # "no previous action": conditions frame 0
        self.sos_id = vocab_size  # the extra input row: start of sequence

        self.token_emb = nn.Embedding(vocab_size + 1, dim)
        self.pos = AxisPositions(dim, (max_frames, *self.grid))
        self.action_emb = nn.Embedding(num_actions + 1, dim)
        self.emb_drop = nn.Dropout(dropout)
        self.cross = CausalCrossAttention(dim, heads, mlp_ratio, dropout)
        self.blocks = nn.ModuleList(
            LatentBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(init_weights)

    # ------------------------------------------------------------------ checks
    def _check_tokens(self, tokens: Tensor, name: str, valid: Tensor | None = None) -> None:
        check_token_ids(tokens, name, self.grid, self.vocab_size, valid)
        if tokens.shape[1] > self.max_frames:
            raise ValueError(
                f"{name} has {tokens.shape[1]} frames, more than max_frames={self.max_frames}"
            )

    def _check_actions(self, actions: Tensor, valid: Tensor | None = None) -> None:
        check_action_ids(actions, self.num_actions, valid)

    # ------------------------------------------------------------------ model
    def frame_conditions(self, actions: Tensor, num_frames: int) -> Tensor:
        """Conditioning id per frame (B, T): start id for frame 0, actions[:, t-1] for frame t."""
        return frame_conditions(actions, num_frames, self.start_id)

    def _sequence(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """Frames (B, T, N) with per-frame conditions (B, T) -> (inputs, per-position
        conditions), each (B, T N): inputs shifted right by the start-of-sequence id."""
        flat = rearrange(x, "b t n -> b (t n)")  # raster order
        sos = torch.full((flat.shape[0], 1), self.sos_id, dtype=flat.dtype, device=flat.device)
        inputs = torch.cat([sos, flat[:, :-1]], dim=1)
        return inputs, cond.repeat_interleave(self.num_tokens, dim=1)

    def embed(self, inputs: Tensor, cond: Tensor, start: int = 0) -> Tensor:
        """Input embeddings (B, L, D) of ids (B, L) at positions start .. start + L - 1: token
        + position + the action leading into the position's frame (`cond` (B, L))."""
        n = inputs.shape[1]
        if start + n > self.max_len:
            raise ValueError(f"positions {start}..{start + n - 1} exceed {self.max_len}")
        p = torch.arange(start, start + n, device=inputs.device)  # (L,) positions
        w = self.grid[1]
        pos = (
            self.pos.time[p // self.num_tokens]
            + self.pos.height[(p % self.num_tokens) // w]
            + self.pos.width[p % w]
        )  # (L, D): the T, H, W tables of the positions alone (a token costs one row)
        x = self.token_emb(inputs) + pos + self.action_emb(cond)
        return self.emb_drop(x)

    def _latents(
        self,
        x: Tensor,
        start: int,
        k: Tensor,
        v: Tensor,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Hidden states (B, Lq, D) of the latents x (B, Lq, D) (input embeddings) at positions
        start .. start + Lq - 1, over cross-attention keys/values (B, heads, M, Dh) of positions
        0 .. M-1, through the cross-attend layer and the self-attention stack (with `cache`, its
        keys/values of earlier window positions; the caller advances `cache.length`)."""
        h = self.cross(x, start, k, v)
        for i, block in enumerate(self.blocks):
            h = block(h, cache, i)
        return self.norm(h)

    def forward(self, inputs: Tensor, cond: Tensor) -> Tensor:
        """Hidden states (B, W', D) of the window (the last W' = min(W, L) positions) of input
        ids (B, L) with per-position conditioning ids (B, L)."""
        length = inputs.shape[1]
        window = min(self.latent_window, length)
        x = self.embed(inputs, cond)  # (B, L, D)
        k, v = self.cross.keys_values(x)  # (B, heads, L, Dh)
        return self._latents(x[:, length - window :], length - window, k, v)

    def logits(self, tokens: Tensor, actions: Tensor) -> Tensor:
        """Logits (B, W', V) of the window positions (the last W' = min(W, T h w) in raster
        order) of a clip (B, T, h, w) with actions (B, T). For tests and analysis."""
        self._check_tokens(tokens, "tokens")
        x = rearrange(tokens.long(), "b t h w -> b t (h w)")
        inputs, cond = self._sequence(x, self.frame_conditions(actions, tokens.shape[1]))
        return self.head(self.forward(inputs, cond))

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        tokens, actions = batch["tokens"], batch["actions"]
        if tokens.dim() != 4:
            raise ValueError(f"tokens must be (B, T, h, w), got shape {tuple(tokens.shape)}")
        b, t = tokens.shape[:2]
        if not 1 <= t <= self.max_frames:
            raise ValueError(f"clips of {t} frames: need 1 <= T <= max_frames={self.max_frames}")
        mask = batch.get("mask")
        real = torch.ones(b, t, dtype=torch.bool, device=tokens.device) if mask is None else mask
        real = real.bool()
        self._check_tokens(tokens, "tokens", valid=real)
        if actions.shape[:2] != (b, t):
            raise ValueError(f"actions must be (B, T)=({b}, {t}), got {tuple(actions.shape)}")
        # actions[:, i] conditions frame i+1: it must be valid wherever frame i+1 is real
        self._check_actions(actions[:, : t - 1], real[:, 1:])
        if self.training and self.random_context and t > 2:
            # a random context length per batch: the window lands on every place of the context
            t = int(torch.randint(2, t + 1, ()).item())
            tokens, actions, real = tokens[:, :t], actions[:, :t], real[:, :t]
        cond = self.frame_conditions(torch.where(real[:, 1:], actions[:, : t - 1], 0), t)
        x = rearrange(tokens.long(), "b t h w -> b t (h w)")
        x = torch.where(real[:, :, None], x, 0)  # padding frames: any valid id
        inputs, pos_cond = self._sequence(x, cond)
        logits = self.head(self.forward(inputs, pos_cond)).float()  # (B, W', V)
        window = logits.shape[1]
        targets = rearrange(x, "b t n -> b (t n)")[:, -window:]  # (B, W')
        keep = real.repeat_interleave(self.num_tokens, dim=1)[:, -window:]  # (B, W')
        if not bool(keep.any()):  # nothing to predict (all padding): a zero loss, not NaN
            zero = logits.sum() * 0.0
            return zero, {"ce": zero.detach(), "masked_acc": zero.detach()}
        ce = F.cross_entropy(logits[keep], targets[keep])
        with torch.no_grad():
            acc = (logits[keep].argmax(-1) == targets[keep]).float().mean()
        return ce, {"ce": ce.detach(), "masked_acc": acc}

    # ------------------------------------------------------------------ sampling
    def _check_context(self, tokens: Tensor, actions: Tensor, needed: int, name: str) -> None:
        self._check_tokens(tokens, name)
        b, t = tokens.shape[:2]
        if t < 1:
            raise ValueError(f"{name} has no frames; give at least one prompt frame")
        if actions.dim() != 2 or actions.shape[0] != b or actions.shape[1] < needed:
            raise ValueError(
                f"actions must be (B, >= {needed}) for a {t}-frame {name}, "
                f"got {tuple(actions.shape)}"
            )
        self._check_actions(actions[:, :needed])

    def new_cache(self, tokens: Tensor, actions: Tensor) -> PerceiverARCache:
        """Encode context frames (B, t, h, w) with actions (B, >= t-1) into a cache: the
        cross-attention keys/values of their t h w committed positions."""
        self._check_context(tokens, actions, tokens.shape[1] - 1, "tokens_context")
        b, t = tokens.shape[:2]
        cache = PerceiverARCache(
            cross=KVCache(1, self.max_len),
            window=None,
            window_start=0,
            tokens=tokens[:, :0].reshape(b, 0, self.num_tokens).long(),
            cond=actions[:, :0].long(),
        )
        x = rearrange(tokens.long(), "b t h w -> b t (h w)")
        self._extend_cache(cache, x, self.frame_conditions(actions, t))
        return cache

    def _extend_cache(self, cache: PerceiverARCache, x: Tensor, cond: Tensor) -> None:
        """Bring `cache` up to the context x (B, t, N) / cond (B, t): the cross-attention
        keys/values of the positions it lacks. The input at position p is token p - 1, so t
        frames fix positions 0 .. t N - 1 (the next one carries the next frame's action)."""
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
        start, stop = n * self.num_tokens, x.shape[1] * self.num_tokens
        if stop > start:
            inputs, pos_cond = self._sequence(x, cond)
            emb = self.embed(inputs[:, start:stop], pos_cond[:, start:stop], start)
            k, v = self.cross.keys_values(emb)  # (B, heads, stop - start, Dh)
            cache.cross.length = start
            cache.cross.write(0, k, v)
            cache.cross.length = stop
        cache.tokens, cache.cond = x.clone(), cond.clone()

    def _sample(
        self,
        logits: Tensor,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        """One id per row of logits (B, V): greedy at temperature 0, else the Gumbel-max draw
        from softmax(logits / temperature), optionally restricted to the top k."""
        logits = logits.float()
        if temperature <= 0:
            return logits.argmax(dim=-1)
        logits = top_k_filter(logits, top_k)
        noise = gumbel_noise(logits.shape, generator, logits.device)
        return (logits / temperature + noise).argmax(dim=-1)

    @torch.no_grad()
    def generate_next(
        self,
        tokens_context: Tensor,
        actions: Tensor,
        steps: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        cache: PerceiverARCache | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Sample the frame after `tokens_context` (B, t, h, w) -> (B, h, w) long, token by
        token in raster order.

        `actions` (B, >= t): actions[:, t-1] drives the new frame. `steps` is ignored (there are
        no decoding iterations). `cache`: a `PerceiverARCache` over a prefix of this context,
        extended in place with the frames it lacks; the new frame is not committed to it.
        """
        del steps
        self._check_context(tokens_context, actions, tokens_context.shape[1], "tokens_context")
        b, t = tokens_context.shape[:2]
        if t + 1 > self.max_frames:
            raise ValueError(
                f"context of {t} frames + 1 new frame exceeds max_frames={self.max_frames}; "
                "use rollout(), which slides the window"
            )
        n = self.num_tokens
        x = rearrange(tokens_context.long(), "b t h w -> b t (h w)")
        cond = self.frame_conditions(actions, t + 1)  # (B, t + 1): last = the new frame's
        frame = torch.zeros(b, n, dtype=torch.long, device=x.device)
        inputs, pos_cond = self._sequence(torch.cat([x, frame[:, None]], dim=1), cond)
        p0, length = t * n, (t + 1) * n  # the new frame's first position; the sequence length
        start = max(0, length - self.latent_window)  # the window: positions start .. length-1
        if use_cache:
            if cache is None:
                cache = self.new_cache(tokens_context, actions[:, : t - 1])
            else:
                self._extend_cache(cache, x, cond[:, :t])
            self._prepare_window(cache, inputs, pos_cond, start, p0)
        for i in range(n):
            p = p0 + i
            if use_cache:
                hidden = self._step(cache, inputs[:, p : p + 1], pos_cond[:, p : p + 1], p)
            else:
                hidden = self.forward(inputs[:, :length], pos_cond[:, :length])[:, p - start]
            token = self._sample(self.head(hidden), temperature, top_k, generator)
            frame[:, i] = token
            if i + 1 < n:
                inputs[:, p + 1] = token
        if use_cache:  # roll back: the sampled frame is not context yet
            cache.cross.length = p0
            cache.window.length = p0 - start
        return rearrange(frame, "b (h w) -> b h w", h=self.grid[0])

    def _prepare_window(
        self, cache: PerceiverARCache, inputs: Tensor, cond: Tensor, start: int, p0: int
    ) -> None:
        """Latent keys/values of the window's context positions start .. p0 - 1 (inputs and
        cond (B, >= p0)): kept when the window starts where the cached one did, else computed
        afresh (once per frame)."""
        if cache.window is None or cache.window_start != start:
            cache.window = KVCache(len(self.blocks), self.latent_window)
            cache.window_start = start
        done = start + cache.window.length
        if done > p0:
            raise ValueError(f"window cache holds positions up to {done - 1}, beyond {p0 - 1}")
        if done < p0:
            emb = self.embed(inputs[:, done:p0], cond[:, done:p0], done)
            k, v = cache.cross.keys[0][:, :, :p0], cache.cross.values[0][:, :, :p0]
            self._latents(emb, done, k, v, cache.window)
            cache.window.length = p0 - start

    def _step(self, cache: PerceiverARCache, inputs: Tensor, cond: Tensor, p: int) -> Tensor:
        """Hidden state (B, D) of position p from its input id (B, 1): its cross-attention
        keys/values appended, one query over positions 0 .. p, the stack over the window cache;
        both caches advance by one."""
        emb = self.embed(inputs, cond, p)  # (B, 1, D)
        cache.cross.length = p
        k, v = cache.cross.write(0, *self.cross.keys_values(emb))  # (B, heads, p + 1, Dh)
        hidden = self._latents(emb, p, k, v, cache.window)
        cache.cross.length = p + 1
        cache.window.length += 1
        return hidden[:, 0]

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

        actions (B, >= t0 + horizon - 1): actions[:, i] is taken after frame i. The context
        holds at most max_frames - 1 frames; when it slides, positions change and the cache is
        rebuilt.
        """
        b, t0 = context_tokens.shape[:2]
        self._check_context(context_tokens, actions, t0 + horizon - 1, "context_tokens")
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


def _window_errors(window: int, tokens_per_frame: int, max_frames: int) -> list[str]:
    """Why a latent window of `window` positions does not fit (no key prefixes: the caller
    adds `model.`): it must hold a whole frame, and no more than the context."""
    context = max_frames * tokens_per_frame
    if window < tokens_per_frame:
        return [
            f"latent_window={window} is smaller than one frame of tokens (h w = "
            f"{tokens_per_frame}): the window must hold the frame being generated"
        ]
    if window > context:
        return [
            f"latent_window={window} exceeds the context of max_frames x h x w = "
            f"{max_frames} x {tokens_per_frame} = {context} positions"
        ]
    return []
