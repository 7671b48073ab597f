from collections import Counter

import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from downstream.semi import SemiConfig, balanced_subset, read_split_file, resolve_finetune, simclr_finetune, write_split_file
from seed.data import load_dataset
from seed.errors import SeedError

# classes of 100, 50, 25, 7 and 1 images
LABELS = torch.tensor([0] * 100 + [1] * 50 + [2] * 25 + [3] * 7 + [4] * 1)[torch.randperm(183, generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("fraction, expected", [(0.1, [10, 5, 3, 1, 1]), (0.01, [1, 1, 1, 1, 1]), (0.5, [50, 25, 13, 4, 1]), (1.0, [100, 50, 25, 7, 1])])
def test_balanced_subset_takes_round_fraction_per_class(fraction, expected):
    """round(fraction x n_c) with halves rounded up (2.5 -> 3, 12.5 -> 13, 3.5 -> 4), at least one image per class."""
    indices = balanced_subset(LABELS, fraction, seed=0)
    counts = Counter(LABELS[indices].tolist())
    assert [counts[c] for c in range(5)] == expected
    assert len(set(indices.tolist())) == len(indices) and torch.equal(indices, indices.sort().values)


def test_balanced_subset_is_reproducible_with_a_seed():
    assert torch.equal(balanced_subset(LABELS, 0.1, seed=3), balanced_subset(LABELS, 0.1, seed=3))
    assert not torch.equal(balanced_subset(LABELS, 0.1, seed=3), balanced_subset(LABELS, 0.1, seed=4))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_fraction_out_of_range_is_an_error(fraction):
    with pytest.raises(SeedError, match="--fraction"):
        balanced_subset(LABELS, fraction, seed=0)


@pytest.fixture
def image_folder(tmp_path):
    """train/ with classes n01 (a.JPEG, b.JPEG, same.JPEG) and n02 (c.JPEG, same.JPEG)."""
    for cls, names in {"n01": ["n01_a.JPEG", "n01_b.JPEG", "same.JPEG"], "n02": ["n02_c.JPEG", "same.JPEG"]}.items():
        (tmp_path / "train" / cls).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (4, 4)).save(tmp_path / "train" / cls / name, format="PNG")
    return ImageFolder(str(tmp_path / "train"))


def test_split_file_of_simclr_basenames(image_folder, tmp_path):
    split = tmp_path / "1percent.txt"
    split.write_text("n02_c.JPEG\nn01_a.JPEG\n\n")
    indices = read_split_file(split, image_folder)
    assert sorted(image_folder.samples[i][0].rsplit("/", 1)[1] for i in indices) == ["n01_a.JPEG", "n02_c.JPEG"]


def test_split_file_roundtrip_and_class_paths(image_folder, tmp_path):
    chosen = torch.tensor([2, 4])  # both same.JPEG: only class/name paths tell them apart
    write_split_file(tmp_path / "split.txt", image_folder, chosen)
    assert (tmp_path / "split.txt").read_text().split() == ["n01/same.JPEG", "n02/same.JPEG"]
    assert torch.equal(read_split_file(tmp_path / "split.txt", image_folder), chosen)


@pytest.mark.parametrize("lines, message", [("n01_a.JPEG\nmissing.JPEG\n", "1 of 2 names are not in the train split"),
                                            ("same.JPEG\n", "write it as class/same.JPEG"),
                                            ("# nothing\n", "names no images")])
def test_bad_split_files(image_folder, tmp_path, lines, message):
    (tmp_path / "split.txt").write_text(lines)
    with pytest.raises(SeedError, match=message):
        read_split_file(tmp_path / "split.txt", image_folder)


def test_split_file_of_indices_for_builtin_data(tmp_path):
    digits = load_dataset("digits", "train")
    write_split_file(tmp_path / "split.txt", digits, torch.tensor([0, 5, 1436]))
    assert torch.equal(read_split_file(tmp_path / "split.txt", digits), torch.tensor([0, 5, 1436]))
    (tmp_path / "bad.txt").write_text("1437\n")
    with pytest.raises(SeedError, match="outside the 1437 train images"):
        read_split_file(tmp_path / "bad.txt", digits)
    with pytest.raises(SeedError, match="does not exist"):
        read_split_file(tmp_path / "none.txt", digits)


def test_finetune_defaults_are_simclrs_recipe():
    """SimCLR app. B.5: lr 0.05 x B/256 (0.8 at its batch 4096), 60 epochs on 1% of the labels, 30 on 10%, momentum 0.9, no weight decay."""
    assert simclr_finetune(0.01, 4096) == {"lr": 0.8, "epochs": 60, "momentum": 0.9, "weight_decay": 0.0}
    assert simclr_finetune(0.1, 256)["epochs"] == 30 and simclr_finetune(0.099, 256)["epochs"] == 60
    config, differs = resolve_finetune(SemiConfig(finetune=True, batch_size=64, devices=2), fraction=0.01)
    assert (config.lr, config.backbone_lr, config.epochs, config.momentum, config.weight_decay, differs) == (0.025, 0.025, 60, 0.9, 0.0, [])
    config, differs = resolve_finetune(SemiConfig(finetune=True, batch_size=256, epochs=100, backbone_lr=0.01, weight_decay=1e-4), 0.1)
    assert (config.lr, config.epochs, differs) == (0.05, 100, ["epochs", "weight_decay", "backbone_lr"])
    with pytest.raises(SeedError, match="--milestones sets the linear probe's step schedule"):
        resolve_finetune(SemiConfig(finetune=True, milestones="30,40"), 0.01)
