import gzip
import inspect
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import seed.data as data
from seed.data import BUILTIN, eval_transform, load_dataset, seed_view_transform, single_view_transform, small_crop_transforms, view_transform
from seed.errors import SeedError

from .conftest import write_idx

FASHION_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@pytest.fixture
def fake_fashion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny Fashion-MNIST (6 train / 4 val, 28x28) under $SEED_DATA/fashion-mnist."""
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for prefix, count in (("train", 6), ("t10k", 4)):
        images = np.arange(count * 28 * 28, dtype=np.int64).reshape(count, 28, 28) % 256
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)
    monkeypatch.setenv("SEED_DATA", str(tmp_path))
    return folder


def test_digits_split_is_stratified_and_fixed() -> None:
    train, val = load_dataset("digits", "train"), load_dataset("digits", "val")
    assert (len(train), len(val)) == (1437, 360)
    assert train.classes == [str(d) for d in range(10)]
    assert set(train.targets) == set(val.targets) == set(range(10))
    assert min(Counter(val.targets).values()) >= 35  # each class keeps its ~20% share
    image, label = train[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (8, 8)
    assert type(label) is int
    assert np.asarray(image).max() > 200  # 0..16 scaled to 0..255
    again = load_dataset("digits", "train")
    assert again.targets == train.targets and np.array_equal(np.asarray(again[5][0]), np.asarray(train[5][0]))


def test_fake_fashion_mnist(fake_fashion: Path) -> None:
    train = load_dataset("fashion-mnist", "train", transform=eval_transform(32))
    val = load_dataset("fashion-mnist", "val")
    assert (len(train), len(val)) == (6, 4)
    assert train.classes[:2] == ["T-shirt/top", "Trouser"] and len(train.classes) == 10
    assert train.targets == [0, 1, 2, 3, 4, 5] and val.targets == [0, 1, 2, 3]
    tensor, label = train[3]
    assert tensor.shape == (3, 32, 32) and label == 3
    image, _ = val[1]
    assert image.mode == "RGB" and image.size == (28, 28)
    assert np.asarray(image)[0, 0].tolist() == [28 * 28 % 256] * 3


def test_fashion_mnist_reads_uncompressed_idx(fake_fashion: Path) -> None:
    labels = fake_fashion / "t10k-labels-idx1-ubyte.gz"
    labels.with_suffix("").write_bytes(gzip.decompress(labels.read_bytes()))
    labels.unlink()
    assert load_dataset("fashion-mnist", "val").targets == [0, 1, 2, 3]


@pytest.mark.parametrize("content", [b"not gzip at all", gzip.compress(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x00", mtime=0)],
                         ids=["not gzip", "truncated"])  # fixed ids and gzip time: every pytest-xdist worker collects the same names
def test_corrupt_idx_names_the_file(fake_fashion: Path, content: bytes) -> None:
    (fake_fashion / "train-labels-idx1-ubyte.gz").write_bytes(content)
    with pytest.raises(SeedError, match="train-labels-idx1-ubyte.gz") as error:
        load_dataset("fashion-mnist", "train")
    assert "\n" not in str(error.value)


def test_idx_with_wrong_magic(fake_fashion: Path) -> None:
    write_idx(fake_fashion / "train-images-idx3-ubyte", np.zeros(6))  # a labels file where images belong
    with pytest.raises(SeedError, match="magic number 2049"):
        load_dataset("fashion-mnist", "train")


def test_fashion_mnist_missing_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEED_DATA", str(tmp_path))
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM", tmp_path / "nowhere")
    with pytest.raises(SeedError) as error:
        load_dataset("fashion-mnist", "train")
    message = str(error.value)
    assert "\n" not in message
    assert all(hint in message for hint in ("make data", "apt-get install dataset-fashion-mnist", "SEED_DATA", "--download"))


@pytest.mark.skipif(not all((data.FASHION_MNIST_SYSTEM / f"{n}.gz").is_file() for n in FASHION_FILES), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEED_DATA", str(tmp_path))  # nothing there: falls through to the system folder
    train, val = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "val")
    assert (len(train), len(val)) == (60000, 10000)
    assert len(train.classes) == 10 and set(val.targets) == set(range(10))
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (28, 28) and label == 9  # the first training image is an ankle boot


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """train/ and val/ with classes cat and dog; one greyscale PNG among RGB JPEGs and PNGs."""
    root = tmp_path / "pets"
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
        Image.new("RGB", (20, 14), (200, 10, 10)).save(root / split / "cat" / "a.jpg")
        Image.new("L", (9, 9), 128).save(root / split / "cat" / "b.png")
        Image.new("RGB", (16, 16), (10, 10, 200)).save(root / split / "dog" / "c.png")
    return root


def test_image_folder_gives_rgb(image_folder: Path) -> None:
    train = load_dataset(str(image_folder), "train")
    assert train.classes == ["cat", "dog"] and list(train.targets) == [0, 0, 1]
    assert all(image.mode == "RGB" for image, _ in train)
    grey, label = train[1]
    assert grey.size == (9, 9) and label == 0
    val = load_dataset(str(image_folder), "val", transform=eval_transform(16))
    assert val[0][0].shape == (3, 16, 16)


def test_image_folder_errors(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(SeedError, match="does not exist"):
        load_dataset(str(tmp_path / "missing"), "train")
    (tmp_path / "flat").mkdir()
    with pytest.raises(SeedError, match="no train/ folder"):
        load_dataset(str(tmp_path / "flat"), "train")


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(SeedError) as error:
        load_dataset("imagenet-nope", "train")
    assert all(name in str(error.value) for name in BUILTIN) and "ImageFolder" in str(error.value)


def test_torchvision_sets_need_a_root(tmp_path: Path) -> None:
    with pytest.raises(SeedError, match="--data-root"):
        load_dataset("cifar10", "train")
    with pytest.raises(SeedError, match="--download"):
        load_dataset("cifar100", "val", data_root=str(tmp_path))


@pytest.mark.parametrize("method", ["mocov2", "simclr"])
def test_view_transform_gives_two_views(method: str) -> None:
    views = view_transform(method, 32)(Image.new("RGB", (40, 30), (90, 120, 30)))
    assert len(views) == 2 and all(view.shape == (3, 32, 32) for view in views)
    one = single_view_transform(method, 32)(Image.new("RGB", (8, 8)))
    assert isinstance(one, torch.Tensor) and one.shape == (3, 32, 32)


def test_blur_off_for_small_images_unless_asked() -> None:
    def blur_probability(transform) -> float:
        steps = transform.transforms[0].transform.transforms
        return next(step.prob for step in steps if type(step).__name__ == "GaussianBlur")

    assert blur_probability(view_transform("mocov2", 32)) == 0.0
    assert blur_probability(view_transform("mocov2", 224)) > 0.0
    assert blur_probability(view_transform("simclr", 32, blur=True)) > 0.0
    with pytest.raises(SeedError, match="mocov2"):
        view_transform("byol", 32)


@pytest.mark.parametrize("size", [32, 224])
def test_eval_transform_is_square_and_deterministic(size: int) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 61, 3), dtype=np.uint8))
    transform = eval_transform(size)
    out = transform(image)
    assert out.shape == (3, size, size)
    assert torch.equal(out, transform(image))


def _recipe(transform) -> dict:
    """The augmentation parameters of one lightly view (crop, jitter, grey, blur, flip), walked through nested Composes
    (by class name: lightly uses torchvision's transforms v2 when they are there)."""
    found: dict = {}

    def walk(step) -> None:
        inner = getattr(step, "transforms", None) or getattr(step, "transform", None)
        kind = type(step).__name__
        if kind == "RandomResizedCrop":
            found["size"], found["scale"] = tuple(step.size), step.scale
        elif kind == "RandomApply" and type(step.transforms[0]).__name__ == "ColorJitter":
            jitter = step.transforms[0]
            found["jitter_p"] = step.p
            found["jitter"] = (jitter.brightness[1] - 1, jitter.contrast[1] - 1, jitter.saturation[1] - 1, jitter.hue[1])
        elif kind == "RandomGrayscale":
            found["grey"] = step.p
        elif kind == "GaussianBlur":
            found["blur"] = step.prob
        elif kind == "RandomHorizontalFlip":
            found["flip"] = step.p
        elif isinstance(inner, (list, tuple)):
            for child in inner:
                walk(child)
        elif inner is not None and not inspect.ismethod(inner):  # v2 transforms have a transform() method
            walk(inner)

    walk(transform)
    return found


def _close(found: dict, expected: dict) -> bool:
    return found.keys() == expected.keys() and all(torch.allclose(torch.tensor(found[k], dtype=torch.float64),
                                                                  torch.tensor(expected[k], dtype=torch.float64)) for k in expected)


@pytest.mark.parametrize("augmentation, expected", [
    # SEED tools/utils.py: mocov2_aug, mocov1_aug / simclr_aug (jitter always, hue 0.4, no blur), swav_aug (crops from 0.14)
    ("mocov2", {"size": (224, 224), "scale": (0.2, 1.0), "jitter_p": 0.8, "jitter": (0.4, 0.4, 0.4, 0.1), "grey": 0.2, "blur": 0.5, "flip": 0.5}),
    ("mocov1", {"size": (224, 224), "scale": (0.2, 1.0), "jitter_p": 1.0, "jitter": (0.4, 0.4, 0.4, 0.4), "grey": 0.2, "blur": 0.0, "flip": 0.5}),
    ("swav", {"size": (224, 224), "scale": (0.14, 1.0), "jitter_p": 0.8, "jitter": (0.4, 0.4, 0.4, 0.1), "grey": 0.2, "blur": 0.5, "flip": 0.5}),
])
def test_seed_views_follow_the_official_recipe_per_teacher(augmentation: str, expected: dict) -> None:
    transform = seed_view_transform(augmentation, 224)
    assert _close(_recipe(transform), expected), _recipe(transform)
    assert transform(Image.new("RGB", (300, 260), (90, 120, 30))).shape == (3, 224, 224)
    assert _recipe(seed_view_transform(augmentation, 32))["blur"] == 0.0  # off below 96px, as for every recipe
    with pytest.raises(SeedError, match="choose one of: mocov2, mocov1, swav"):
        seed_view_transform("simclr", 224)


def test_small_crops_have_the_official_jitter_strength() -> None:
    """SEED's swav_small_aug: 96px crops of 0.05-0.14 of the image, jitter 0.4/0.4/0.4/0.1 (lightly's SwAV default is twice that)."""
    crops = small_crop_transforms(224, 6)
    assert len(crops) == 6
    expected = {"size": (96, 96), "scale": (0.05, 0.14), "jitter_p": 0.8, "jitter": (0.4, 0.4, 0.4, 0.1), "grey": 0.2, "blur": 0.5, "flip": 0.5}
    for crop in crops:
        assert _close(_recipe(crop), expected), _recipe(crop)
    assert crops[0](Image.new("RGB", (300, 260))).shape == (3, 96, 96)
    assert _recipe(small_crop_transforms(32, 2)[0])["size"] == (14, 14)
