"""The data order: a pure function of (seed, step), so a resumed run reads what it would have.

Each epoch is a seeded permutation of the dataset cut into global batches (the last partial one is
dropped). A global batch is split into `grad_accum` micro-batches, and each micro-batch into one
slice per process, so N processes see exactly the samples one process would see at the same
global batch size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Infinite index stream for one rank, starting at optimizer step `start_step`."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
    ) -> None:
        if num_samples < global_batch:
            raise ValueError(
                f"the dataset has {num_samples} clips, fewer than one batch of {global_batch}: "
                "lower trainer.batch_size or record more data"
            )
        self.n = num_samples
        self.global_batch = global_batch
        self.grad_accum = grad_accum
        self.rank = rank
        self.world = world_size
        self.seed = seed
        self.start_step = start_step
        self.steps_per_epoch = num_samples // global_batch
        self.micro = global_batch // (grad_accum * world_size)

    def position(self, step: int) -> dict[str, int]:
        """Epoch and batch within the epoch at an optimizer step (stored in checkpoints)."""
        return {"epoch": step // self.steps_per_epoch, "batch": step % self.steps_per_epoch}

    def __iter__(self) -> Iterator[int]:
        pos = self.position(self.start_step)
        epoch, first = pos["epoch"], pos["batch"]
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            for b in range(first, self.steps_per_epoch):
                batch = perm[b * self.global_batch : (b + 1) * self.global_batch]
                # (A * W * m) -> micro-batch a, rank r: batch[(a * W + r) * m : ... + m]
                for a in range(self.grad_accum):
                    start = (a * self.world + self.rank) * self.micro
                    yield from batch[start : start + self.micro].tolist()
            epoch, first = epoch + 1, 0

    def __len__(self) -> int:  # an infinite stream; DataLoader only needs a number
        return 2**62
