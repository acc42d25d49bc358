"""``PairBatchSampler``: training batches that keep both clips of a synthetic pair together
(in-batch hard negatives), DDP-aware and resumable mid-epoch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import BatchSampler, DistributedSampler


class PairBatchSampler(BatchSampler):
    """Training batches that hold both clips of every pair they touch (hard negatives).

    Every epoch the pairs are shuffled with a generator seeded by ``seed + epoch``; each
    pair contributes one randomly chosen caption item of each of its two clips, so a batch
    of ``batch_size`` items holds ``batch_size // 2`` pairs and an epoch sees one caption per
    clip. All ranks draw the same batches and keep every ``num_replicas``-th one, so each
    rank gets the same number of batches.

    ``sampler`` only carries the distributed layout and the epoch: it is a
    ``DistributedSampler`` (``num_replicas=1`` when not distributed). Under DDP Lightning
    re-creates this batch sampler with its own ``DistributedSampler`` in place of
    ``sampler`` (it does so for every ``BatchSampler`` subclass built inside a
    ``*_dataloader`` hook) and calls its ``set_epoch`` every epoch, so
    ``use_distributed_sampler=True`` (the default) needs no special handling.

    Resuming mid-epoch: Lightning restores its batch counter but iterates the loader afresh,
    and it builds that iterator before it sets the resumed epoch. With ``resume=(epoch,
    batches_done)`` the first iteration is that epoch's order without its first
    ``batches_done`` batches (per rank); later iterations follow ``set_epoch`` again.

    Args:
        sampler: Supplies ``num_replicas``, ``rank`` and ``epoch``.
        batch_size: Items per batch (even).
        drop_last: Drop the last incomplete batch; without it the batch list is padded by
            repeating batches from its start until it divides among the replicas.
        pairs: Per pair, the dataset item indices of each clip's captions.
        seed: Shuffling seed.
        resume: ``(epoch, batches_done)`` of an interrupted epoch, or None.
    """

    def __init__(
        self,
        sampler: DistributedSampler,
        batch_size: int,
        drop_last: bool = True,
        *,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        seed: int = 0,
        resume: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if batch_size % 2:
            raise ValueError(f"pair batches need an even batch_size; got {batch_size}")
        if not pairs:
            raise ValueError("pair batches need at least one pair")
        self.pairs = [(list(a), list(b)) for a, b in pairs]
        self.seed = seed
        self.resume = resume

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that seeds the shuffle (Lightning sets it on ``sampler``)."""
        self.sampler.set_epoch(epoch)

    def _num_batches(self) -> int:
        pairs_per_batch, replicas = self.batch_size // 2, self.sampler.num_replicas
        if self.drop_last:
            return len(self.pairs) // pairs_per_batch // replicas
        return math.ceil(math.ceil(len(self.pairs) / pairs_per_batch) / replicas)

    def __len__(self) -> int:
        return self._num_batches()

    def __iter__(self):
        epoch, done = self.resume or (self.sampler.epoch, 0)
        self.resume = None
        if done >= len(self):  # saved once its epoch was over: the next one starts
            epoch, done = epoch + 1, 0
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.pairs), generator=generator).tolist()
        picks = torch.rand(len(self.pairs), 2, generator=generator)
        pairs_per_batch = self.batch_size // 2
        batches = [order[i : i + pairs_per_batch] for i in range(0, len(order), pairs_per_batch)]
        total = self._num_batches() * self.sampler.num_replicas
        batches = (batches * (total // max(len(batches), 1) + 1))[:total]
        for batch in batches[self.sampler.rank :: self.sampler.num_replicas][done:]:
            items = []
            for pair in batch:
                for side, captions in enumerate(self.pairs[pair]):
                    items.append(captions[int(picks[pair, side] * len(captions))])
            yield items
