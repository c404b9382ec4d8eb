"""Sampling shared by the world models: Gumbel noise, top-k filtering, and long rollouts.

Every world model here (`DynamicsModel`, `VideoGPT`, `Genie2WorldModel`) exposes
`new_cache(frames, actions)` and `generate_next(frames, actions, cache=..., use_cache=...)`;
`sliding_rollout` strings those calls into a rollout longer than the model's window: the window
holds the most recent `window` frames, and when it slides the positions change, so the cache is
rebuilt from the frames in the new window.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def gumbel_noise(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard Gumbel noise -log(-log(u)), u ~ U(0, 1), finite everywhere."""
    u = torch.rand(shape, generator=generator, device=device).clamp_min(1e-20)
    return -torch.log((-torch.log(u)).clamp_min(1e-20))  # u < 1, so -log(u) > 0


def top_k_filter(logits: Tensor, top_k: int | None) -> Tensor:
    """Logits (..., V) with every entry below the row's k-th largest set to -inf; None, 0 or
    k >= V keep everything."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


@torch.no_grad()
def sliding_rollout(
    model: nn.Module,
    context: Tensor,
    actions: Tensor,
    horizon: int,
    window: int,
    use_cache: bool = True,
    **sample: Any,
) -> Tensor:
    """`horizon` frames after `context` (B, t0, h, w) -> (B, horizon, h, w).

    `actions` (B, >= t0 + horizon - 1, ...): actions[:, i] is taken after frame i (context frames
    first, then generated ones). At most `window` frames are the model's context for each new
    frame. `sample` goes to `generate_next` (steps, temperature, generator, ...).
    """
    frames = context.long()
    cache = None
    start = max(0, frames.shape[1] - window)
    out = []
    for _ in range(horizon):
        total = frames.shape[1]
        new_start = max(0, total - window)
        if new_start != start:
            cache, start = None, new_start  # positions moved: re-encode the window
        if use_cache and cache is None:
            cache = model.new_cache(frames[:, start:], actions[:, start : total - 1])
        frame = model.generate_next(
            frames[:, start:], actions[:, start:total], cache=cache, use_cache=use_cache, **sample
        )  # (B, h, w)
        out.append(frame)
        frames = torch.cat([frames, frame[:, None]], dim=1)  # (B, total + 1, h, w)
    return torch.stack(out, dim=1)
