"""The training data stream: every image once per epoch, shuffled and sharded, resumable mid-epoch.

A resumed run continues the same stream at the micro-batch it had reached, so on one process it sees
the images an uninterrupted run would have seen, in the same order.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .data import SegmentationFolder


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch, sharded round-robin) that can start mid-epoch."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=False)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def batches(dataset: SegmentationFolder, sampler: ResumableSampler, batch_size: int, workers: int,
             start: int, pin: bool, seed: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless micro-batches of this process, starting after ``start`` already consumed ones."""
    per_epoch = sampler.num_samples // batch_size
    m = start
    while True:
        epoch, offset = divmod(m, per_epoch)
        sampler.set_epoch(epoch)
        sampler.start = offset * batch_size
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                            num_workers=workers, pin_memory=pin,
                            generator=torch.Generator().manual_seed(seed + epoch))
        for x, y in loader:
            yield x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)
            m += 1
