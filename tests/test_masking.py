"""The masked-token loss on a few fixed shapes: the same loss as on exactly the masked rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worldmodel.models.masking import masked_ce, padded_positions


def test_padded_positions_cover_the_masked_ones_in_few_sizes() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = set()
    for _ in range(200):
        rate = torch.rand((), generator=gen)
        masked = torch.rand(4, 8, 64, generator=gen) < rate  # (B, T, N)
        index, valid = padded_positions(masked, buckets=16)
        flat = masked.reshape(-1)
        assert int(valid.sum()) == int(flat.sum())
        assert flat[index[valid]].all() and not flat[index[~valid]].any()
        assert len(set(index.tolist())) == len(index)  # no position twice
        sizes.add(len(index))
    assert len(sizes) <= 16  # shapes the allocator sees: a handful, not one per step


def test_masked_ce_equals_the_loss_on_the_masked_rows() -> None:
    torch.manual_seed(0)
    head = nn.Linear(8, 11)
    hidden = torch.randn(2, 3, 5, 8)
    target = torch.randint(0, 11, (2, 3, 5))
    masked = torch.rand(2, 3, 5) < 0.4
    for smoothing in (0.0, 0.1):
        ce, metrics = masked_ce(head, hidden, target, masked, smoothing)
        logits = head(hidden[masked])
        expected = F.cross_entropy(logits, target[masked], label_smoothing=smoothing)
        torch.testing.assert_close(ce, expected)
        torch.testing.assert_close(metrics["ce"], F.cross_entropy(logits, target[masked]))
        acc = (logits.argmax(-1) == target[masked]).float().mean()
        torch.testing.assert_close(metrics["masked_acc"], acc)
    # gradients reach the head and the features of masked positions only
    hidden.requires_grad_(True)
    masked_ce(head, hidden, target, masked)[0].backward()
    assert hidden.grad[~masked].abs().sum() == 0 and hidden.grad[masked].abs().sum() > 0
