"""Frozen-backbone features: extracted once per checkpoint, data, split and transform, then cached on disk.

kNN, the fast linear probe, the semi-supervised linear probe and transfer all
read pooled features of centre-cropped images (``seed.data.eval_transform``)
from a frozen backbone in eval mode. Extracting them is the slow part, so they
are written to ``$SEED_CACHE/features/`` (default ``~/.cache/seed/features/``)
under a key made of the checkpoint's SHA-256, the data, the split, the image
size and the transform; a second run with the same key reads the file and
runs no forward pass.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from downstream.common import Checkpoint
from seed.checkpoints import atomic_save, load_file
from seed.config import CommonConfig
from seed.data import BUILTIN, check_classes, dataset_for, eval_transform
from seed.errors import SeedError
from seed.loaders import default_workers

#: Bump when the cached content changes meaning, so old files are not reused.
CACHE_VERSION = 1


def cache_dir() -> Path:
    """``$SEED_CACHE/features``, else ``~/.cache/seed/features``."""
    root = os.environ.get("SEED_CACHE") or Path.home() / ".cache" / "seed"
    return Path(root) / "features"


def eval_device(config: CommonConfig) -> torch.device:
    """The GPU when there is one (unless ``--accelerator cpu``), else the CPU."""
    if config.accelerator != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class Features:
    """Pooled features of every image of a split, in dataset order."""

    features: Tensor  # (N, D) float32, not normalised
    labels: Tensor  # (N,) int64
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Tensor) -> "Features":
        return Features(self.features[indices], self.labels[indices], self.classes)


@torch.no_grad()
def extract(backbone: nn.Module, dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, desc: str = "features") -> Features:
    """Run the frozen ``backbone`` (eval mode: BatchNorm uses its running statistics) over ``dataset``."""
    was_training = backbone.training
    backbone.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    features, labels = [], []
    for images, targets in tqdm(loader, desc=desc, unit="batch", mininterval=1.0, dynamic_ncols=True):
        features.append(backbone(images.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(targets, dtype=torch.long))
    backbone.train(was_training)
    classes = dataset.dataset.classes if isinstance(dataset, Subset) else dataset.classes
    return Features(torch.cat(features), torch.cat(labels), list(classes))


class DecodedSplit(Dataset):
    """A split's images after the evaluation transform, decoded on first use and then held in memory.

    ``seed-eval compare`` extracts features of several networks from the same images: decoding them once
    spares each further network a pass of image decoding and resizing (a fifth of the extraction time of a
    ResNet-18 at 32 px on a CPU).
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, desc: str) -> None:
        self.dataset, self.batch_size, self.num_workers, self.desc = dataset, batch_size, num_workers, desc
        self.classes = dataset.dataset.classes if isinstance(dataset, Subset) else dataset.classes
        self._images: Tensor | None = None
        self._labels: Tensor | None = None

    @staticmethod
    def size_bytes(dataset: Dataset) -> int:
        """The memory ``dataset`` takes decoded (float32, judged from its first image)."""
        return len(dataset) * dataset[0][0].numel() * 4

    def decode(self) -> tuple[Tensor, Tensor]:
        """The images and labels, decoded now if they were not yet."""
        if self._images is None:
            loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers)
            batches = list(tqdm(loader, desc=f"decoding {self.desc}", unit="batch", mininterval=1.0, dynamic_ncols=True))
            self._images = torch.cat([images for images, _ in batches])
            self._labels = torch.cat([torch.as_tensor(labels, dtype=torch.long) for _, labels in batches])
        return self._images, self._labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        images, labels = self.decode()
        return images[index], int(labels[index])


def _fingerprint(dataset: Dataset) -> str:
    """What identifies the images of a split cheaply: an ImageFolder's file list, else its labels."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        items = [f"{os.path.relpath(path, dataset.root)}:{target}" for path, target in samples]
    else:
        items = [str(int(t)) for t in dataset.targets]
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def feature_key(checkpoint_sha256: str, data: str, split: str, image_size: int, dataset: Dataset, indices: Tensor | None = None) -> str:
    """The cache key: checkpoint hash + data + split + image size + transform + the dataset's file list (+ the subset's indices)."""
    data = data if data in BUILTIN else str(Path(data).expanduser().resolve())
    parts = {
        "version": CACHE_VERSION,
        "checkpoint": checkpoint_sha256,
        "data": data,
        "split": split,
        "image_size": image_size,
        "transform": repr(dataset.transform),
        "images": len(dataset),
        "fingerprint": _fingerprint(dataset),
    }
    if indices is not None:
        parts["subset"] = hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def open_split(config: CommonConfig, split: str) -> Dataset:
    """A split of ``--data`` with the evaluation transform; an empty one is an error."""
    dataset = dataset_for(config, split, eval_transform(config.image_size))
    if len(dataset) == 0:
        raise SeedError(f"the {split} split of {config.data} holds no images")
    return dataset


def cached_features(checkpoint: Checkpoint, config: CommonConfig, split: str, dataset: Dataset, indices: Tensor | None = None,
                    decoded: DecodedSplit | None = None) -> Features:
    """Features of ``dataset`` (a split opened by :func:`open_split`), or of its ``indices`` only, from the cache or extracted and cached.

    ``decoded``: the same split already decoded (:class:`DecodedSplit`), read instead of ``dataset`` when the whole split is extracted.
    """
    if indices is not None and (cache_dir() / f"{feature_key(checkpoint.sha256, config.data, split, config.image_size, dataset)}.pt").is_file():
        return cached_features(checkpoint, config, split, dataset).subset(indices)  # the whole split is cached already
    path = cache_dir() / f"{feature_key(checkpoint.sha256, config.data, split, config.image_size, dataset, indices)}.pt"
    if path.is_file():
        try:
            saved = load_file(path)
            print(f"{split} features: {tuple(saved['features'].shape)} from the cache {path}")
            return Features(saved["features"], saved["labels"], list(saved["classes"]))
        except Exception:  # a damaged cache file, whatever the error, is extracted again
            path.unlink(missing_ok=True)
    checkpoint.check_unchanged()  # never cache features of a backbone trained in place under the file's hash
    images = (decoded or dataset) if indices is None else Subset(dataset, indices.tolist())
    workers = default_workers(config)
    if isinstance(images, DecodedSplit):
        images.decode()  # its own progress bar, before the extraction's
        workers = 0  # in memory already: nothing left for loader processes to do
    found = extract(checkpoint.backbone, images, config.batch_size, workers, eval_device(config), desc=f"{split} features")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"features": found.features, "labels": found.labels, "classes": found.classes}, path)
    print(f"{split} features: {tuple(found.features.shape)} extracted, cached at {path}")
    return found


def train_val_features(checkpoint: Checkpoint, config: CommonConfig) -> tuple[Features, Features]:
    """Features of both splits, after checking that they share their classes."""
    train, val = open_split(config, "train"), open_split(config, "val")
    check_classes(train, val, config.data)
    return cached_features(checkpoint, config, "train", train), cached_features(checkpoint, config, "val", val)
