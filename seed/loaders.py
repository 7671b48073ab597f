"""The data loaders every stage uses: training order and augmentation resumable mid-epoch
(:mod:`seed.sampling`), the kNN monitor's subsets, and the batch-size check."""

import os

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from seed.config import CommonConfig, TrainConfig
from seed.data import check_classes, dataset_for, eval_transform
from seed.errors import SeedError
from seed.sampling import EpochSampler, KeyedDataset, SeededSamples


def default_workers(config: CommonConfig) -> int:
    """Loader processes: the flag, else one per core up to 8."""
    if config.num_workers is not None:
        return config.num_workers
    return min(8, os.cpu_count() or 1)


def make_loader(dataset: Dataset, config: CommonConfig, shuffle: bool, drop_last: bool = False, batch_size: int | None = None,
                repeats: int = 1) -> DataLoader:
    """A DataLoader with the run's workers.

    ``shuffle=True`` (training): keys from :class:`~seed.sampling.EpochSampler` (its own share under DDP, resumable
    mid-epoch; ``repeats``: repeated augmentation under DDP) into a :class:`~seed.sampling.KeyedDataset`, each image
    augmented under its own seed. Otherwise
    (evaluation) in order; Lightning adds a DistributedSampler under DDP.
    """
    workers = default_workers(config)
    batch_size = batch_size or config.batch_size
    sampler = None
    if shuffle:
        dataset = dataset if isinstance(dataset, KeyedDataset) else SeededSamples(dataset, config.seed)
        sampler = EpochSampler(len(dataset), config.seed, batch_size, repeats)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def check_batch(dataset_size: int, config: CommonConfig) -> None:
    """A batch larger than the dataset would train on nothing: say so before building models."""
    global_batch = config.batch_size * config.devices * config.num_nodes
    if config.batch_size < 1:
        raise SeedError(f"--batch-size must be at least 1, got {config.batch_size}")
    if global_batch > dataset_size:
        devices = config.devices * config.num_nodes
        raise SeedError(f"--batch-size {config.batch_size} x {devices} devices exceeds the {dataset_size} training images; lower --batch-size")


def monitor_loaders(config: TrainConfig) -> list[DataLoader]:
    """Seeded subsets of train (the kNN bank) and val (the queries) with the eval transform; the splits must share their classes."""
    splits = [dataset_for(config, split, eval_transform(config.image_size)) for split in ("train", "val")]
    check_classes(*splits, config.data)
    return [subset_loader(dataset, size, config) for dataset, size in zip(splits, (config.knn_bank_size, config.knn_query_size), strict=True)]


def train_eval_loader(config: TrainConfig, size: int) -> DataLoader:
    """A seeded subset of ``size`` train images under the eval transform, the same images the kNN bank starts with
    (PreciseBN's images for a method without the kNN monitor)."""
    return subset_loader(dataset_for(config, "train", eval_transform(config.image_size)), size, config)


def subset_loader(dataset: Dataset, size: int, config: TrainConfig) -> DataLoader:
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed))
    return make_loader(Subset(dataset, order[:size].tolist()), config, shuffle=False, batch_size=max(config.batch_size, 256))
