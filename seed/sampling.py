"""Training data order and augmentation as pure functions of ``(seed, epoch, index)``.

A run killed mid-epoch must see, after it resumes, exactly the batches it
would have seen had it never stopped. Two things make that hold whatever the
number of loader processes, prefetching, or the state of the global random
generators:

- :class:`EpochSampler` draws the epoch's permutation from ``(seed, epoch)``
  alone, takes this process's share of it under DDP, and can start an epoch
  after the batches a checkpoint says are done (``resume_from``);
- :class:`SeededSamples` applies the dataset's random augmentation to each
  image under its own seed, derived from ``(seed, epoch, index)``, with the
  torch, numpy and ``random`` generators that torchvision's and lightly's
  transforms draw from (the caller's generator states are left as they were).

The sampler yields ``(index, epoch)`` keys; a :class:`KeyedDataset` serves them.
"""

import contextlib
import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

_MASK = (1 << 64) - 1


def mix(*values: int) -> int:
    """A 64-bit seed from integers (splitmix64 rounds): nearby inputs give unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & _MASK
        state ^= state >> 29
    return state


def seed_all(seed: int) -> None:
    """Seed the CPU torch generator, numpy's and python's from one 64-bit value (CUDA's are left alone)."""
    seed &= _MASK
    torch.random.default_generator.manual_seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
    random.seed(seed)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the CPU random generators seeded from ``seed``.

    Afterwards torch's and python's generators are back in their states, and
    numpy's is reseeded from a number drawn from its own stream before the
    block (copying its 2.5 KB state back costs more than a small image's
    whole augmentation): the caller's streams stay deterministic.
    """
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    numpy_next = int(np.random.randint(0, 1 << 32, dtype=np.int64))
    seed_all(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.seed(numpy_next)


class KeyedDataset(Dataset):
    """A dataset indexed by the ``(index, epoch)`` keys of :class:`EpochSampler` (``(index, epoch, copy)`` under repeated
    augmentation)."""

    def __getitem__(self, key: tuple[int, int]) -> Any:
        raise NotImplementedError


class SeededSamples(KeyedDataset):
    """``dataset[index]`` (its transform included) under the random seed of ``(seed, epoch, index)``.

    The same image comes out of the same key in any process, in any order:
    a batch does not depend on ``--num-workers`` nor on what ran before it.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, ...]) -> Any:
        index, epoch, copy = key if len(key) == 3 else (*key, 0)  # each copy of repeated augmentation draws its own augmentation
        with seeded(mix(self.seed, epoch, index, copy) if copy else mix(self.seed, epoch, index)):
            return self.dataset[index]


def _world() -> tuple[int, int]:
    """This process's rank and the number of processes (1 before or without DDP)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler(DistributedSampler):
    """Shuffled ``(index, epoch)`` keys: the permutation of epoch e is a function of (seed, e) alone.

    Under DDP each process takes every world-th key of the permutation, padded
    to equal shares as ``DistributedSampler`` does; rank and world size are read
    when iterating, as the process group starts after the loaders are built.
    It subclasses ``DistributedSampler`` so that Lightning keeps it instead of
    injecting its own, and calls ``set_epoch`` on it at each epoch start.

    ``repeats`` > 1 is repeated augmentation under DDP (Hoffer et al. 2020, "Augment your batch"; timm's
    ``RepeatAugSampler``, which USI's code uses): each image of the permutation comes ``repeats`` times in a row, so
    its copies go to different processes, each as ``(index, epoch, copy)`` under its own augmentation; an epoch keeps
    its length, so it shows about 1 / ``repeats`` of the images. On one process it does nothing.
    """

    def __init__(self, size: int, seed: int, batch_size: int, repeats: int = 1) -> None:  # not DistributedSampler.__init__: no process group yet
        self.size, self.seed, self.batch_size, self.repeats = size, seed, batch_size, repeats
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        """Keys of a whole epoch for this process, also when resuming (Lightning counts the epoch's batches from it)."""
        return math.ceil(self.size / _world()[1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_from(self, epoch: int, batches: int) -> None:
        """Make the next pass over ``epoch`` start after its first ``batches`` batches (trained before a restart)."""
        self.epoch = epoch
        self._resume = (epoch, batches)

    def order(self, epoch: int) -> list[int]:
        """This process's indices for ``epoch``, in order."""
        return [index for index, _ in self.copies(epoch)]

    def copies(self, epoch: int) -> list[tuple[int, int]]:
        """This process's ``(index, copy)`` pairs for ``epoch``, in order (copy 0 without repeated augmentation)."""
        rank, world = _world()
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(mix(self.seed, epoch))).tolist()
        repeats = self.repeats if world > 1 else 1
        pairs = [(index, copy) for index in order for copy in range(repeats)]
        pairs += pairs[: max(len(self) * world - len(pairs), 0)]  # equal shares, as DistributedSampler pads
        return pairs[rank::world][: len(self)]

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        epoch, skip = self.epoch, 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1] * self.batch_size
        self._resume = None
        return iter([(index, epoch, copy) if copy else (index, epoch) for index, copy in self.copies(epoch)[skip:]])


class FixedCrops(KeyedDataset):
    """Each image under one of ``crops`` fixed augmentations: epoch e shows crop e mod crops.

    The teacher cache of every distiller (``--teacher-cache``, ``seed.teacher_cache``) rests on it:
    the augmentation's random draws are seeded by (seed, image, crop),
    so the same crop comes back ``crops`` epochs later and its cached target still fits.
    Items are ``(image, label, index, crop)``, looked up by the ``(index, epoch)``
    keys of the engine's sampler, so the crop follows the epoch in every loader
    process and after a resume.
    """

    def __init__(self, dataset: Dataset, transform: Any, crops: int, seed: int) -> None:
        self.dataset, self.transform, self.crops, self.seed = dataset, transform, crops, seed
        self.classes = dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int, int, int]:
        index, epoch = key
        image, label = self.dataset[index]
        crop = epoch % self.crops
        with seeded(mix(self.seed, crop, index)):
            image = self.transform(image)
        return image, label, index, crop
