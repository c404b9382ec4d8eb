"""Genie dynamics model: MaskGIT over (T, h, w) video tokens, conditioned on actions.

Tokens of each frame are embedded (vocabulary + one mask token), run through a space-time
transformer with causal temporal attention, and a linear head predicts the token ids.

Action conditioning, exactly: `actions[:, t]` is the action taken after frame t (it leads from
frame t to frame t+1, the batch convention of the project). Its embedding is added to every token
of frame t+1, so the prediction of frame t+1 sees the action directly at its own positions (and,
through causal temporal attention, the frames 0..t and the actions that led to them). Frame 0 gets
a learned "start" embedding instead; `actions[:, T-1]` of a T-frame clip leads out of the clip
and is ignored by `loss`. With the default `cond_mode="adaln"` the same embedding also
modulates every block's norms (see `models/st_transformer.py` for that and the other options).

Training (Genie / MaskGIT): per clip a rate r ~ U(mask_rate_min, mask_rate_max); each token of
frames >= `context_frames` is replaced by the mask token with probability r (`mask_strategy`
random; `block` and `multiscale` hide round(r * N) tokens of each frame as one contiguous block or
as coarse cells mixed with single tokens, see `models/masking.py`); cross-entropy on the masked
positions only (the head runs on those positions only).

Sampling: `generate_next` decodes one new frame in `steps` MaskGIT iterations (sample every masked
token, keep the most confident ones, re-mask the rest following the schedule, feed the updated
tokens back: `maskgit_fill`, which the Muse cascade shares). Past frames' temporal keys/values
are cached, so each iteration runs the transformer on the new frame only. `rollout` generates
frame after frame and slides a window of `max_frames` frames; positions are absolute inside the
window, so a slide re-encodes the window (exact: the same result as running without a cache).
Tokens are drawn by inverse-CDF sampling from softmax(logits / temperature); `temperature=0` is
greedy.

Input checks raise ValueError naming the values: token grids other than the model's (h, w), ids
outside [0, vocab_size), actions outside [0, num_actions) where they condition a real frame (-1,
"unknown", is accepted only where it conditions nothing: the last step, padded frames).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import DictConfig
from torch import Tensor, nn

from worldmodel.models.checks import check_action_ids, check_token_ids
from worldmodel.models.interfaces import WorldModel
from worldmodel.models.masking import (
    check_mask_strategy,
    draw_mask,
    mask_strategy_problems,
    masked_ce,
)
from worldmodel.models.sampling import gumbel_noise, sliding_rollout
from worldmodel.models.st_transformer import KVCache, STTransformer, init_weights

SCHEDULES = ("cosine", "linear", "square", "sqrt")


def mask_ratio(progress: float, schedule: str = "cosine") -> float:
    """Fraction of the frame's tokens still masked at decoding progress in [0, 1].

    1 at progress 0 (everything masked), 0 at progress 1, non-increasing in between.
    """
    r = min(max(float(progress), 0.0), 1.0)
    if schedule == "cosine":
        return math.cos(math.pi / 2 * r)
    if schedule == "linear":
        return 1.0 - r
    if schedule == "square":
        return 1.0 - r * r
    if schedule == "sqrt":
        return 1.0 - math.sqrt(r)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")


def masked_counts(steps: int, num_tokens: int, schedule: str = "cosine") -> list[int]:
    """Tokens still masked before each step and after the last: length steps + 1.

    counts[0] = num_tokens, counts[-1] = 0, strictly decreasing while steps <= num_tokens (each
    step commits at least one token), so decoding always finishes in exactly `steps` steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    counts = [num_tokens]
    for s in range(1, steps + 1):
        c = int(math.floor(num_tokens * mask_ratio(s / steps, schedule)))
        # every step commits at least one token, and leaves at least one for each later step
        counts.append(max(0, min(max(c, steps - s), counts[-1] - 1)))
    counts[-1] = 0
    return counts


@torch.no_grad()
def maskgit_fill(
    predict: Callable[[Tensor], Tensor],
    head: nn.Module,
    shape: tuple[int, int],
    mask_id: int,
    steps: int,
    temperature: float = 1.0,
    schedule: str = "cosine",
    generator: torch.Generator | None = None,
    confidence_noise: float = 0.0,
    device: torch.device | str | None = None,
    gumbel_max: bool = False,
) -> Tensor:
    """MaskGIT's iterative decoding of one frame of `shape` (B, N) token ids, all masked at first.

    `predict(frame (B, N) ids, mask id allowed)` gives the hidden states (B, N, D) of the frame
    and `head` maps them to logits (B, ., V). Each of the `steps` iterations samples every masked
    token, keeps the most confident ones and re-masks the rest following `schedule`
    (`masked_counts`); `temperature` 0 is greedy; `confidence_noise` > 0 adds MaskGIT's annealed
    Gumbel noise to the confidences that choose what to keep. Samples are drawn by inverse CDF
    (one uniform per token), or by Gumbel-max with `gumbel_max` (TECO's prior: the same
    distribution, another use of the generator). Returns the frame (B, N) long.
    """
    b, n = shape
    frame = torch.full((b, n), mask_id, dtype=torch.long, device=device)
    counts = masked_counts(steps, n, schedule)
    for s in range(steps):
        still_masked = frame == mask_id  # (B, N): the same count in every row
        m = int(still_masked[0].sum())
        if m == 0:
            break  # more steps than tokens: the schedule finished early
        hidden = predict(frame)  # (B, N, D)
        # the head runs on the masked positions only (it is half the compute of a step)
        where = still_masked.nonzero()[:, 1].view(b, m)  # (B, m) positions, ascending
        picked = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = head(picked).float()  # (B, m, V)
        vocab = logits.shape[-1]
        if temperature > 0 and gumbel_max:
            logits = logits / temperature
            sampled = (logits + gumbel_noise(logits.shape, generator, logits.device)).argmax(-1)
            probs = F.softmax(logits, dim=-1)
        elif temperature > 0:
            probs = F.softmax(logits / temperature, dim=-1)
            # inverse-CDF sampling: one uniform per token (torch.multinomial draws one
            # exponential per vocabulary entry, ~10x the cost here)
            u = torch.rand(b, m, 1, generator=generator, device=logits.device)
            sampled = torch.searchsorted(probs.cumsum(dim=-1), u)[..., 0]
            sampled = sampled.clamp_max(vocab - 1)  # cumsum may end just below u
        else:
            probs = F.softmax(logits, dim=-1)
            sampled = logits.argmax(dim=-1)
        conf = probs.gather(-1, sampled[..., None])[..., 0]  # (B, m)
        if confidence_noise > 0:
            # MaskGIT: Gumbel noise on the log-confidences, annealed to 0 over the steps
            gumbel = gumbel_noise(conf.shape, generator, conf.device)
            noise = confidence_noise * (1 - (s + 1) / steps)
            conf = conf.clamp_min(1e-20).log() + noise * gumbel
        frame.scatter_(1, where, sampled)  # commit every sample, then re-mask the least sure
        remask = counts[s + 1]
        if remask > 0:
            lowest = conf.topk(remask, dim=-1, largest=False).indices  # (B, remask)
            frame.scatter_(1, where.gather(1, lowest), mask_id)
    return frame


def frame_conditions(actions: Tensor, num_frames: int, start_id: int) -> Tensor:
    """Conditioning id per frame (B, T) of actions (B, >= T - 1): `start_id` ("no previous
    action") for frame 0, actions[:, t-1] for frame t."""
    b = actions.shape[0]
    start = torch.full((b, 1), start_id, dtype=torch.long, device=actions.device)
    return torch.cat([start, actions[:, : num_frames - 1].long()], dim=1)


@dataclass
class DynamicsCache:
    """Cached temporal keys/values of the context frames, plus what they were computed from."""

    kv: KVCache
    tokens: Tensor  # (B, L, N) long: the cached frames
    actions: Tensor  # (B, L) long: the conditioning ids of those frames (start id for frame 0)

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


class DynamicsModel(nn.Module, WorldModel):
    """MaskGIT space-time transformer over video tokens with per-frame action conditioning."""

    def __init__(
        self,
        vocab_size: int = 1000,
        num_actions: int = 8,
        grid: list[int] | tuple[int, int] = (8, 8),
        max_frames: int = 16,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        mask_rate_min: float = 0.5,
        mask_rate_max: float = 1.0,
        context_frames: int = 1,
        cond_mode: str = "adaln",
        rel_pos_bias: bool = True,
        local_conv: bool = True,
        label_smoothing: float = 0.0,
        mask_strategy: str = "random",
    ) -> None:
        super().__init__()
        if len(grid) != 2:
            raise ValueError(f"grid must be [h, w], got {grid}")
        check_mask_strategy(mask_strategy, (int(grid[0]), int(grid[1])))
        if not 0.0 < mask_rate_min <= mask_rate_max <= 1.0:
            raise ValueError(
                f"need 0 < mask_rate_min <= mask_rate_max <= 1, "
                f"got {mask_rate_min}, {mask_rate_max}"
            )
        if not 0 <= context_frames < max_frames:
            raise ValueError(f"context_frames={context_frames} must be in [0, {max_frames})")
        self.vocab_size = vocab_size
        self.num_actions = num_actions
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_tokens = self.grid[0] * self.grid[1]
        self.max_frames = max_frames
        self.mask_id = vocab_size  # the extra embedding row
        self.start_id = num_actions  # "no previous action": conditions frame 0
        self.mask_rate_min = mask_rate_min
        self.mask_rate_max = mask_rate_max
        self.context_frames = context_frames
        self.label_smoothing = label_smoothing
        self.mask_strategy = mask_strategy

        self.token_emb = nn.Embedding(vocab_size + 1, dim)
        self.action_emb = nn.Embedding(num_actions + 1, dim)
        self.transformer = STTransformer(
            dim=dim,
            depth=depth,
            heads=heads,
            num_tokens=self.num_tokens,
            max_frames=max_frames,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attn_dropout=attn_dropout,
            drop_path=drop_path,
            causal=True,
            cond_mode=cond_mode,
            grid=self.grid,
            rel_pos_bias=rel_pos_bias,
            local_conv=local_conv,
        )
        self.head = nn.Linear(dim, vocab_size)
        for m in (self.token_emb, self.action_emb, self.head):
            m.apply(init_weights)

    @staticmethod
    def check_config(model: DictConfig, data: DictConfig, ev: DictConfig) -> list[str]:
        """What `validate` reports about this model's config: the training mask's strategy."""
        strategy = model.get("mask_strategy", "random")
        return mask_strategy_problems(strategy, list(model.get("grid") or (8, 8)))

    # ------------------------------------------------------------------ checks
    def _check_tokens(
        self, tokens: Tensor, name: str = "tokens", valid: Tensor | None = None
    ) -> None:
        """Shape (B, T, h, w) with the model's grid; ids in [0, vocab_size) on `valid` frames."""
        check_token_ids(tokens, name, self.grid, self.vocab_size, valid)

    def _check_actions(self, actions: Tensor, valid: Tensor | None = None) -> None:
        """Actions that condition a frame must lie in [0, num_actions); `valid` masks the rest."""
        check_action_ids(actions, self.num_actions, valid)

    # ------------------------------------------------------------------ model
    def frame_conditions(self, actions: Tensor, num_frames: int) -> Tensor:
        """Conditioning id per frame (B, T): start id for frame 0, actions[:, t-1] for frame t."""
        return frame_conditions(actions, num_frames, self.start_id)

    def forward(
        self,
        tokens: Tensor,
        cond_ids: Tensor,
        cache: KVCache | None = None,
        update_cache: bool = True,
    ) -> Tensor:
        """Hidden states (B, T, N, D) for token ids (B, T, N) (mask id allowed) and
        conditioning ids (B, T) (see `frame_conditions`)."""
        x = self.token_emb(tokens)  # (B, T, N, D)
        cond = self.action_emb(cond_ids)  # (B, T, D)
        return self.transformer(x, cond, cache=cache, update_cache=update_cache)

    def logits(self, tokens: Tensor, actions: Tensor) -> Tensor:
        """Logits (B, T, h, w, V) of every position of token ids (B, T, h, w) (mask id allowed),
        actions (B, T) as in the batch convention. Used for tests and analysis."""
        b, t = tokens.shape[:2]
        cond = self.frame_conditions(actions, t)
        h = self.forward(rearrange(tokens, "b t h w -> b t (h w)"), cond)
        return rearrange(self.head(h), "b t (h w) v -> b t h w v", h=self.grid[0])

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        tokens, actions = batch["tokens"], batch["actions"]
        if tokens.dim() != 4:
            raise ValueError(f"tokens must be (B, T, h, w), got shape {tuple(tokens.shape)}")
        b, t = tokens.shape[:2]
        frame_mask = batch.get("mask")
        real = (
            torch.ones(b, t, dtype=torch.bool, device=tokens.device)
            if frame_mask is None
            else frame_mask.bool()
        )
        self._check_tokens(tokens, valid=real)
        if actions.shape[:2] != (b, t):
            raise ValueError(f"actions must be (B, T)=({b}, {t}), got {tuple(actions.shape)}")
        # actions[:, i] conditions frame i+1: it must be valid wherever frame i+1 is real
        self._check_actions(actions[:, : t - 1], real[:, 1:])
        safe_actions = torch.where(real[:, 1:], actions[:, : t - 1], 0)
        cond = self.frame_conditions(safe_actions, t)

        x = rearrange(tokens.long(), "b t h w -> b t (h w)")
        x = torch.where(real[:, :, None], x, 0)  # padding frames: any valid id
        rate = torch.empty(b, 1, 1, device=x.device).uniform_(
            self.mask_rate_min, self.mask_rate_max
        )
        masked = draw_mask(rate, x.shape, self.grid, self.mask_strategy)  # (B, T, N)
        masked[:, : self.context_frames] = False
        masked &= real[:, :, None]
        if not bool(masked.any()):
            # a degenerate draw (e.g. tiny grid): predict one token rather than nothing
            masked[:, -1, 0] = real[:, -1]
        inputs = x.masked_fill(masked, self.mask_id)
        hidden = self.forward(inputs, cond)  # (B, T, N, D)
        if not bool(masked.any()):  # nothing to predict (all padding): a zero loss, not NaN
            zero = hidden.sum() * 0.0
            return zero, {k: zero.detach() for k in ("ce", "masked_acc", "mask_rate")}
        # the head on the masked positions, padded to a few fixed sizes (see models/masking.py)
        ce, metrics = masked_ce(self.head, hidden, x, masked, self.label_smoothing)
        metrics = {
            **metrics,
            "mask_rate": masked.float().sum()
            / (real[:, self.context_frames :].sum() * self.num_tokens).clamp_min(1),
        }
        return ce, metrics

    # ------------------------------------------------------------------ sampling
    def new_cache(self, tokens: Tensor, actions: Tensor) -> DynamicsCache:
        """Encode context frames (B, L, h, w) with actions (B, >= L-1) into a cache."""
        self._check_tokens(tokens, "tokens_context")
        b, l = tokens.shape[:2]
        if actions.dim() != 2 or actions.shape[0] != b or actions.shape[1] < l - 1:
            raise ValueError(
                f"actions must be (B, >= L-1)=({b}, {l - 1}) for {l} context frames, "
                f"got {tuple(actions.shape)}"
            )
        self._check_actions(actions[:, : l - 1])
        cond = self.frame_conditions(actions, l)
        cache = DynamicsCache(
            kv=self.transformer.new_cache(),
            tokens=rearrange(tokens.long(), "b t h w -> b t (h w)"),
            actions=cond,
        )
        self.forward(cache.tokens, cond, cache=cache.kv, update_cache=True)
        return cache

    def _extend_cache(self, cache: DynamicsCache, x: Tensor, cond: Tensor) -> None:
        """Bring `cache` up to the context x (B, t, N) / cond (B, t): encode the missing frames."""
        n = cache.length
        if (
            n > x.shape[1]
            or cache.tokens.shape[0] != x.shape[0]
            or not torch.equal(cache.tokens, x[:, :n])
            or not torch.equal(cache.actions, cond[:, :n])
        ):
            raise ValueError(
                "cache does not match tokens_context/actions (it must hold a prefix of this "
                "context); pass cache=None to start a new one"
            )
        if n < x.shape[1]:
            self.forward(x[:, n:], cond[:, n:], cache=cache.kv, update_cache=True)
            cache.tokens = x.clone()
            cache.actions = cond.clone()

    @torch.no_grad()
    def generate_next(
        self,
        tokens_context: Tensor,
        actions: Tensor,
        steps: int = 8,
        temperature: float = 1.0,
        schedule: str = "cosine",
        generator: torch.Generator | None = None,
        cache: DynamicsCache | None = None,
        use_cache: bool = True,
        confidence_noise: float = 0.0,
    ) -> Tensor:
        """Sample the frame after `tokens_context` (B, t, h, w) -> (B, h, w) long.

        `actions` (B, t): actions[:, i] is the action taken after context frame i, so
        actions[:, t-1] drives the new frame. `cache`: a `DynamicsCache` over a prefix of this
        context (from `new_cache` or a previous call); it is extended in place with the context
        frames it lacks. `use_cache=False` re-runs the whole context at every step (reference
        path; same tokens for the same generator). `temperature` 0 = greedy. `confidence_noise`
        > 0 adds MaskGIT's annealed Gumbel noise to the confidences that choose what to keep.
        """
        self._check_tokens(tokens_context, "tokens_context")
        b, t = tokens_context.shape[:2]
        if actions.dim() != 2 or actions.shape[0] != b or actions.shape[1] < t:
            raise ValueError(
                f"actions must be (B, t)=({b}, {t}) for a {t}-frame context, "
                f"got {tuple(actions.shape)}"
            )
        actions = actions[:, :t]
        self._check_actions(actions)
        if t + 1 > self.max_frames:
            raise ValueError(
                f"context of {t} frames + 1 new frame exceeds max_frames={self.max_frames}; "
                "use rollout(), which slides the window"
            )
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
        x = rearrange(tokens_context.long(), "b t h w -> b t (h w)")
        cond = self.frame_conditions(actions, t + 1)  # (B, t + 1): last = new frame's action
        if use_cache:
            if cache is None:
                cache = self.new_cache(tokens_context, actions)
            else:
                self._extend_cache(cache, x, cond[:, :t])

        def predict(frame: Tensor) -> Tensor:  # (B, N) ids -> hidden states (B, N, D)
            if use_cache:
                hidden = self.forward(frame[:, None], cond[:, t:], cache.kv, update_cache=False)
            else:
                hidden = self.forward(torch.cat([x, frame[:, None]], dim=1), cond)
            return hidden[:, -1]

        frame = maskgit_fill(
            predict,
            self.head,
            (b, self.num_tokens),
            self.mask_id,
            steps,
            temperature,
            schedule,
            generator,
            confidence_noise,
            x.device,
        )
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
        """Generate `horizon` frames after context (B, t0, h, w) -> (B, horizon, h, w).

        actions (B, >= t0 + horizon - 1) over the whole sequence: actions[:, i] is taken after
        frame i (context frames first, then generated ones). The context window holds at most
        max_frames - 1 frames before each new frame; when it slides, the cache is rebuilt.
        """
        self._check_tokens(context_tokens, "context_tokens")
        b, t0 = context_tokens.shape[:2]
        need = t0 + horizon - 1
        if actions.dim() != 2 or actions.shape[0] != b or actions.shape[1] < need:
            raise ValueError(
                f"actions must be (B, >= t0 + horizon - 1)=({b}, {need}), "
                f"got {tuple(actions.shape)}"
            )
        self._check_actions(actions[:, :need])
        return sliding_rollout(
            self,
            context_tokens,
            actions,
            horizon,
            window=self.max_frames - 1,  # the new frame takes the last place
            use_cache=use_cache,
            steps=steps,
            temperature=temperature,
            schedule=schedule,
            generator=generator,
            confidence_noise=confidence_noise,
        )
