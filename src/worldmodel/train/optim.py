"""Optimizer, learning-rate schedule and EMA weights."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def adamw(
    params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.99),
) -> torch.optim.AdamW:
    """AdamW that decays matrices and kernels only (not norms, biases, embeddings' gains)."""
    decay, no_decay = [], []
    for _, p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def lr_lambda(
    warmup_steps: int,
    max_steps: int,
    schedule: str = "cosine",
    min_ratio: float = 0.1,
    time_progress: Callable[[], float] | None = None,
) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to `min_ratio` of the peak (or constant).

    With `time_progress` (the fraction of a wall-time budget used, see `trainer.max_minutes`) the
    decay follows whichever budget, steps or time, is further along, so a run cut by time still
    ends annealed.
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"trainer.lr_schedule={schedule!r}: expected cosine or constant")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        if time_progress is not None:
            progress = max(progress, time_progress())
        progress = min(1.0, progress)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so a short run (a
    smoke test, a time budget on a slow machine) is not evaluated with near-initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {
            k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, "__updates__": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            if k == "__updates__":
                self.updates = int(v)
            else:
                self.shadow[k].copy_(v)

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate with EMA weights, then put the training weights back."""
        current = model.state_dict()
        backup = {k: current[k].detach().clone() for k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(backup, strict=False)
