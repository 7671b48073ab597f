from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from downstream.common import Checkpoint, EvalConfig
from downstream.features import DecodedSplit, cache_dir, cached_features, open_split, train_val_features
from seed.data import check_classes
from seed.errors import SeedError


class CountingBackbone(nn.Module):
    """Mean colour per channel, counting forward passes."""

    feature_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images.mean(dim=(2, 3))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "features"


def checkpoint(sha: str) -> Checkpoint:
    return Checkpoint(Path("ck.pt"), sha, "r18", "test", CountingBackbone())


def test_second_extraction_hits_the_cache(cache):
    config = EvalConfig(data="digits", image_size=8, num_workers=0, batch_size=512)
    first = checkpoint("a" * 64)
    train, val = train_val_features(first, config)
    assert first.backbone.calls == 4  # 3 train batches, 1 val batch
    assert train.features.shape == (1437, 3) and len(val) == 360 and train.classes == [str(d) for d in range(10)]
    assert cache_dir() == cache and len(list(cache.glob("*.pt"))) == 2

    again = checkpoint("a" * 64)
    train_again, _ = train_val_features(again, config)
    assert again.backbone.calls == 0
    assert torch.equal(train_again.features, train.features) and torch.equal(train_again.labels, train.labels)

    other = checkpoint("b" * 64)
    train_val_features(other, config)
    assert other.backbone.calls == 4 and len(list(cache.glob("*.pt"))) == 4


def test_a_split_decoded_once_gives_every_network_the_same_features(cache, monkeypatch):
    """Several networks read one decoded copy (one decoding pass in all) and get exactly the features the split gives."""
    config = EvalConfig(data="digits", image_size=8, num_workers=0, batch_size=512)
    dataset = open_split(config, "train")
    reads, get = [], type(dataset).__getitem__
    monkeypatch.setattr(type(dataset), "__getitem__", lambda self, i: reads.append(i) or get(self, i))
    decoded = DecodedSplit(dataset, 256, 0, "train")
    assert len(decoded) == len(dataset) and not reads  # nothing decoded until a network needs it
    cached_features(checkpoint("d" * 64), config, "train", dataset)  # the reference: cached, then not needed again
    reads.clear()
    assert cached_features(checkpoint("d" * 64), config, "train", dataset, decoded=decoded).features.shape == (1437, 3) and not reads
    first = cached_features(checkpoint("e" * 64), config, "train", dataset, decoded=decoded)
    second = cached_features(checkpoint("f" * 64), config, "train", dataset, decoded=decoded)
    assert len(reads) == len(dataset)  # one pass for both networks
    reference = cached_features(checkpoint("d" * 64), config, "train", dataset)
    assert torch.equal(first.features, reference.features) and torch.equal(second.labels, reference.labels)
    assert first.classes == reference.classes and DecodedSplit.size_bytes(dataset) == 1437 * 3 * 8 * 8 * 4


def test_subset_features_and_other_image_size(cache):
    config = EvalConfig(data="digits", image_size=8, num_workers=0)
    model = checkpoint("c" * 64)
    dataset = open_split(config, "train")
    subset = cached_features(model, config, "train", dataset, torch.tensor([3, 7]))
    assert model.backbone.calls == 1 and len(subset) == 2
    full = cached_features(model, config, "train", dataset)
    assert torch.allclose(full.features[[3, 7]], subset.features)
    calls = model.backbone.calls
    cached_features(model, config, "train", dataset, torch.tensor([1, 2]))  # read from the whole split's file
    assert model.backbone.calls == calls
    cached_features(model, EvalConfig(data="digits", image_size=12, num_workers=0), "train", open_split(EvalConfig(data="digits", image_size=12), "train"))
    assert model.backbone.calls > calls


def test_damaged_cache_file_is_extracted_again(cache):
    config = EvalConfig(data="digits", image_size=8, num_workers=0, batch_size=2048)
    model = checkpoint("d" * 64)
    dataset = open_split(config, "val")
    cached_features(model, config, "val", dataset)
    for path in cache.glob("*.pt"):
        path.write_bytes(b"truncated")
    again = cached_features(model, config, "val", dataset)
    assert model.backbone.calls == 2 and len(again) == 360


def test_a_backbone_changed_after_loading_is_never_cached(cache):
    """Features are cached under the file's hash: a backbone trained in place (one BatchNorm statistic moved) must not write them."""
    config = EvalConfig(data="digits", image_size=8, num_workers=0, batch_size=2048)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = Checkpoint(Path("ck.pt"), "e" * 64, "r18", "test", backbone.eval())
    dataset = open_split(config, "val")
    assert len(cached_features(model, config, "val", dataset)) == 360
    backbone[1].running_mean[0] += 1e-3
    with pytest.raises(RuntimeError, match="changed since it was loaded"):
        cached_features(model, config, "train", open_split(config, "train"))
    assert len(list(cache.glob("*.pt"))) == 1


def make_folder(root: Path, splits: dict[str, list[str]]) -> None:
    for split, classes in splits.items():
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(root / split / cls / "x.png")


def test_train_val_class_mismatch_is_an_error(tmp_path):
    make_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "emu"]})
    config = EvalConfig(data=str(tmp_path))
    with pytest.raises(SeedError, match=r"only in train: \['dog'\], only in val: \['emu'\]"):
        check_classes(open_split(config, "train"), open_split(config, "val"), config.data)
