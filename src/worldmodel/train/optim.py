"""Optimizer, learning-rate schedule and EMA weights."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

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


class LRSchedule:
    """Linear warm-up over the first `warmup_steps` steps, then cosine decay to `min_ratio` of the
    peak (or constant).

    Decay progress is the further along of two fractions, both counted from where warm-up ended:
    the steps taken of the `max_steps - warmup_steps` left, and, with a wall-time budget
    (`trainer.max_minutes`), the time used of the budget left. Both are 0 when warm-up ends, so
    the factor is continuous there, and a run cut by time still ends annealed. The state (where
    warm-up ended, the progress behind the current factor) goes into checkpoints, so a resumed
    run continues from the stored position.
    """

    def __init__(
        self,
        warmup_steps: int,
        max_steps: int,
        kind: str = "cosine",
        min_ratio: float = 0.1,
        budget_s: float | None = None,
    ) -> None:
        if kind not in ("cosine", "constant"):
            raise ValueError(f"trainer.lr_schedule={kind!r}: expected cosine or constant")
        self.warmup_steps = int(warmup_steps)
        self.max_steps = int(max_steps)
        self.kind = kind
        self.min_ratio = float(min_ratio)
        self.budget_s = budget_s
        self.warmup_end_s: float | None = None  # wall time (of the run) when warm-up ended
        self.progress = 0.0  # decay progress behind `factor`, in [0, 1]
        self.factor = self.update(0, 0.0)

    def update(self, step: int, elapsed_s: float = 0.0) -> float:
        """The factor for the optimizer step with index `step` (0-based), `elapsed_s` seconds of
        wall time into the run; it becomes the current position."""
        if step < self.warmup_steps:
            self.progress, self.factor = 0.0, (step + 1) / self.warmup_steps
            return self.factor
        if self.warmup_end_s is None:
            self.warmup_end_s = float(elapsed_s)
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        if self.budget_s is not None:
            left = self.budget_s - self.warmup_end_s
            used = (elapsed_s - self.warmup_end_s) / left if left > 0 else 1.0
            progress = max(progress, used)
        self.progress = min(1.0, max(0.0, progress))
        if self.kind == "constant":
            self.factor = 1.0
        else:
            cosine = 0.5 * (1.0 + math.cos(math.pi * self.progress))
            self.factor = self.min_ratio + (1.0 - self.min_ratio) * cosine
        return self.factor

    def state_dict(self) -> dict[str, float | None]:
        return {
            "warmup_end_s": self.warmup_end_s,
            "progress": self.progress,
            "factor": self.factor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the stored position (a checkpoint without one starts the decay afresh)."""
        if "factor" not in state:  # an older checkpoint's LambdaLR state
            return
        self.warmup_end_s = state["warmup_end_s"]
        self.progress = float(state["progress"])
        self.factor = float(state["factor"])


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
