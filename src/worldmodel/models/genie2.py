"""Genie 2 as a variant of the project's parts: an autoregressive world model over frame latents.

The image encoder is the project's frozen video tokenizer, used before its quantizer: the pipeline
(`model.pipeline.inputs: latents`) encodes every frame alone and caches the continuous latents
z (T, h, w, D). This model has its own latent quantizer on top of them:

    z_t (h, w, D) --causal temporal conv over frames--> (h, w, c) --VQ (rotation trick)--> codes
    codes --per-frame conv decoder--> z_hat_t (h, w, D)      # reconstruction loss ||z_hat - z||^2

and a causal space-time transformer (`STTransformer`: spatial attention in a frame, causal
temporal attention across frames) that reads the codes of frames 0..t and the action set taken
after frame t, and predicts every code of frame t+1 at once (cross-entropy). Generated codes go
back to pixels through this model's codebook and decoder and then the frozen tokenizer's own
quantizer and decoder (its decoder was trained on quantized latents).

Actions, exactly: `actions[:, t]` is what was pressed after frame t (the project's batch
convention). A frame can hold several simultaneous actions: actions are either ids (B, T) long
or multi-hot sets (B, T, num_actions); the embeddings of the pressed actions are summed (plus a
learned bias, so "nothing pressed" is a vector of its own). Position t of the transformer carries
frame t's codes and the embedding of actions[:, t], so its output predicts frame t+1.

Classifier-free guidance over actions: in training the action sets of a whole clip are replaced
by a learned null embedding with probability `action_drop_prob` (whole clips, because the
unconditional stream at sampling time is null at every frame). Sampling mixes the conditional
and unconditional logits, uncond + cond_scale * (cond - uncond); `cond_scale=1` is plain
conditional sampling. Tokens are drawn with the Gumbel-max trick at `temperature` (0 = greedy)
after min-p filtering (`min_p`: keep the codes whose probability is >= min_p * the largest).

Cost: the temporal keys/values of committed frames are cached per stream (conditional and, with
guidance, unconditional), so each generated frame runs the transformer on one frame only.
Frame positions are absolute inside a window of `max_frames`; `rollout` slides the window and
re-encodes it when it moves (the same result as running without a cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from worldmodel.models.checks import (
    action_sets,
    check_code_ids,
    check_latents,
    check_rollout_actions,
    used_action_sets,
)
from worldmodel.models.interfaces import WorldModel
from worldmodel.models.quantize import build_quantizer
from worldmodel.models.sampling import gumbel_noise, sliding_rollout
from worldmodel.models.st_transformer import KVCache, STTransformer, init_weights
from worldmodel.models.tokenizer import CausalConv

STREAMS = ("cond", "uncond")


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Min-p filtering: logits (..., V) with every entry whose probability is below
    `min_p` * (the largest probability of its row) set to -inf. min_p = 0 keeps everything."""
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if min_p == 0.0:
        return logits
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed
    threshold = logits.amax(dim=-1, keepdim=True) + math.log(min_p)
    return logits.masked_fill(logits < threshold, float("-inf"))


def gumbel_sample(
    logits: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Index of argmax(logits / temperature + Gumbel noise) over the last axis (a sample from
    softmax(logits / temperature)); temperature 0 is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    gumbel = gumbel_noise(logits.shape, generator, logits.device)
    return (logits / temperature + gumbel).argmax(dim=-1)


@dataclass
class Genie2Cache:
    """Temporal keys/values of the committed context frames, per stream ("cond", "uncond"), the
    last frame's hidden states of each stream, and the frames/actions they were computed from."""

    tokens: Tensor  # (B, n, N) long: the committed frames (the longest stream's)
    actions: Tensor  # (B, n, A) float: their action sets
    kv: dict[str, KVCache] = field(default_factory=dict)
    last: dict[str, Tensor] = field(default_factory=dict)  # (B, N, dim) per stream

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


class LatentQuantizer(nn.Module):
    """Frame latents (B, T, h, w, D) -> VQ codes of width c -> latents again.

    Encoder: a causal temporal conv over frames (each position sees its `temporal_kernel` last
    frames; 1 = per frame) and a 1x1 conv; VQ with EMA codebook, k-means init, dead-code restart
    and the rotation trick; decoder: per-frame 3x3 conv, SiLU, 1x1 conv, so a generated frame is
    decoded alone.
    """

    def __init__(
        self,
        latent_dim: int,
        code_dim: int,
        hidden_dim: int,
        codebook_size: int,
        temporal_kernel: int,
        vq: dict[str, Any] | None,
    ) -> None:
        super().__init__()
        if temporal_kernel < 1:
            raise ValueError(f"temporal_kernel must be >= 1, got {temporal_kernel}")
        self.encoder = nn.Sequential(
            CausalConv(latent_dim, hidden_dim, 1, temporal_kernel), nn.SiLU()
        )
        self.to_code = CausalConv(hidden_dim, code_dim, 1)
        vq = dict(vq or {})
        vq.setdefault("rotation_trick", True)
        self.vq = build_quantizer("vq", code_dim, codebook_size=codebook_size, **vq)
        self.decoder = nn.Sequential(
            CausalConv(code_dim, hidden_dim, 3), nn.SiLU(), CausalConv(hidden_dim, latent_dim, 1)
        )

    def quantize(self, latents: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """latents (B, T, h, w, D) -> (codes (B, T, c, h, w), indices (B, T, h, w), aux, stats)."""
        x = rearrange(latents, "b t h w d -> b t d h w")
        e = self.to_code(self.encoder(x))  # (B, T, c, h, w)
        codes, indices, aux, stats = self.vq(rearrange(e, "b t c h w -> b c t h w"))
        return rearrange(codes, "b c t h w -> b t c h w"), indices, aux, stats

    def decode(self, codes: Tensor) -> Tensor:
        """codes (B, T, c, h, w) -> latents (B, T, h, w, D)."""
        return rearrange(self.decoder(codes), "b t d h w -> b t h w d")

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (B, T, h, w) -> codes (B, T, c, h, w)."""
        return rearrange(self.vq.indices_to_codes(indices), "b c t h w -> b t c h w")


class Genie2WorldModel(nn.Module, WorldModel):
    """Latent VQ + causal space-time transformer over frame codes, with action sets and CFG.

    Sizes: `latent_dim` = the frozen tokenizer's latent width D; `grid` = its (h, w) per frame;
    `codebook_size`, `code_dim`, `hidden_dim`, `temporal_kernel`, `vq` (extra VQ settings, see
    `models/quantize.py`) for the latent quantizer; `dim`, `depth`, `heads`, ... for the
    transformer (see `STTransformer`). Loss weights: `rec_weight` (latent reconstruction),
    `quantizer_weight` (VQ commitment), `label_smoothing` of the code cross-entropy.
    """

    inputs = "latents"
    own_codes = True

    def __init__(
        self,
        latent_dim: int = 6,
        num_actions: int = 15,
        grid: list[int] | tuple[int, int] = (8, 8),
        max_frames: int = 16,
        codebook_size: int = 1024,
        code_dim: int = 16,
        hidden_dim: int = 64,
        temporal_kernel: int = 2,
        vq: dict[str, Any] | None = None,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        cond_mode: str = "adaln",
        rel_pos_bias: bool = True,
        local_conv: bool = True,
        action_drop_prob: float = 0.1,
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
        if not 0.0 <= action_drop_prob < 1.0:
            raise ValueError(f"action_drop_prob must be in [0, 1), got {action_drop_prob}")
        self.latent_dim = int(latent_dim)
        self.num_actions = int(num_actions)
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_tokens = self.grid[0] * self.grid[1]
        self.max_frames = int(max_frames)
        self.codebook_size = int(codebook_size)
        self.action_drop_prob = float(action_drop_prob)
        self.rec_weight, self.quantizer_weight = float(rec_weight), float(quantizer_weight)
        self.label_smoothing = float(label_smoothing)

        self.latent_vq = LatentQuantizer(
            self.latent_dim, code_dim, hidden_dim, self.codebook_size, temporal_kernel, vq
        )
        self.code_emb = nn.Embedding(self.codebook_size, dim)
        # an action set embeds as the sum of its actions' embeddings plus a bias
        self.action_emb = nn.Linear(self.num_actions, dim)
        self.null_action = nn.Parameter(torch.zeros(dim))  # the dropped / unconditional action
        self.transformer = STTransformer(
            dim=dim,
            depth=depth,
            heads=heads,
            num_tokens=self.num_tokens,
            max_frames=self.max_frames,
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
        self.head = nn.Linear(dim, self.codebook_size)
        for m in (self.code_emb, self.action_emb, self.head):
            m.apply(init_weights)
        nn.init.trunc_normal_(self.null_action, std=0.02)

    # ------------------------------------------------------------------ checks
    def _check_codes(self, tokens: Tensor, name: str = "tokens") -> None:
        """Codes (B, T, h, w) of this model's grid, ids in [0, codebook_size)."""
        check_code_ids(tokens, name, self.grid, self.codebook_size)

    def _check_latents(self, latents: Tensor) -> None:
        check_latents(latents, self.grid, self.latent_dim)

    def action_sets(self, actions: Tensor, length: int | None = None) -> Tensor:
        """Actions as multi-hot sets (B, T, A) float, from ids (B, T) or sets (B, T, A).

        Ids must be in [0, num_actions); sets must hold only 0 and 1. `length` cuts to T frames.
        """
        return action_sets(actions, self.num_actions, length)

    # ------------------------------------------------------------------ model
    def action_cond(self, sets: Tensor, null: Tensor | bool = False) -> Tensor:
        """Per-frame conditioning (B, T, dim) of action sets (B, T, A); `null` (bool, or (B,)
        bool per clip) replaces the clip's actions by the null embedding."""
        cond = self.action_emb(sets)  # (B, T, dim): sum of the pressed actions' rows + bias
        if isinstance(null, bool):
            return self.null_action.expand_as(cond) if null else cond
        return torch.where(null[:, None, None], self.null_action.to(cond.dtype), cond)

    def forward(
        self, codes: Tensor, cond: Tensor, cache: KVCache | None = None, update_cache: bool = True
    ) -> Tensor:
        """Hidden states (B, T, N, dim) of codes (B, T, N) under conditioning (B, T, dim)."""
        return self.transformer(self.code_emb(codes), cond, cache=cache, update_cache=update_cache)

    def encode(self, latents: Tensor) -> Tensor:
        """Frame latents (B, T, h, w, D) -> this model's codes (B, T, h, w) long."""
        self._check_latents(latents)
        return self.latent_vq.quantize(latents.float())[1]

    def decode_latents(self, tokens: Tensor) -> Tensor:
        """Codes (B, T, h, w) -> reconstructed frame latents (B, T, h, w, D), frame by frame."""
        self._check_codes(tokens)
        return self.latent_vq.decode(self.latent_vq.indices_to_codes(tokens))

    @torch.no_grad()
    def decode_pixels(self, tokenizer: nn.Module, tokens: Tensor) -> Tensor:
        """Codes (B, T, h, w) -> video (B, C, T, H, W) in [-1, 1] through the frozen tokenizer,
        each frame alone (the pipeline encoded them alone); its decoder reads quantized latents,
        so the reconstructed latents go through the tokenizer's own quantizer first."""
        b = tokens.shape[0]
        z = self.decode_latents(tokens)  # (B, T, h, w, D)
        z = rearrange(z, "b t h w d -> (b t) d 1 h w")  # every frame its own 1-frame clip
        codes = tokenizer.quantize(z.float())[0]
        video = tokenizer.decode(codes).float().clamp(-1.0, 1.0)  # (B T, C, 1, H, W)
        return rearrange(video, "(b t) c 1 h w -> b c t h w", b=b)

    def logits(self, tokens: Tensor, actions: Tensor) -> Tensor:
        """Logits (B, T, h, w, K) of the frame after each of frames (B, T, h, w) given the
        actions taken after them (ids (B, T) or sets (B, T, A)). For tests and analysis."""
        self._check_codes(tokens)
        cond = self.action_cond(self.action_sets(actions, tokens.shape[1]))
        hidden = self.forward(rearrange(tokens.long(), "b t h w -> b t (h w)"), cond)
        return rearrange(self.head(hidden), "b t (h w) k -> b t h w k", h=self.grid[0])

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Next-frame code cross-entropy (+ latent reconstruction + VQ commitment).

        batch: `latents` (B, T, h, w, D) float (the pipeline's) or `tokens` (B, T, h, w) = this
        model's codes; `actions` ids (B, T) or sets (B, T, A); optional `mask` (B, T) bool.
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
        if t < 2:
            raise ValueError(f"clips must hold >= 2 frames to predict a next frame, got T={t}")
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
            codes, tokens, aux, stats = self.latent_vq.quantize(z)
            z_hat = self.latent_vq.decode(codes)
            w = real.float()  # (B, T): padding frames out of the reconstruction
            per_frame = (z_hat - z).pow(2).mean(dim=(2, 3, 4))  # (B, T)
            rec = (per_frame * w).sum() / w.sum().clamp_min(1.0)
            loss = loss + self.rec_weight * rec + self.quantizer_weight * aux
            metrics.update(
                {
                    "rec_mse": rec.detach(),
                    # share of the latents' variance the codes do not explain
                    "rec_rel": (rec / z[real].var().clamp_min(1e-8)).detach(),
                    "quantizer_loss": aux.detach().float(),
                    "codebook/usage": stats["usage"],
                    "codebook/perplexity": stats["perplexity"],
                }
            )

        x = rearrange(tokens.long(), "b t h w -> b t (h w)")
        drop = torch.zeros(b, dtype=torch.bool, device=x.device)
        if self.training and self.action_drop_prob > 0:
            drop = torch.rand(b, device=x.device) < self.action_drop_prob
        hidden = self.forward(x, self.action_cond(sets, drop))  # (B, T, N, dim)
        pred = (real[:, 1:] & real[:, :-1])[:, :, None].expand(-1, -1, self.num_tokens)
        if not bool(pred.any()):  # nothing to predict (all padding): a zero loss, not NaN
            zero = hidden.sum() * 0.0
            metrics.update({"ce": zero.detach(), "masked_acc": zero.detach()})
            return loss + zero, metrics
        logits = self.head(hidden[:, :-1][pred]).float()  # (M, K): frame t predicts t + 1
        target = x[:, 1:][pred]
        ce = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            plain_ce = ce if self.label_smoothing == 0 else F.cross_entropy(logits, target)
            acc = (logits.argmax(-1) == target).float().mean()
        metrics.update(
            {
                "ce": plain_ce.detach(),
                "masked_acc": acc.detach(),
                "action_drop": drop.float().mean(),
            }
        )
        return loss + ce, metrics

    # ------------------------------------------------------------------ sampling
    def new_cache(self, tokens: Tensor, actions: Tensor) -> Genie2Cache:
        """Commit context codes (B, L, h, w) to a cache; `actions` (B, n[, A]) with n >= L - 1.

        Frame i is committed together with actions[:, i], so the frames with a known action are
        committed now (L - 1 or L) and the rest by `generate_next`.
        """
        self._check_codes(tokens, "tokens_context")
        b, length = tokens.shape[:2]
        if actions.shape[0] != b or actions.shape[1] < length - 1:
            raise ValueError(
                f"actions must be (B, >= L-1)=({b}, {length - 1}) for {length} context frames, "
                f"got {tuple(actions.shape)}"
            )
        n = min(length, actions.shape[1])
        x = rearrange(tokens[:, :n].long(), "b t h w -> b t (h w)")
        sets = self.action_sets(actions, n)
        cache = Genie2Cache(tokens=x[:, :0], actions=sets[:, :0])
        if n > 0:
            self._advance(cache, x, sets, ("cond",))
        return cache

    def _advance(
        self, cache: Genie2Cache, x: Tensor, sets: Tensor, streams: tuple[str, ...]
    ) -> dict[str, Tensor]:
        """Bring each stream of `cache` up to the context x (B, t, N) / sets (B, t, A); returns
        the hidden states (B, N, dim) of the last context frame per stream."""
        n, t = cache.length, x.shape[1]
        if (
            n > t
            or cache.tokens.shape[0] != x.shape[0]
            or not torch.equal(cache.tokens, x[:, :n])
            or not torch.equal(cache.actions, sets[:, :n])
        ):
            raise ValueError(
                "cache does not match tokens_context/actions (it must hold a prefix of this "
                "context); pass cache=None to start a new one"
            )
        cache.tokens, cache.actions = x.clone(), sets.clone()
        out = {}
        for stream in streams:
            kv = cache.kv.setdefault(stream, self.transformer.new_cache())
            if kv.length < t:
                cond = self.action_cond(sets[:, kv.length : t], null=stream == "uncond")
                hidden = self.forward(x[:, kv.length : t], cond, cache=kv, update_cache=True)
                cache.last[stream] = hidden[:, -1]
            out[stream] = cache.last[stream]
        return out

    def guided_logits(self, hidden: dict[str, Tensor], cond_scale: float) -> Tensor:
        """uncond + cond_scale * (cond - uncond) of the streams' logits (B, N, K), in fp32."""
        cond = self.head(hidden["cond"]).float()
        if "uncond" not in hidden:
            return cond
        uncond = self.head(hidden["uncond"]).float()
        return uncond + cond_scale * (cond - uncond)

    @torch.no_grad()
    def generate_next(
        self,
        tokens_context: Tensor,
        actions: Tensor,
        cache: Genie2Cache | None = None,
        steps: int = 1,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        cond_scale: float = 1.0,
        min_p: float = 0.0,
        use_cache: bool = True,
    ) -> Tensor:
        """Sample the frame after `tokens_context` (B, t, h, w) -> codes (B, h, w) long.

        `actions` ids (B, >= t) or sets (B, >= t, A): actions[:, t-1] drives the new frame.
        `cache`: a `Genie2Cache` over a prefix of this context (from `new_cache` or an earlier
        call), extended in place. `use_cache=False` re-runs the whole context (reference path:
        the same codes for the same generator). `cond_scale` != 1 adds the unconditional stream
        (classifier-free guidance over actions). `steps` is accepted for the world-model
        interface; a frame is one transformer pass here.
        """
        self._check_codes(tokens_context, "tokens_context")
        b, t = tokens_context.shape[:2]
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if actions.shape[0] != b or actions.dim() < 2 or actions.shape[1] < t:
            raise ValueError(
                f"actions must be (B, >= t)=({b}, {t}) for a {t}-frame context, "
                f"got {tuple(actions.shape)}"
            )
        if t > self.max_frames:
            raise ValueError(
                f"context of {t} frames exceeds max_frames={self.max_frames}; use rollout(), "
                "which slides the window"
            )
        sets = self.action_sets(actions, t)
        x = rearrange(tokens_context.long(), "b t h w -> b t (h w)")
        streams = STREAMS if cond_scale != 1.0 else STREAMS[:1]
        if use_cache:
            if cache is None:
                cache = Genie2Cache(tokens=x[:, :0], actions=sets[:, :0])
            hidden = self._advance(cache, x, sets, streams)
        else:
            hidden = {
                s: self.forward(x, self.action_cond(sets, null=s == "uncond"))[:, -1]
                for s in streams
            }
        logits = min_p_filter(self.guided_logits(hidden, cond_scale), min_p)  # (B, N, K)
        frame = gumbel_sample(logits, temperature, generator)
        return rearrange(frame, "b (h w) -> b h w", h=self.grid[0])

    @torch.no_grad()
    def rollout(
        self,
        context_tokens: Tensor,
        actions: Tensor,
        horizon: int,
        steps: int = 1,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        cond_scale: float = 1.0,
        min_p: float = 0.0,
        use_cache: bool = True,
    ) -> Tensor:
        """Generate `horizon` frames after context codes (B, t0, h, w) -> (B, horizon, h, w).

        actions ids (B, >= t0 + horizon - 1) or sets (B, ..., A) over the whole sequence:
        actions[:, i] is taken after frame i. At most `max_frames` frames are in the window;
        when it slides, the cache is rebuilt.
        """
        self._check_codes(context_tokens, "context_tokens")
        b, t0 = context_tokens.shape[:2]
        need = check_rollout_actions(actions, b, t0, horizon)
        sets = self.action_sets(actions, need)
        return sliding_rollout(
            self,
            context_tokens,
            sets,
            horizon,
            window=self.max_frames,  # the last frame's hidden state predicts the next frame
            use_cache=use_cache,
            steps=steps,
            temperature=temperature,
            generator=generator,
            cond_scale=cond_scale,
            min_p=min_p,
        )
