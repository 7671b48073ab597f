"""Datasets and view transforms.

``load_dataset`` turns ``--data`` into a dataset of ``(image, label)`` with RGB
PIL images: the offline default Fashion-MNIST, scikit-learn's digits,
torchvision's CIFAR/STL-10, or an ImageFolder with ``train/`` and ``val/``.
The view transforms are lightly's recipes, sized by ``--image-size``.

An ImageFolder converts every image to RGB (grayscale, CMYK, palette, 1x1
images are used) and steps over files that cannot be decoded (truncated,
empty, not an image): they are found while they are read, with no scan of the
whole folder before training (ImageNet holds 1.28M files), replaced in their
batch by the next readable image, and listed in the run's ``skipped.txt``.
``--strict-data`` makes the first such file an error instead.
"""

import gzip
import os
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torchvision.transforms as T
from lightly.transforms import MoCoV1Transform, MoCoV2Transform, SimCLRTransform, SwaVTransform
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets

from seed.errors import SeedError

if TYPE_CHECKING:
    from seed.config import CommonConfig

BUILTIN = ("fashion-mnist", "digits", "cifar10", "cifar100", "stl10")
FASHION_MNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# (images, labels) file names per split, without the optional .gz suffix.
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
METHODS = {"mocov2": MoCoV2Transform, "simclr": SimCLRTransform}
#: The run folder's list of images that could not be read and were skipped.
SKIPPED = "skipped.txt"
#: What PIL raises on a file it cannot decode: unknown format, truncated data, broken chunks, decompression bombs.
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ArrayImageDataset(Dataset):
    """Grey images held in one uint8 array (N,H,W), served as RGB PIL images."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: list[str], transform: Callable | None = None) -> None:
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index]).convert("RGB")
        return (self.transform(image) if self.transform else image), self.targets[index]


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not; ``magic`` is 2051 for images, 2049 for labels.

    A bad file is a user problem (interrupted copy, wrong file), so it is a SeedError naming the file.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise SeedError(f"{path} cannot be read ({error}); delete it and fetch the dataset again (make data)") from None
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        kind = "images" if magic == 2051 else "labels"
        raise SeedError(f"{path} is not an IDX {kind} file (magic number {found}, expected {magic}); fetch the dataset again (make data)")
    ndim = magic - 2048
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SeedError(f"{path} is truncated (incomplete IDX header); fetch the dataset again (make data)")
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(shape)):
        raise SeedError(f"{path} holds {data.size} values, its header says {int(np.prod(shape))}; fetch the dataset again (make data)")
    return data.reshape(shape)


def _find_idx(folder: Path, name: str) -> Path | None:
    """``name.gz`` or uncompressed ``name`` in ``folder``, whichever exists (gzipped first)."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist_folder() -> Path | None:
    """The first of ``$SEED_DATA/fashion-mnist`` and the Debian package's folder that holds the files."""
    candidates = [Path(os.environ["SEED_DATA"]) / "fashion-mnist"] if os.environ.get("SEED_DATA") else []
    for folder in [*candidates, FASHION_MNIST_SYSTEM]:
        if all(_find_idx(folder, name) for pair in _FASHION_FILES.values() for name in pair):
            return folder
    return None


def _fashion_mnist(split: str, data_root: str | None, download: bool, transform: Callable | None) -> Dataset:
    folder = fashion_mnist_folder()
    if folder is not None:
        images_name, labels_name = _FASHION_FILES[split]
        images, labels = read_idx(_find_idx(folder, images_name), 2051), read_idx(_find_idx(folder, labels_name), 2049)
        if len(images) != len(labels):
            raise SeedError(f"fashion-mnist in {folder}: {len(images)} images but {len(labels)} labels; fetch the dataset again (make data)")
        return ArrayImageDataset(images, labels, FASHION_MNIST_CLASSES, transform)
    if download:
        root = Path(data_root or Path.home() / ".cache" / "seed")
        try:
            tv = datasets.FashionMNIST(str(root), train=split == "train", download=True)
        except (RuntimeError, OSError) as error:
            raise SeedError(f"fashion-mnist could not be downloaded to {root} ({str(error).splitlines()[0]}); run `make data` instead") from None
        return ArrayImageDataset(tv.data.numpy(), tv.targets.tolist(), FASHION_MNIST_CLASSES, transform)
    raise SeedError(
        f"fashion-mnist not found in $SEED_DATA/fashion-mnist or {FASHION_MNIST_SYSTEM}; run `make data` "
        "(or `apt-get install dataset-fashion-mnist`), set SEED_DATA to a folder holding fashion-mnist/, or pass --download when online"
    )


def _digits(split: str, transform: Callable | None) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, split 80/20 stratified with random_state=0 (1,437 train / 360 val)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    train_x, val_x, train_y, val_y = train_test_split(images, digits.target, test_size=0.2, stratify=digits.target, random_state=0)
    images, targets = (train_x, train_y) if split == "train" else (val_x, val_y)
    return ArrayImageDataset(images, targets, [str(d) for d in range(10)], transform)


def _torchvision(name: str, split: str, data_root: str | None, download: bool, transform: Callable | None) -> Dataset:
    if data_root is None:
        raise SeedError(f"--data {name} needs --data-root DIR (the folder that holds or will hold it; add --download when online)")
    train = split == "train"
    try:
        if name == "stl10":
            dataset = datasets.STL10(data_root, split="train" if train else "test", download=download, transform=transform)
            dataset.targets = dataset.labels.tolist()  # STL10 calls them labels; callers read .targets
            return dataset
        kind = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        return kind(data_root, train=train, download=download, transform=transform)
    except RuntimeError as error:
        raise SeedError(f"{name} not found in {data_root} ({str(error).splitlines()[0]}); pass --download when online, or the right --data-root") from None
    except OSError as error:
        raise SeedError(f"{name} could not be downloaded to {data_root} ({error}); check the network, or put the files there and drop --download") from None


def _rgb_loader(path: str) -> Image.Image:
    with open(path, "rb") as handle:
        return Image.open(handle).convert("RGB")


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with RGB images that steps over unreadable files.

    An item whose file cannot be decoded is replaced by the next readable one
    (so batches keep their size, which DDP's all-gathers need). Each such file
    is appended once per process to ``skip_log`` (set by the engine to the
    run's ``skipped.txt``), or reported on stderr when there is none; with
    ``strict`` it is a :class:`SeedError`.
    """

    def __init__(self, root: str, transform: Callable | None, strict: bool) -> None:
        super().__init__(root, transform=transform, loader=_rgb_loader)
        self.strict = strict
        self.skip_log: Path | None = None
        self._skipped: set[str] = set()

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not -len(self.samples) <= index < len(self.samples):
            raise IndexError(f"index {index} is out of range for {len(self.samples)} images")
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.loader(path)
            except UNREADABLE as error:
                self.skip(path, error)
                continue
            return (self.transform(image) if self.transform else image), target
        raise SeedError(f"no image in {self.root} can be read; see {self.skip_log or 'the warnings above'}")

    def skip(self, path: str, error: Exception) -> None:
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else 'no detail'}"
        if self.strict:
            raise SeedError(f"{path} cannot be read ({reason}); drop --strict-data to skip unreadable files")
        if path in self._skipped:
            return
        self._skipped.add(path)
        if self.skip_log is None:
            print(f"warning: skipped unreadable file {path} ({reason})", file=sys.stderr)
            return
        if self.skip_log.is_file() and any(line.split("\t")[0] == path for line in self.skip_log.read_text().splitlines()):
            return  # listed by another loader process
        with open(self.skip_log, "a") as handle:  # one short append per line: processes do not interleave
            handle.write(f"{path}\t{reason}\n")


def image_folders(dataset: Dataset) -> list[ImageFolder]:
    """The :class:`ImageFolder` under ``dataset`` and its wrappers (``Subset``, seeded samples, fixed crops)."""
    while not isinstance(dataset, ImageFolder) and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return [dataset] if isinstance(dataset, ImageFolder) else []


def _image_folder(root: Path, split: str, transform: Callable | None, strict: bool) -> Dataset:
    if not root.exists():
        raise SeedError(f"data path {root} does not exist; pass an ImageFolder root with train/ and val/ or one of: {', '.join(BUILTIN)}")
    folder = root / split
    if not folder.is_dir():
        raise SeedError(f"data path {root} has no {split}/ folder; an ImageFolder root holds train/<class>/*.jpg and val/<class>/*.jpg")
    try:
        return ImageFolder(str(folder), transform, strict)
    except FileNotFoundError as error:
        text = " ".join(str(error).split()).rstrip(".")
        raise SeedError(f"{folder}: {text}; an ImageFolder split holds <class>/<image> files") from None


def check_classes(train: Dataset, val: Dataset, data: str) -> None:
    """Train and val must name the same classes in the same order, or labels mean different things."""
    train_classes, val_classes = list(_classes(train)), list(_classes(val))
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        detail = f"only in train: {only_train[:3]}, only in val: {only_val[:3]}" if only_train or only_val else "same names, different order"
        raise SeedError(f"{data}: train/ has {len(train_classes)} classes and val/ has {len(val_classes)}, and they differ ({detail}); "
                        "both splits need the same class folders")


def _classes(dataset: Dataset) -> list[str]:
    return _classes(dataset.dataset) if isinstance(dataset, Subset) else dataset.classes


def dataset_for(config: "CommonConfig", split: str, transform: Callable | None = None) -> Dataset:
    """The ``split`` of a command's ``--data``, with its ``--data-root``, ``--download`` and ``--strict-data``."""
    return load_dataset(config.data, split, config.data_root, config.download, transform, strict=config.strict_data)


def load_dataset(data: str, split: str, data_root: str | None = None, download: bool = False, transform: Callable | None = None,
                 strict: bool = False) -> Dataset:
    """The ``split`` ("train" or "val") of ``--data``; items are ``(transform(rgb_image), label)``.

    The dataset exposes ``.classes`` and ``.targets``. ``strict`` makes an unreadable image of an ImageFolder an error
    (otherwise it is skipped and listed).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if data == "fashion-mnist":
        return _fashion_mnist(split, data_root, download, transform)
    if data == "digits":
        return _digits(split, transform)
    if data in ("cifar10", "cifar100", "stl10"):
        return _torchvision(data, split, data_root, download, transform)
    if os.sep in data or Path(data).exists():
        return _image_folder(Path(data).expanduser(), split, transform, strict)
    raise SeedError(f"unknown dataset '{data}'; choose one of: {', '.join(BUILTIN)}, or pass the path of an ImageFolder with train/ and val/")


def _method(method: str) -> type[MultiViewTransform]:
    if method not in METHODS:
        raise SeedError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)}")
    return METHODS[method]


def view_transform(method: str, image_size: int, blur: bool | None = None, min_scale: float | None = None) -> MultiViewTransform:
    """Two augmented views per image with lightly's MoCo v2 or SimCLR recipe.

    Gaussian blur is off below 96px (as CIFAR recipes do: it erases small images) and on otherwise; ``blur`` overrides.
    ``min_scale`` overrides the recipe's smallest crop (0.2 MoCo v2, 0.08 SimCLR).
    """
    use_blur = image_size >= 96 if blur is None else blur
    crop = {} if min_scale is None else {"min_scale": min_scale}
    return _method(method)(input_size=image_size, gaussian_blur=0.5 if use_blur else 0.0, **crop)


def single_view_transform(method: str, image_size: int, blur: bool | None = None, min_scale: float | None = None) -> Callable:
    """One augmented view (the first of ``view_transform``'s): SEED feeds the same view to teacher and student."""
    return view_transform(method, image_size, blur, min_scale).transforms[0]


#: SEED's view recipes, named as ``--augmentation`` takes them.
SEED_AUGMENTATIONS = ("mocov2", "mocov1", "swav")


def seed_view_transform(augmentation: str, image_size: int, min_scale: float | None = None) -> Callable:
    """SEED's one view for teacher and student, by the official code's recipe for the teacher (SEED ``tools/utils.py``).

    ``mocov2`` (MoCo teachers): crop 0.2-1, colour jitter 0.4/0.4/0.4/0.1 with
    p 0.8, grey 0.2, blur 0.5, flip. ``mocov1`` (SimCLR teachers; MoCo v1 /
    InstDisc's set): crop 0.2-1, grey 0.2, jitter 0.4/0.4/0.4/0.4 always, flip,
    no blur (lightly jitters before the grey conversion, the official code after).
    ``swav`` (SwAV teachers): ``mocov2`` with crops down to 0.14 of the image.
    Blur is off below 96px, as in :func:`view_transform`; ``min_scale`` overrides the smallest crop.
    """
    if augmentation not in SEED_AUGMENTATIONS:
        raise SeedError(f"unknown --augmentation '{augmentation}'; choose one of: {', '.join(SEED_AUGMENTATIONS)}")
    if augmentation == "mocov1":
        return MoCoV1Transform(input_size=image_size, cj_prob=1.0, min_scale=0.2 if min_scale is None else min_scale).transforms[0]
    default_scale = 0.14 if augmentation == "swav" else None
    return single_view_transform("mocov2", image_size, min_scale=default_scale if min_scale is None else min_scale)


def small_crop_transforms(image_size: int, count: int) -> list[Callable]:
    """SEED's ``count`` small patches per image (official ``swav_small_aug``): 96/224 of ``image_size``,
    crops 0.05-0.14 of the image, MoCo v2's jitter 0.4/0.4/0.4/0.1 (half of lightly's SwAV default), grey 0.2, blur 0.5, flip."""
    small = max(round(image_size * 96 / 224), 8)
    multi_crop = SwaVTransform(crop_sizes=(small,), crop_counts=(count,), crop_min_scales=(0.05,), crop_max_scales=(0.14,),
                               cj_bright=0.4, cj_contrast=0.4, cj_sat=0.4, cj_hue=0.1, gaussian_blur=0.5 if image_size >= 96 else 0.0)
    return list(multi_crop.transforms)


def eval_transform(image_size: int) -> Callable:
    """Deterministic: resize small data straight to size; resize to 8/7 and centre-crop larger data."""
    normalize = T.Normalize(mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"])
    if image_size < 96:
        return T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), normalize])
    return T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(), normalize])
