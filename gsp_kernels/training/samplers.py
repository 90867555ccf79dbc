"""What a training epoch draws: ``ClassBalancedBatchSampler`` (class-balanced batches,
deterministic in seed and epoch, split across DDP ranks), and ``SeededBatches`` with
``SeededSamples``, which fix each sample's augmentation by a seed of its own.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .config import RunError


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``samples_per_class`` samples from each of ``batch_size // samples_per_class``
    random classes, grouped by class (so the zero-shot loss's halves hold different classes).

    With fewer classes than a batch needs, every class is drawn and the samples per class
    grow to fill the batch. Deterministic in (seed, epoch): call ``set_epoch``. Under DDP
    (``world_size`` ranks) every rank draws the same global step of ``world_size`` batches
    and keeps its own: the ranks' classes in one step are disjoint. An epoch has
    ``num_batches`` steps (default len(labels) // (batch_size * world_size)).
    """

    def __init__(self, labels: Tensor, batch_size: int, samples_per_class: int = 4, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_batches: int | None = None):
        labels = torch.as_tensor(labels)
        if samples_per_class < 1 or batch_size < samples_per_class:
            raise ValueError(f"need 1 <= samples_per_class <= batch_size, got {samples_per_class} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} and world_size {world_size}")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be >= 1 (or None), got {num_batches}")
        self.by_class = [torch.nonzero(labels == value).flatten() for value in torch.unique(labels)]
        num_classes = len(self.by_class)
        if num_classes < 2 * world_size:
            raise RunError(f"class-balanced batches need at least 2 classes per rank, got {num_classes} classes for {world_size} "
                           f"rank(s): train on more classes (--num-train-classes, another --num-folds) or in fewer processes")
        self.classes_per_batch = min(num_classes // world_size, max(2, batch_size // samples_per_class))
        self.samples_per_class = batch_size // self.classes_per_batch
        self.batch_size = self.classes_per_batch * self.samples_per_class
        self.num_batches = num_batches or max(1, len(labels) // (self.batch_size * world_size))
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with the seed, fixes the batch order."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        # One generator for every rank (the 0 keeps the single-process order of earlier versions).
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, 0)) % (2**62))
        per_rank = self.classes_per_batch
        for _ in range(self.num_batches):
            drawn = torch.randperm(len(self.by_class), generator=generator)[: per_rank * self.world_size]
            for rank in range(self.world_size):  # every rank's picks, so the generator stays in step
                batch = []
                for class_index in drawn[rank * per_rank : (rank + 1) * per_rank].sort().values.tolist():
                    members = self.by_class[class_index]
                    if len(members) >= self.samples_per_class:
                        picks = torch.randperm(len(members), generator=generator)[: self.samples_per_class]
                    else:
                        picks = torch.randint(len(members), (self.samples_per_class,), generator=generator)
                    batch.extend(members[picks].tolist())
                if rank == self.rank:
                    mine = batch
            yield mine


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """A batch sampler's batches with a seed per sample: ``[(index, seed), ...]``, the seed a
    function of (seed, epoch, step, position in the step's batch, rank) only. With
    ``SeededSamples`` the augmentation of every sample is then fixed whatever the number of
    DataLoader workers, and a resumed run sees the crops an uninterrupted one saw."""

    def __init__(self, batches: ClassBalancedBatchSampler, seed: int):
        self.batches, self.seed = batches, seed

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the batches and of the seeds."""
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        epoch, rank = self.batches.epoch, self.batches.rank
        for step, batch in enumerate(self.batches):
            yield [(index, hash((self.seed, epoch, step, position, rank)) % (2**63)) for position, index in enumerate(batch)]


class SeededSamples(Dataset):
    """``dataset[index]`` drawn with torch's RNG seeded by the key's seed: ``[(index, seed)]``
    keys from ``SeededBatches``. The caller's RNG state is left as it was."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]
