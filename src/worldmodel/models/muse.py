"""Muse's cascade as a world model: a coarse MaskGIT world model and a super-resolution MaskGIT.

Muse (Chang et al., 2023, "Muse: Text-To-Image Generation via Masked Generative Transformers")
generates an image in two stages: a base masked transformer predicts the tokens of a low-resolution
tokenizer (16x16), then a super-resolution masked transformer predicts the tokens of a
high-resolution tokenizer (64x64) conditioned on the low-resolution ones. Here, for video with
actions:

    fine tokens x_t (h, w)  --CoarseTokenizer (2x2 cells -> FSQ)-->  coarse codes c_t (h/f, w/f)
    base:        c_0..c_t, action a_t  -> c_{t+1}            (a `DynamicsModel` over coarse codes)
    super-res:   x_0..x_t, c_0..c_{t+1}, a_t -> x_{t+1}      (MaskGIT over fine tokens; the coarse
                                                              code of each cell is added to the
                                                              embeddings of the f x f tokens it
                                                              covers)

Generation of a frame: `steps` MaskGIT iterations on the coarse grid, then `fine_steps` on the
fine grid (`maskgit_fill`, the dynamics model's decoding loop), each with the KV cache of the
past frames; `mask_strategy` (random | block | multiscale) is the training mask of both stages.

Why this design (the house serves ONE frozen tokenizer per world model: the World, the pipeline
and the evaluation decode, cache and score one token grid): the world's tokenizer is the FINE one
and this model reads its token ids (`inputs = "tokens"`, no codes of its own), so rollouts return
fine tokens that the World decodes as it does for the dynamics model, and nothing outside this
file changes. Muse's second, low-resolution tokenizer is this model's own `CoarseTokenizer`: each
f x f cell of fine tokens is embedded, quantized with FSQ (no codebook to collapse) and decoded
back to the cell's token ids (a cross-entropy reconstruction loss), trained alongside the two
transformers. Its codes enter the transformers as ids (no gradient flows from them into the
coarse tokenizer), as Muse's frozen low-resolution tokenizer does. The coarse codes of any frame
are a function of its fine tokens, so the fine tokens are the whole state of a rollout: after a
frame is generated, its coarse codes are recomputed from its fine tokens.

Loss: base masked CE (on the coarse codes) * `base_weight` + super-res masked CE (on the fine
tokens, given the true coarse codes) + `rec_weight` * coarse reconstruction CE (on a random
`rec_fraction` of the cells). Logged apart as `base_ce`, `sr_ce` and `coarse_rec_ce`; `ce` is the
cascade's per fine token, sr_ce + base_ce * (coarse tokens / fine tokens) (the coarse codes are a
function of the fine tokens, so -log p(x) = -log p(c) - log p(x | c)), and `masked_acc` is the
super-res stage's.

Actions follow the project's convention (`actions[:, t]` leads from frame t to t + 1) and condition
both stages the same way as `DynamicsModel` (added to frame t + 1, adaLN by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from omegaconf import DictConfig
from torch import Tensor, nn

from worldmodel.models.checks import check_id_dtype, check_id_range
from worldmodel.models.dynamics import DynamicsCache, DynamicsModel, maskgit_fill
from worldmodel.models.interfaces import WorldModel
from worldmodel.models.masking import draw_mask, mask_strategy_problems, masked_ce
from worldmodel.models.quantize import build_quantizer
from worldmodel.models.sampling import sliding_rollout
from worldmodel.models.st_transformer import KVCache, STTransformer, init_weights


def grid_problems(grid: Any, coarse_grid: Any) -> list[str]:
    """What is wrong with a fine `model.grid` and a `model.coarse_grid`; [] if they fit."""
    try:
        fine = [int(g) for g in grid]
        coarse = [int(g) for g in coarse_grid]
    except (TypeError, ValueError):
        return [f"model.grid={grid} and model.coarse_grid={coarse_grid} must be [h, w] integers"]
    if len(fine) != 2 or len(coarse) != 2 or min(fine + coarse) < 1:
        return [f"model.grid={fine} and model.coarse_grid={coarse} must be [h, w], h, w >= 1"]
    if fine[0] % coarse[0] or fine[1] % coarse[1]:
        return [
            f"model.grid={fine} is not a multiple of model.coarse_grid={coarse}: every coarse "
            "code must cover a whole f x f cell of fine tokens"
        ]
    if fine == coarse:
        return [
            f"model.coarse_grid={coarse} equals model.grid: the base stage needs a coarser grid "
            "(e.g. half of it)"
        ]
    return []


class CoarseTokenizer(nn.Module):
    """Muse's low-resolution tokenizer, over the fine token grid: each (fh, fw) cell of fine ids
    (B, T, h, w) -> one FSQ code (B, T, h/fh, w/fw), and back to logits of the cell's fine ids.

    Every cell is coded alone (a per-frame, per-cell map), so a frame's coarse codes depend on
    that frame's fine tokens only.
    """

    def __init__(
        self, vocab_size: int, factor: tuple[int, int], dim: int, levels: list[int]
    ) -> None:
        super().__init__()
        self.factor = factor
        cell = factor[0] * factor[1]
        self.emb = nn.Embedding(vocab_size, dim)
        self.encoder = nn.Sequential(nn.Linear(cell * dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.quantizer = build_quantizer("fsq", dim, levels=list(levels))
        self.decoder = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, cell * dim))
        # PyTorch's default (wide) initialisation: from the transformers' std 0.02 every cell
        # would start in FSQ's centre code
        self.head = nn.Linear(dim, vocab_size)

    @property
    def codebook_size(self) -> int:
        return int(self.quantizer.codebook_size)

    def encode(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Fine ids (B, T, h, w) -> (codes (B, T, hc, wc, D), coarse ids (B, T, hc, wc) long,
        quantizer loss, stats)."""
        fh, fw = self.factor
        e = self.emb(tokens.long())  # (B, T, h, w, D)
        e = rearrange(e, "b t (hc fh) (wc fw) d -> b t hc wc (fh fw d)", fh=fh, fw=fw)
        z = self.encoder(e)  # (B, T, hc, wc, D)
        codes, ids, aux, stats = self.quantizer(rearrange(z, "b t hc wc d -> b d t hc wc"))
        return rearrange(codes, "b d t hc wc -> b t hc wc d"), ids.long(), aux, stats

    def cells(self, tokens: Tensor) -> Tensor:
        """Fine ids (B, T, h, w) -> the ids of each cell (B, T, hc, wc, fh fw), row-major."""
        fh, fw = self.factor
        return rearrange(tokens, "b t (hc fh) (wc fw) -> b t hc wc (fh fw)", fh=fh, fw=fw)

    def decode_logits(self, codes: Tensor) -> Tensor:
        """Codes (..., D) -> logits (..., fh fw, V) of the fine ids of their cells (row-major)."""
        y = self.decoder(codes)  # (..., fh fw D)
        return self.head(rearrange(y, "... (f d) -> ... f d", f=self.factor[0] * self.factor[1]))


class SuperResolution(nn.Module):
    """Muse's super-resolution transformer: MaskGIT over the fine tokens of each frame, with the
    coarse code of every cell added to the embeddings of the fine tokens it covers, causal
    temporal attention over the past frames and the action of each frame (as `DynamicsModel`)."""

    def __init__(
        self,
        vocab_size: int,
        coarse_vocab: int,
        num_actions: int,
        grid: tuple[int, int],
        coarse_grid: tuple[int, int],
        max_frames: int,
        dim: int,
        depth: int,
        heads: int,
        **block: Any,
    ) -> None:
        super().__init__()
        self.grid, self.coarse_grid = grid, coarse_grid
        self.factor = (grid[0] // coarse_grid[0], grid[1] // coarse_grid[1])
        self.vocab_size = vocab_size
        self.mask_id = vocab_size  # the extra embedding row
        self.token_emb = nn.Embedding(vocab_size + 1, dim)
        self.coarse_emb = nn.Embedding(coarse_vocab, dim)
        self.action_emb = nn.Embedding(num_actions + 1, dim)  # + the start id of frame 0
        self.transformer = STTransformer(
            dim=dim,
            depth=depth,
            heads=heads,
            num_tokens=grid[0] * grid[1],
            max_frames=max_frames,
            causal=True,
            grid=grid,
            **block,
        )
        self.head = nn.Linear(dim, vocab_size)
        for m in (self.token_emb, self.coarse_emb, self.action_emb, self.head):
            m.apply(init_weights)

    def forward(
        self,
        tokens: Tensor,
        coarse: Tensor,
        cond_ids: Tensor,
        cache: KVCache | None = None,
        update_cache: bool = True,
    ) -> Tensor:
        """Hidden states (B, T, N, D) of fine ids (B, T, N) (mask id allowed), the frames'
        coarse ids (B, T, hc, wc) and conditioning ids (B, T)."""
        fh, fw = self.factor
        up = repeat(self.coarse_emb(coarse), "b t hc wc d -> b t (hc fh wc fw) d", fh=fh, fw=fw)
        x = self.token_emb(tokens) + up  # (B, T, N, D)
        return self.transformer(
            x, self.action_emb(cond_ids), cache=cache, update_cache=update_cache
        )


@dataclass
class MuseCache:
    """The base stage's cache (over the coarse codes) and the super-resolution stage's temporal
    keys/values, with the fine frames, coarse codes and conditioning ids they were computed from."""

    base: DynamicsCache
    kv: KVCache
    tokens: Tensor  # (B, L, N) long: the cached fine frames
    coarse: Tensor  # (B, L, hc, wc) long: their coarse codes
    cond: Tensor  # (B, L) long: their conditioning ids (start id for frame 0)

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


class MuseWorldModel(nn.Module, WorldModel):
    """A coarse MaskGIT world model and a super-resolution MaskGIT over a fine token grid.

    Sizes: `grid` = the (fine) tokenizer's (h, w), `coarse_grid` divides it; `coarse_levels` /
    `coarse_dim` of the coarse tokenizer (FSQ levels: the base stage's vocabulary is their
    product; `rec_fraction` of its cells get the reconstruction loss in a batch); `dim`, `heads`,
    ... shared by both transformers, `base_depth` and `sr_depth` their depths. `fine_steps`:
    MaskGIT iterations of the fine stage (the `steps` of a sampling call are the coarse stage's).
    """

    def __init__(
        self,
        vocab_size: int = 1000,
        num_actions: int = 8,
        grid: list[int] | tuple[int, int] = (16, 16),
        coarse_grid: list[int] | tuple[int, int] = (8, 8),
        coarse_levels: list[int] | tuple[int, ...] = (8, 5, 5, 5),
        coarse_dim: int = 64,
        max_frames: int = 16,
        dim: int = 128,
        base_depth: int = 4,
        sr_depth: int = 2,
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
        fine_steps: int = 8,
        base_weight: float = 1.0,
        rec_weight: float = 1.0,
        rec_fraction: float = 0.25,
    ) -> None:
        super().__init__()
        problems = grid_problems(grid, coarse_grid)
        if problems:
            raise ValueError("; ".join(problems))
        if int(fine_steps) < 1:
            raise ValueError(f"model.fine_steps={fine_steps} must be >= 1")
        if not 0.0 < float(rec_fraction) <= 1.0:
            raise ValueError(f"model.rec_fraction={rec_fraction} must be in (0, 1]")
        self.vocab_size = int(vocab_size)
        self.num_actions = int(num_actions)
        self.grid = (int(grid[0]), int(grid[1]))
        self.coarse_grid = (int(coarse_grid[0]), int(coarse_grid[1]))
        self.factor = (self.grid[0] // self.coarse_grid[0], self.grid[1] // self.coarse_grid[1])
        self.num_tokens = self.grid[0] * self.grid[1]
        self.max_frames = int(max_frames)
        self.mask_rate_min, self.mask_rate_max = float(mask_rate_min), float(mask_rate_max)
        self.context_frames = int(context_frames)
        self.label_smoothing = float(label_smoothing)
        self.mask_strategy = mask_strategy
        self.fine_steps = int(fine_steps)
        self.base_weight, self.rec_weight = float(base_weight), float(rec_weight)
        self.rec_fraction = float(rec_fraction)

        self.coarse = CoarseTokenizer(self.vocab_size, self.factor, coarse_dim, list(coarse_levels))
        block = dict(
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attn_dropout=attn_dropout,
            drop_path=drop_path,
            cond_mode=cond_mode,
            rel_pos_bias=rel_pos_bias,
            local_conv=local_conv,
        )
        # the base stage is the dynamics model itself, over the coarse codes (it checks the mask
        # strategy, the masking rates and context_frames against its grid)
        self.base = DynamicsModel(
            vocab_size=self.coarse.codebook_size,
            num_actions=self.num_actions,
            grid=self.coarse_grid,
            max_frames=self.max_frames,
            dim=dim,
            depth=base_depth,
            heads=heads,
            mask_rate_min=mask_rate_min,
            mask_rate_max=mask_rate_max,
            context_frames=context_frames,
            label_smoothing=label_smoothing,
            mask_strategy=mask_strategy,
            **block,
        )
        problems = mask_strategy_problems(mask_strategy, self.grid)
        if problems:
            raise ValueError("; ".join(problems))
        self.sr = SuperResolution(
            self.vocab_size,
            self.coarse.codebook_size,
            self.num_actions,
            self.grid,
            self.coarse_grid,
            self.max_frames,
            dim,
            sr_depth,
            heads,
            **block,
        )

    @staticmethod
    def check_config(model: DictConfig, data: DictConfig, ev: DictConfig) -> list[str]:
        """What `validate` reports: the grids, the fine stage's steps, the mask strategy on both
        grids."""
        grid, coarse = model.get("grid") or (16, 16), model.get("coarse_grid") or (8, 8)
        problems = grid_problems(grid, coarse)
        if int(model.get("fine_steps", 8)) < 1:
            problems.append(f"model.fine_steps={model.get('fine_steps')} must be >= 1")
        strategy = model.get("mask_strategy", "random")
        if not problems:
            for g in (list(coarse), list(grid)):
                for p in mask_strategy_problems(strategy, g):
                    if p not in problems:
                        problems.append(p)
        return problems

    # ------------------------------------------------------------------ checks
    def _check_tokens(
        self, tokens: Tensor, name: str = "tokens", valid: Tensor | None = None
    ) -> None:
        """Fine ids (B, T, h, w) of the model's grid, in [0, vocab_size) on `valid` frames."""
        if tokens.dim() != 4 or tuple(tokens.shape[2:]) != self.grid:
            raise ValueError(
                f"{name} must be (B, T, h, w) with (h, w) = {self.grid} (the fine grid), "
                f"got {tuple(tokens.shape)}"
            )
        check_id_dtype(tokens, name)
        check_id_range(tokens if valid is None else tokens[valid], name, self.vocab_size)

    # ------------------------------------------------------------------ model
    def coarse_codes(self, tokens: Tensor) -> Tensor:
        """Coarse codes (B, T, hc, wc) long of fine ids (B, T, h, w)."""
        self._check_tokens(tokens)
        return self.coarse.encode(tokens)[1]

    def sr_logits(self, tokens: Tensor, coarse: Tensor, actions: Tensor) -> Tensor:
        """Super-resolution logits (B, T, h, w, V) of fine ids (B, T, h, w) (mask id allowed)
        given coarse codes (B, T, hc, wc) and actions (B, T). For tests and analysis."""
        cond = self.base.frame_conditions(actions, tokens.shape[1])
        hidden = self.sr(rearrange(tokens.long(), "b t h w -> b t (h w)"), coarse, cond)
        return rearrange(self.sr.head(hidden), "b t (h w) v -> b t h w v", h=self.grid[0])

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Base CE (coarse codes) + super-res CE (fine tokens) + coarse reconstruction CE.

        batch: `tokens` (B, T, h, w) fine ids, `actions` (B, T), optional `mask` (B, T) bool."""
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
        # actions[:, i] conditions frame i+1: valid wherever frame i+1 is real; the rest -> 0
        self.base._check_actions(actions[:, : t - 1], real[:, 1:])
        used = torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], dim=1)  # (B, T)
        safe_actions = torch.where(used, actions.long(), 0)  # (B, T)
        x = torch.where(real[:, :, None, None], tokens.long(), 0)  # padding frames: any valid id

        # Muse's low-resolution tokenizer: fine cells -> coarse codes -> fine ids again
        codes, coarse, aux, stats = self.coarse.encode(x)  # (B, T, hc, wc, D), (B, T, hc, wc)
        # reconstruction on a random `rec_fraction` of the real frames' cells: its 1000-way
        # logits over every fine position would cost as much as a transformer layer
        pick = real[:, :, None, None].expand_as(coarse)  # (B, T, hc, wc)
        if self.rec_fraction < 1.0:
            pick = pick & (torch.rand(pick.shape, device=x.device) < self.rec_fraction)
            if not bool(pick.any()):
                pick = real[:, :, None, None].expand_as(coarse)
        rec_logits = self.coarse.decode_logits(codes[pick]).float()  # (M, fh fw, V)
        cell_ids = self.coarse.cells(x)[pick]  # (M, fh fw)
        rec_ce = F.cross_entropy(rec_logits.flatten(0, 1), cell_ids.flatten())
        with torch.no_grad():
            rec_acc = (rec_logits.argmax(-1) == cell_ids).float().mean()

        # the base stage: the dynamics model over the coarse codes
        base_loss, base_metrics = self.base.loss(
            {"tokens": coarse, "actions": safe_actions, "mask": real}
        )

        # the super-resolution stage: masked fine tokens given every frame's coarse codes
        cond = self.base.frame_conditions(safe_actions, t)  # (B, T)
        flat = rearrange(x, "b t h w -> b t (h w)")
        rate = torch.empty(b, 1, 1, device=x.device).uniform_(
            self.mask_rate_min, self.mask_rate_max
        )
        masked = draw_mask(rate, flat.shape, self.grid, self.mask_strategy)  # (B, T, N)
        masked[:, : self.context_frames] = False
        masked &= real[:, :, None]
        if not bool(masked.any()):
            masked[:, -1, 0] = real[:, -1]  # a degenerate draw: predict one token
        hidden = self.sr(flat.masked_fill(masked, self.sr.mask_id), coarse, cond)  # (B, T, N, D)
        if bool(masked.any()):
            sr_loss, sr_metrics = masked_ce(
                self.sr.head, hidden, flat, masked, self.label_smoothing
            )
        else:  # nothing to predict (all padding): a zero loss, not NaN
            sr_loss = hidden.sum() * 0.0
            sr_metrics = {"ce": sr_loss.detach(), "masked_acc": sr_loss.detach()}

        loss = self.base_weight * base_loss + sr_loss + self.rec_weight * rec_ce + aux
        ratio = self.coarse_grid[0] * self.coarse_grid[1] / self.num_tokens
        metrics = {
            "ce": sr_metrics["ce"] + ratio * base_metrics["ce"],
            "masked_acc": sr_metrics["masked_acc"],
            "base_ce": base_metrics["ce"],
            "base_masked_acc": base_metrics["masked_acc"],
            "sr_ce": sr_metrics["ce"],
            "coarse_rec_ce": rec_ce.detach(),
            "coarse_rec_acc": rec_acc,
            "mask_rate": masked.float().sum()
            / (real[:, self.context_frames :].sum() * self.num_tokens).clamp_min(1),
            "codebook/usage": stats["usage"],
            "codebook/perplexity": stats["perplexity"],
        }
        return loss, metrics

    # ------------------------------------------------------------------ sampling
    def _check_context(self, tokens: Tensor, actions: Tensor, need: int, name: str) -> None:
        self._check_tokens(tokens, name)
        b = tokens.shape[0]
        if actions.dim() != 2 or actions.shape[0] != b or actions.shape[1] < need:
            raise ValueError(
                f"actions must be (B, >= {need})=({b}, {need}) for {name} of "
                f"{tokens.shape[1]} frames, got {tuple(actions.shape)}"
            )
        self.base._check_actions(actions[:, :need])

    def new_cache(self, tokens: Tensor, actions: Tensor) -> MuseCache:
        """Encode context frames (B, L, h, w) with actions (B, >= L-1) into both stages' caches."""
        length = tokens.shape[1]
        self._check_context(tokens, actions, length - 1, "tokens_context")
        coarse = self.coarse_codes(tokens)  # (B, L, hc, wc)
        cond = self.base.frame_conditions(actions, length)  # (B, L)
        x = rearrange(tokens.long(), "b t h w -> b t (h w)")
        kv = self.sr.transformer.new_cache()
        self.sr(x, coarse, cond, cache=kv, update_cache=True)
        base = self.base.new_cache(coarse, actions)
        return MuseCache(base=base, kv=kv, tokens=x, coarse=coarse, cond=cond)

    def _extend_cache(self, cache: MuseCache, tokens: Tensor, cond: Tensor) -> None:
        """Bring `cache` up to the context tokens (B, t, h, w) / cond (B, t): the super-res
        stage encodes the missing frames (the base stage extends its own cache)."""
        x = rearrange(tokens.long(), "b t h w -> b t (h w)")
        n = cache.length
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
        if n < x.shape[1]:
            coarse = self.coarse_codes(tokens[:, n:])  # (B, t - n, hc, wc): per frame
            self.sr(x[:, n:], coarse, cond[:, n:], cache=cache.kv, update_cache=True)
            cache.tokens = x.clone()
            cache.coarse = torch.cat([cache.coarse, coarse], dim=1)
            cache.cond = cond.clone()

    @torch.no_grad()
    def generate_next(
        self,
        tokens_context: Tensor,
        actions: Tensor,
        steps: int = 8,
        temperature: float = 1.0,
        schedule: str = "cosine",
        generator: torch.Generator | None = None,
        cache: MuseCache | None = None,
        use_cache: bool = True,
        confidence_noise: float = 0.0,
        fine_steps: int | None = None,
    ) -> Tensor:
        """Sample the fine frame after `tokens_context` (B, t, h, w) -> (B, h, w) long: its
        coarse codes in `steps` MaskGIT iterations of the base stage, then its fine tokens in
        `fine_steps` (default: the model's) iterations of the super-res stage.

        `actions` (B, >= t): actions[:, t-1] drives the new frame. `cache`: a `MuseCache` over a
        prefix of this context, extended in place; `use_cache=False` re-runs the whole context
        at every step (reference path: the same tokens for the same generator)."""
        b, t = tokens_context.shape[:2]
        self._check_context(tokens_context, actions, t, "tokens_context")
        actions = actions[:, :t]
        if t + 1 > self.max_frames:
            raise ValueError(
                f"context of {t} frames + 1 new frame exceeds max_frames={self.max_frames}; "
                "use rollout(), which slides the window"
            )
        fine_steps = self.fine_steps if fine_steps is None else int(fine_steps)
        if fine_steps < 1:
            raise ValueError(f"fine_steps must be >= 1, got {fine_steps}")
        cond = self.base.frame_conditions(actions, t + 1)  # (B, t + 1): last = new frame's
        if use_cache:
            if cache is None:
                cache = self.new_cache(tokens_context, actions)
            else:
                self._extend_cache(cache, tokens_context, cond[:, :t])
            coarse_ctx = cache.coarse  # (B, t, hc, wc)
        else:
            coarse_ctx = self.coarse_codes(tokens_context)
        sample = dict(
            temperature=temperature,
            schedule=schedule,
            generator=generator,
            confidence_noise=confidence_noise,
        )
        # 1. the base stage: the new frame's coarse codes (B, hc, wc)
        coarse_new = self.base.generate_next(
            coarse_ctx,
            actions,
            steps=steps,
            cache=cache.base if use_cache else None,
            use_cache=use_cache,
            **sample,
        )
        # 2. the super-resolution stage: its fine tokens given those codes
        x = rearrange(tokens_context.long(), "b t h w -> b t (h w)")
        coarse_all = torch.cat([coarse_ctx, coarse_new[:, None]], dim=1)  # (B, t + 1, hc, wc)

        def predict(frame: Tensor) -> Tensor:  # (B, N) ids -> hidden states (B, N, D)
            if use_cache:
                hidden = self.sr(
                    frame[:, None], coarse_new[:, None], cond[:, t:], cache.kv, update_cache=False
                )
            else:
                hidden = self.sr(torch.cat([x, frame[:, None]], dim=1), coarse_all, cond)
            return hidden[:, -1]

        shape = (b, self.num_tokens)
        frame = maskgit_fill(
            predict, self.sr.head, shape, self.sr.mask_id, fine_steps, device=x.device, **sample
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
        fine_steps: int | None = None,
    ) -> Tensor:
        """Generate `horizon` fine frames after context (B, t0, h, w) -> (B, horizon, h, w),
        each coarse first, then fine. actions (B, >= t0 + horizon - 1): actions[:, i] is taken
        after frame i; the window holds at most max_frames - 1 frames before each new one."""
        b, t0 = context_tokens.shape[:2]
        self._check_context(context_tokens, actions, t0 + horizon - 1, "context_tokens")
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
            fine_steps=fine_steps,
        )
