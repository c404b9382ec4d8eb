"""The masked-token loss of MaskGIT models on a few fixed shapes.

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
