"""The data order of fit(): a function of (seed, epoch) only, so that a resumed run sees exactly the
batches the uninterrupted run would have seen.

Every process, one or many, draws the same permutation of the dataset from (seed, epoch) through
torch's DistributedSampler (num_replicas = world size, 1 for a single process); process r takes
every world-size-th index from r. With a per-process batch b, the union of the processes' k-th
batches is elements k·b·W ... (k+1)·b·W - 1 of the permutation: the k-th batch of a single process
with batch b·W. So a run on W processes sees the same global batches as one process.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


class _SkipFirst(Sampler[int]):
    """The indices of `sampler` after the first `skip` (resuming in the middle of an epoch)."""

    def __init__(self, sampler: Sampler[int], skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        for position, index in enumerate(self.sampler):
            if position >= self.skip:
                yield index

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)  # type: ignore[arg-type]


def epoch_loader(
    dataset: Dataset,
    batch_size: int,
    epoch: int,
    *,
    seed: int,
    shuffle: bool,
    rank: int,
    world_size: int,
    skip_batches: int = 0,
    drop_last: bool = True,
    num_workers: int = 0,
    collate_fn: Optional[Callable] = None,
) -> DataLoader:
    """The loader of one epoch, starting after `skip_batches` batches of it."""
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    sampler.set_epoch(epoch)
    # Its own generator: DataLoader otherwise draws a worker seed from the global RNG at every
    # iter(), which would make the global RNG stream depend on where epochs start and stop.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=_SkipFirst(sampler, skip_batches * batch_size),
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_fn,
        generator=generator,
    )


def batches_per_epoch(dataset_len: int, batch_size: int, world_size: int, drop_last: bool = True) -> int:
    per_process = dataset_len // world_size if drop_last else -(-dataset_len // world_size)
    return per_process // batch_size if drop_last else -(-per_process // batch_size)


def to_device(batch, device: torch.device):
    """Tensors in a (nested) tuple/list/dict batch moved to `device`; other values unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
