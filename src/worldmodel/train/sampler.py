"""The data order: a pure function of (seed, global batch index), so a resumed run reads what it
would have.

Each epoch is a seeded permutation of the dataset cut into global batches (the last partial one is
dropped). The position is counted in global batches consumed, not optimizer steps: a step skipped
for a non-finite loss or gradient consumes its batch too. A global batch is split into
`grad_accum` micro-batches, and each micro-batch into one slice per process, so N processes see
exactly the samples one process would see at the same global batch size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def position(batches: int, batches_per_epoch: int) -> dict[str, int]:
    """Global batches consumed, and the epoch and batch within it they lead to."""
    return {
        "batches": batches,
        "epoch": batches // batches_per_epoch,
        "batch": batches % batches_per_epoch,
    }


class ResumableSampler(Sampler[int]):
    """Infinite index stream for one rank, starting at global batch `start_batch`."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_batch: int = 0,
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
        self.start_batch = start_batch
        self.batches_per_epoch = num_samples // global_batch
        self.micro = global_batch // (grad_accum * world_size)

    def position(self, batches: int) -> dict[str, int]:
        """Where the stream stands after `batches` global batches (stored in checkpoints)."""
        return position(batches, self.batches_per_epoch)

    def __iter__(self) -> Iterator[int]:
        pos = self.position(self.start_batch)
        epoch, first = pos["epoch"], pos["batch"]
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            for b in range(first, self.batches_per_epoch):
                batch = perm[b * self.global_batch : (b + 1) * self.global_batch]
                # (A * W * m) -> micro-batch a, rank r: batch[(a * W + r) * m : ... + m]
                for a in range(self.grad_accum):
                    start = (a * self.world + self.rank) * self.micro
                    yield from batch[start : start + self.micro].tolist()
            epoch, first = epoch + 1, 0

    def __len__(self) -> int:  # an infinite stream; DataLoader only needs a number
        return 2**62
