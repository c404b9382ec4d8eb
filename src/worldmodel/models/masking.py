"""The training mask and the masked-token loss of MaskGIT models.

Training mask (`draw_mask`): every MaskGIT model draws the tokens it hides through this one
function, so `model.mask_strategy` means the same thing everywhere. The model draws the masking
rate r from its schedule (per clip or per frame); the strategy decides which tokens of a frame's
(h, w) grid are hidden:
- `random`: each token independently with probability r (MaskGIT, Genie): the masked count is
  Binomial(N, r), r * N on average. This is the original draw, bit for bit.
- `block`: exactly n = round(r * N) tokens of each frame forming one contiguous block: a random
  rectangle of bh x bw tokens (bh uniform among the heights that fit, bw = ceil(n / bh)) at a
  random place, filled row by row, so its last row may be partial. One 4-connected region.
- `multiscale`: exactly n = round(r * N) tokens of each frame, two scales mixed. Coarse: the grid
  is cut into `cell` x `cell` super-tokens (MULTISCALE_CELL = 2) and floor(n / (2 * cell^2)) whole
  cells are masked (about half of the n, at most every cell), i.e. a mask on the coarse grid
  upsampled by `cell`; fine: the rest of the n tokens are drawn one by one, uniformly among the
  tokens still visible. Edge rows/columns that make no whole cell take part in the fine draw only.
  Muse (Chang et al., 2023, "Muse: Text-To-Image Generation via Masked Generative Transformers")
  masks single tokens at a cosine-distributed rate and gets its two scales from a cascade (a base
  model on a coarse token grid, a super-resolution model on a fine one); this strategy brings the
  two scales into the mask of one model: hiding whole cells makes it fill in regions whose
  neighbours are hidden too, not only isolated tokens it could copy from visible neighbours.

Masked-token loss (`masked_ce`), on a few fixed shapes.

A MaskGIT step predicts the masked positions only; their number M changes every step (the masking
rate is drawn per clip). Run on exactly M rows, the head, the softmax and the cross-entropy
allocate buffers of a new size each step, and on the CPU the allocator keeps the freed buffers
of past sizes: the process's memory grows by ~14 MB a step (the demo's world model reached
4.5 GB). `masked_ce` pads the rows to one of `buckets` sizes with unmasked positions that the
loss ignores, so a run allocates a handful of shapes and reuses them; the loss is the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100  # F.cross_entropy's ignore_index
MASK_STRATEGIES = ("random", "block", "multiscale")
MULTISCALE_CELL = 2  # super-token side of the coarse part of `multiscale` (in tokens)


def mask_strategy_problems(
    strategy: object, grid: tuple[int, int] | list[int], key: str = "model.mask_strategy"
) -> list[str]:
    """What is wrong with a `mask_strategy` for a token grid (h, w), naming `key`; [] if fine.
    Models' `check_config` report these at `task=check`, their constructors raise them."""
    if strategy not in MASK_STRATEGIES:
        return [f"{key}={strategy!r} is unknown; choose one of {', '.join(MASK_STRATEGIES)}"]
    if strategy == "multiscale" and min(int(g) for g in grid) < MULTISCALE_CELL:
        return [
            f"{key}=multiscale needs a token grid of at least {MULTISCALE_CELL}x{MULTISCALE_CELL}"
            f" (model.grid), got {list(grid)}"
        ]
    return []


def check_mask_strategy(
    strategy: object, grid: tuple[int, int] | list[int], key: str = "model.mask_strategy"
) -> None:
    """Raise ValueError with `mask_strategy_problems`, if any."""
    problems = mask_strategy_problems(strategy, grid, key)
    if problems:
        raise ValueError("; ".join(problems))


def masked_count(rate: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Tokens to mask per frame (B, T) long: round(rate * N) in [0, N], rate broadcast to
    (B, T, 1)."""
    b, t, n = shape
    return (rate.expand(b, t, 1)[..., 0] * n).round().long().clamp(0, n)  # (B, T)


def _choose(scores: Tensor, k: Tensor) -> Tensor:
    """The k[f] lowest `scores` of each row (F, N) -> bool (F, N) with exactly k[f] True."""
    ranks = scores.argsort(dim=-1).argsort(dim=-1)  # (F, N) rank of each score in its row
    return ranks < k[:, None]


def block_mask(
    rate: Tensor, shape: tuple[int, int, int], grid: tuple[int, int], generator=None
) -> Tensor:
    """`block` strategy: one contiguous region of exactly round(rate * N) tokens per frame.

    rate broadcasts to (B, T, 1); returns masked (B, T, N) bool, N = h * w (row-major)."""
    b, t, n = shape
    h, w = grid
    dev = rate.device
    k = masked_count(rate, shape).reshape(-1)  # (F,) tokens to mask, F = B * T
    u = torch.rand(3, b * t, generator=generator, device=dev)  # (3, F) height, top, left
    kk = k.clamp_min(1)
    lo = -(-kk // w)  # (F,) the least height that fits kk tokens in w columns
    hi = kk.clamp(max=h)  # (F,) taller blocks would be thinner than one column
    bh = lo + (u[0] * (hi - lo + 1)).long().clamp(max=hi - lo)  # (F,) block height
    bw = -(-kk // bh)  # (F,) block width <= w
    top = (u[1] * (h - bh + 1)).long().clamp(max=h - bh)  # (F,)
    left = (u[2] * (w - bw + 1)).long().clamp(max=w - bw)  # (F,)
    rows = torch.arange(h, device=dev).repeat_interleave(w)  # (N,) row of each token
    cols = torch.arange(w, device=dev).repeat(h)  # (N,) column of each token
    r = rows[None] - top[:, None]  # (F, N) row inside the block
    c = cols[None] - left[:, None]  # (F, N) column inside the block
    inside = (r >= 0) & (r < bh[:, None]) & (c >= 0) & (c < bw[:, None])  # (F, N)
    masked = inside & (r * bw[:, None] + c < k[:, None])  # (F, N) the first k, row by row
    return masked.view(b, t, n)


def multiscale_mask(
    rate: Tensor,
    shape: tuple[int, int, int],
    grid: tuple[int, int],
    cell: int = MULTISCALE_CELL,
    generator=None,
) -> tuple[Tensor, Tensor]:
    """`multiscale` strategy: exactly round(rate * N) tokens per frame, about half of them as
    whole `cell` x `cell` super-tokens, the rest single tokens.

    rate broadcasts to (B, T, 1); returns (masked (B, T, N) bool, coarse (B, T, N) bool: the
    tokens masked as whole cells, a subset of masked)."""
    b, t, n = shape
    h, w = grid
    dev = rate.device
    hc, wc = h // cell, w // cell  # whole cells per column and row
    k = masked_count(rate, shape).reshape(-1)  # (F,) tokens to mask, F = B * T
    k_cells = (k // (2 * cell * cell)).clamp(max=hc * wc)  # (F,) cells in the coarse part
    cells = _choose(torch.rand(b * t, hc * wc, generator=generator, device=dev), k_cells)
    coarse = torch.zeros(b * t, h, w, dtype=torch.bool, device=dev)  # (F, h, w)
    up = cells.view(-1, hc, wc).repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    coarse[:, : hc * cell, : wc * cell] = up  # (F, hc * cell, wc * cell) upsampled cells
    coarse = coarse.view(b * t, n)  # (F, N)
    scores = torch.rand(b * t, n, generator=generator, device=dev)  # (F, N)
    fine = _choose(scores.masked_fill(coarse, 2.0), k - k_cells * cell * cell)  # (F, N)
    return (coarse | fine).view(b, t, n), coarse.view(b, t, n)


def draw_mask(
    rate: Tensor,
    shape: tuple[int, int, int],
    grid: tuple[int, int],
    strategy: str = "random",
    generator: torch.Generator | None = None,
) -> Tensor:
    """The training mask of a batch of token grids: masked (B, T, N) bool, N = h * w row-major.

    Args:
        rate: masking rate from the model's schedule, (B, 1, 1) per clip or (B, T, 1) per frame.
        shape: (B, T, N) of the token ids; grid: (h, w) with h * w = N.
        strategy: one of MASK_STRATEGIES (see the module docstring).
        generator: the random source (None: torch's global one, as the models use in training).
    The caller clears context and padding frames afterwards.
    """
    check_mask_strategy(strategy, grid, "mask_strategy")
    if grid[0] * grid[1] != shape[2]:
        raise ValueError(f"grid {tuple(grid)} does not hold the {shape[2]} tokens of a frame")
    if strategy == "random":
        return torch.rand(shape, generator=generator, device=rate.device) < rate  # (B, T, N)
    if strategy == "block":
        return block_mask(rate, shape, grid, generator)
    return multiscale_mask(rate, shape, grid, generator=generator)[0]


def padded_positions(masked: Tensor, buckets: int = 16) -> tuple[Tensor, Tensor]:
    """Flat indices of the masked positions (M,) padded with unmasked ones to a multiple of
    numel / buckets, and which of them are masked; returns (index (S,), valid (S,) bool)."""
    flat = masked.reshape(-1)
    total = flat.numel()
    step = max(total // max(buckets, 1), 1)
    hits = flat.nonzero().squeeze(1)  # (M,)
    size = min(total, -(-max(len(hits), 1) // step) * step)
    if size > len(hits):
        rest = (~flat).nonzero().squeeze(1)[: size - len(hits)]
        index = torch.cat([hits, rest])
    else:
        index = hits
    valid = torch.zeros(len(index), dtype=torch.bool, device=masked.device)
    valid[: len(hits)] = True
    return index, valid


def masked_ce(
    head: nn.Module,
    hidden: Tensor,
    target: Tensor,
    masked: Tensor,
    label_smoothing: float = 0.0,
    buckets: int = 16,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy of `head` over the masked positions.

    Args:
        head: hidden (S, D) -> logits (S, V).
        hidden: (..., D) features at every position; target: (...) token ids; masked: (...) bool.
    Returns:
        The mean loss over masked positions (with label smoothing) and {"ce" (without it),
        "masked_acc"}, both detached.
    """
    index, valid = padded_positions(masked, buckets)
    logits = head(hidden.reshape(-1, hidden.shape[-1])[index]).float()  # (S, V)
    labels = target.reshape(-1)[index].masked_fill(~valid, IGNORE)  # (S,)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, label_smoothing=label_smoothing)
    with torch.no_grad():
        plain = ce if label_smoothing == 0 else F.cross_entropy(logits, labels, ignore_index=IGNORE)
        acc = (logits.argmax(-1) == labels)[valid].float().mean()
    return ce, {"ce": plain.detach(), "masked_acc": acc.detach()}
