"""Detection data: PASCAL VOC (VOCdevkit XML) and COCO (instances JSON) readers.

Both give torchvision-detection samples, ``(image, target)`` with ``image`` a
float (3, H, W) tensor in [0, 1] and ``target`` holding ``boxes`` (N, 4) xyxy
float pixels, ``labels`` (N,) int64 from 1 (0 is background), ``difficult``
(N,) bool, ``image_id``, and ``masks`` (N, H, W) uint8 when asked for. The
detector resizes and normalises; the dataset only flips (training).

VOC follows the MoCo / detectron2 protocol: train on VOC2007 trainval +
VOC2012 trainval, test on VOC2007 test, ``difficult`` objects kept for
training and ignored by the metric; boxes are moved from VOC's 1-based
inclusive pixels to continuous coordinates (``xmin - 1, ymin - 1, xmax,
ymax``) as detectron2's reader does; a VOCdevkit of other classes lists
them in ``classes.txt`` beside its VOC<year> folders. COCO trains on
``instances_train2017`` and tests on ``instances_val2017``; crowd regions are
left out of training and kept in the ground truth that pycocotools scores against.

The generated sets write both layouts: coloured shapes on noise
(``write_synthetic``: the tests, the suite's detection benchmark) and
Fashion-MNIST garments on clutter cut from other garments
(``write_fashion_scenes``: a set where the pretrained backbone matters).
"""

import contextlib
import dataclasses
import io
import json
import random
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from seed.data import FASHION_MNIST_CLASSES, load_dataset
from seed.errors import SeedError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_YEARS = ("2007", "2012")
COCO_SPLITS = {"train": ("train2017", "train2014"), "test": ("val2017", "val2014")}
#: A VOCdevkit's own class list, one name a line, for VOC-format sets whose classes are not VOC's 20.
VOC_CLASS_FILE = "classes.txt"


@dataclasses.dataclass
class Record:
    """One annotated image; ``labels`` start at 1, ``boxes`` are xyxy continuous pixels."""

    image_id: int
    file: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    segmentations: list[Any] | None = None


@dataclasses.dataclass
class DetectionData:
    """Train and test records of one dataset, and how its labels map to category ids."""

    name: str
    classes: list[str]
    category_ids: list[int]  # label i (from 1) is category_ids[i - 1] in the ground truth
    train: list[Record]
    test: list[Record]
    description: str
    coco_gt: COCO | None = None  # the original COCO test annotations (crowd regions included)

    def ground_truth(self, image_ids: list[int] | None = None) -> COCO:
        """COCO-format ground truth of the test records, for pycocotools' COCOeval.

        VOC's ``difficult`` objects become crowd regions, so COCOeval ignores
        detections on them rather than counting them as false positives.
        """
        if self.coco_gt is not None:
            return self.coco_gt
        wanted = None if image_ids is None else set(image_ids)
        records = self.test if wanted is None else [r for r in self.test if r.image_id in wanted]
        return coco_from_dict(records_to_coco(records, self.classes, self.category_ids))


def _box_area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def records_to_coco(records: list[Record], classes: list[str], category_ids: list[int]) -> dict[str, Any]:
    """A COCO ``instances`` dict (bbox ``[x, y, w, h]``) of ``records``."""
    images, annotations = [], []
    for record in records:
        images.append({"id": record.image_id, "file_name": record.file.name, "width": record.width, "height": record.height})
        for box, label, difficult, area in zip(record.boxes, record.labels, record.difficult, _box_area(record.boxes), strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": record.image_id, "category_id": category_ids[int(label) - 1],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(area), "iscrowd": int(difficult)})
    categories = [{"id": cid, "name": name} for cid, name in zip(category_ids, classes, strict=True)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_from_dict(content: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` from an in-memory dict, without its progress prints."""
    coco = COCO()
    coco.dataset = content
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# ---------------------------------------------------------------- VOC


def _voc_years(path: Path) -> dict[str, Path]:
    """``{year: VOC<year> folder}`` under ``path`` (a VOCdevkit, its parent, or one VOC<year> folder)."""
    for root in (path, path / "VOCdevkit"):
        found = {year: root / f"VOC{year}" for year in VOC_YEARS if (root / f"VOC{year}" / "Annotations").is_dir()}
        if found:
            return found
    if (path / "Annotations").is_dir() and path.name.startswith("VOC"):
        return {path.name[3:]: path}
    return {}


def _image_set(folder: Path, split: str) -> list[str] | None:
    file = folder / "ImageSets" / "Main" / f"{split}.txt"
    if not file.is_file():
        return None
    return [line.split()[0] for line in file.read_text().splitlines() if line.strip()]


def _text(node: ET.Element, tag: str, file: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise SeedError(f"VOC annotation {file} has no <{tag}>; the file is not a VOC annotation")
    return child.text.strip()


def _voc_classes(years: dict[str, Path]) -> tuple[str, ...]:
    """VOC's 20 classes, or the devkit's own ``classes.txt`` when it has one."""
    file = next(iter(years.values())).parent / VOC_CLASS_FILE
    if not file.is_file():
        return VOC_CLASSES
    names = tuple(line.strip() for line in file.read_text().splitlines() if line.strip())
    if not names or len(set(names)) != len(names):
        raise SeedError(f"{file} must list each class once, one name a line (or be removed for VOC's 20 classes)")
    return names


def read_voc_xml(file: Path, image_id: int, images: Path, classes: Sequence[str] = VOC_CLASSES) -> Record:
    """One ``Annotations/<id>.xml``: size, objects with name, ``difficult`` and ``bndbox``; labels index ``classes`` from 1."""
    if not file.is_file():
        raise SeedError(f"VOC annotation {file} is missing; the image set lists it")
    try:
        root = ET.parse(file).getroot()
    except ET.ParseError as error:
        raise SeedError(f"VOC annotation {file} is not valid XML ({error})") from None
    size = root.find("size")
    if size is None:
        raise SeedError(f"VOC annotation {file} has no <size>; the file is not a VOC annotation")
    boxes, labels, difficult = [], [], []
    for obj in root.findall("object"):
        name = _text(obj, "name", file)
        if name not in classes:
            known = "the 20 VOC classes" if tuple(classes) == VOC_CLASSES else f"the {len(classes)} classes of its {VOC_CLASS_FILE}"
            raise SeedError(f"VOC annotation {file} names class '{name}', not one of {known}")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise SeedError(f"VOC annotation {file} has an object without <bndbox>")
        xmin, ymin, xmax, ymax = (float(_text(bndbox, tag, file)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
        labels.append(classes.index(name) + 1)
        flag = obj.find("difficult")
        difficult.append(flag is not None and flag.text is not None and flag.text.strip() == "1")
    filename = root.find("filename")
    name = filename.text.strip() if filename is not None and filename.text else f"{file.stem}.jpg"
    return Record(
        image_id=image_id, file=images / name,
        width=int(float(_text(size, "width", file))), height=int(float(_text(size, "height", file))),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4), labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool),
    )


def _read_voc_sets(sets: list[tuple[str, Path, list[str]]], first_id: int, classes: Sequence[str]) -> list[Record]:
    records = []
    for _, folder, ids in sets:
        for name in ids:
            records.append(read_voc_xml(folder / "Annotations" / f"{name}.xml", first_id + len(records), folder / "JPEGImages", classes))
    return records


def read_voc(path: str | Path) -> DetectionData:
    """VOC07+12 trainval for training and VOC07 test for testing, from a VOCdevkit folder.

    Missing years are skipped: with VOC2007 test absent, each year's ``train``
    set trains and its ``val`` set tests. The classes are VOC's 20 unless the
    devkit lists its own in ``classes.txt``.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise SeedError(f"VOC data path {root} does not exist; pass a VOCdevkit folder holding VOC2007/ and/or VOC2012/")
    years = _voc_years(root)
    if not years:
        raise SeedError(f"no VOC data under {root}: expected VOCdevkit/VOC2007/Annotations or VOC2012/Annotations (the VOCdevkit layout)")

    def sets(split: str) -> list[tuple[str, Path, list[str]]]:
        found = [(f"VOC{year} {split}", folder, _image_set(folder, split)) for year, folder in sorted(years.items())]
        return [(name, folder, ids) for name, folder, ids in found if ids]

    train, test = sets("trainval"), [s for s in sets("test") if s[0] == "VOC2007 test"]
    if not test or not train:
        train, test = sets("train"), sets("val")
    if not train or not test:
        raise SeedError(f"no VOC image sets under {root}: expected VOC2007/ImageSets/Main/trainval.txt and test.txt (or train.txt and val.txt)")
    classes = _voc_classes(years)
    train_records = _read_voc_sets(train, 0, classes)
    test_records = _read_voc_sets(test, len(train_records), classes)
    describe = " + ".join(name for name, _, _ in train) + f" ({len(train_records)} images) / " + \
        " + ".join(name for name, _, _ in test) + f" ({len(test_records)} images)"
    return DetectionData("voc", list(classes), list(range(1, len(classes) + 1)), train_records, test_records, describe)


# ---------------------------------------------------------------- COCO


def _coco_split(root: Path, split: str) -> tuple[Path, Path]:
    """The ``instances_<name>.json`` and image folder of ``split`` (train or test)."""
    names = COCO_SPLITS[split]
    for name in names:
        annotations = root / "annotations" / f"instances_{name}.json"
        if annotations.is_file():
            for images in (root / name, root / "images" / name):
                if images.is_dir():
                    return annotations, images
            raise SeedError(f"COCO images of {name} not found: expected {root / name}/ next to {annotations}")
    raise SeedError(f"no COCO annotations for {split}: expected {root / 'annotations' / f'instances_{names[0]}.json'} (or {names[1]})")


def _load_coco(file: Path) -> COCO:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(file))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SeedError(f"COCO annotations {file} are not valid JSON ({error})") from None
    except (KeyError, TypeError) as error:
        raise SeedError(f"COCO annotations {file} lack the instances fields (images, annotations, categories): {error}") from None


def _coco_records(coco: COCO, images: Path, label_of: dict[int, int]) -> list[Record]:
    """Records of every image; crowd regions and boxes without area are left out (they train nothing)."""
    records = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        boxes, labels, segmentations = [], [], []
        for ann in coco.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]
            x1, y1 = max(x, 0.0), max(y, 0.0)
            x2, y2 = min(x + w, info["width"]), min(y + h, info["height"])
            if ann.get("iscrowd", 0) or x2 <= x1 or y2 <= y1:
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(label_of[ann["category_id"]])
            segmentations.append(ann.get("segmentation"))
        records.append(Record(
            image_id=int(image_id), file=images / info["file_name"], width=int(info["width"]), height=int(info["height"]),
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4), labels=np.asarray(labels, dtype=np.int64),
            difficult=np.zeros(len(boxes), dtype=bool), segmentations=segmentations,
        ))
    return records


def read_coco(path: str | Path) -> DetectionData:
    """COCO train2017 for training and val2017 for testing (2014 names also found), from a COCO root folder."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise SeedError(f"COCO data path {root} does not exist; pass the folder holding annotations/, train2017/ and val2017/")
    train_file, train_images = _coco_split(root, "train")
    test_file, test_images = _coco_split(root, "test")
    train_coco, test_coco = _load_coco(train_file), _load_coco(test_file)
    category_ids = sorted(test_coco.getCatIds())
    if sorted(train_coco.getCatIds()) != category_ids:
        raise SeedError(f"{train_file} and {test_file} define different categories; both must share one category list")
    classes = [test_coco.cats[c]["name"] for c in category_ids]
    label_of = {cid: i + 1 for i, cid in enumerate(category_ids)}
    train, test = _coco_records(train_coco, train_images, label_of), _coco_records(test_coco, test_images, label_of)
    describe = f"COCO {train_file.stem[10:]} ({len(train)} images) / {test_file.stem[10:]} ({len(test)} images)"
    return DetectionData("coco", classes, category_ids, train, test, describe, coco_gt=test_coco)


def read_detection_data(dataset: str, path: str | None) -> DetectionData:
    """``--dataset voc|coco`` read from ``--data PATH``."""
    if not path:
        raise SeedError(f"pass --data PATH: the {'VOCdevkit' if dataset == 'voc' else 'COCO'} folder")
    if dataset == "voc":
        return read_voc(path)
    if dataset == "coco":
        return read_coco(path)
    raise SeedError(f"unknown --dataset '{dataset}'; choose voc or coco")


# ---------------------------------------------------------------- dataset


def decode_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE or compressed RLE) as an (H, W) uint8 mask."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


class DetectionDataset(Dataset):
    """Records as torchvision-detection samples; ``train`` adds a random horizontal flip."""

    def __init__(self, records: list[Record], train: bool = False, masks: bool = False) -> None:
        self.records = records
        self.train = train
        self.masks = masks

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self.records[index]
        try:
            with Image.open(record.file) as handle:
                image = pil_to_tensor(handle.convert("RGB")).float().div_(255)
        except (OSError, ValueError) as error:
            raise SeedError(f"image {record.file} cannot be read ({error})") from None
        target = {
            "boxes": torch.from_numpy(record.boxes.copy()), "labels": torch.from_numpy(record.labels.copy()),
            "difficult": torch.from_numpy(record.difficult.copy()), "image_id": torch.tensor(record.image_id),
        }
        if self.masks:
            segmentations = record.segmentations or []
            if len(segmentations) != len(record.boxes) or any(s is None for s in segmentations):
                raise SeedError(f"image {record.file} has objects without a segmentation; train without --masks")
            height, width = image.shape[-2:]
            stack = [decode_mask(s, height, width) for s in segmentations]
            target["masks"] = torch.from_numpy(np.stack(stack) if stack else np.zeros((0, height, width), dtype=np.uint8))
        if self.train and random.random() < 0.5:
            image = image.flip(-1)
            width = image.shape[-1]
            boxes = target["boxes"]
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Images of different sizes stay a list (the detector batches them itself)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


# ---------------------------------------------------------------- generated sets (tests, benchmarks)


@dataclasses.dataclass
class Scene:
    """One generated image: objects as (class index, x1, y1, x2, y2) in whole continuous pixels, one COCO segmentation each."""

    image: Image.Image
    objects: list[tuple[int, int, int, int, int]]
    segmentations: list[Any]
    sources: list[int] = dataclasses.field(default_factory=list)  # the fashion scenes: each object's Fashion-MNIST index


def _voc_xml(filename: str, size: int, objects: list[tuple[int, int, int, int, int]], classes: Sequence[str], difficult_below: int) -> str:
    parts = [f"<annotation><folder>VOC</folder><filename>{filename}</filename>",
             f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size><segmented>0</segmented>"]
    for kind, x1, y1, x2, y2 in objects:
        difficult = int(min(x2 - x1, y2 - y1) < difficult_below)
        parts.append(f"<object><name>{escape(classes[kind])}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
                     f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def _write_scenes(root: Path, plan: list[tuple[str, str, str, list[Scene]]], classes: Sequence[str], category_ids: Sequence[int],
                  difficult_below: int, suffix: str) -> list[list[str]]:
    """Write ``plan`` (VOC year, VOC image set, COCO split, scenes) as ``root/VOCdevkit`` and ``root/coco``; the image names per entry.

    Both copies hold the same images and boxes; classes outside VOC's 20 are listed in the devkit's ``classes.txt``.
    """
    voc, coco = root / "VOCdevkit", root / "coco"
    instances: dict[str, dict[str, list]] = {}
    categories = [{"id": cid, "name": name} for name, cid in zip(classes, category_ids, strict=True)]
    written = []
    for year, image_set, coco_split, scenes in plan:
        folder = voc / f"VOC{year}"
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        (coco / coco_split).mkdir(parents=True, exist_ok=True)
        content = instances.setdefault(coco_split, {"images": [], "annotations": [], "categories": categories})
        names = []
        for scene in scenes:
            image_id = sum(len(c["images"]) for c in instances.values()) + 1
            name = f"{year}_{image_id:06d}"
            file = f"{name}.{suffix}"
            scene.image.save(folder / "JPEGImages" / file, **({"quality": 95} if suffix == "jpg" else {}))
            shutil.copyfile(folder / "JPEGImages" / file, coco / coco_split / file)
            width, height = scene.image.size
            (folder / "Annotations" / f"{name}.xml").write_text(_voc_xml(file, width, scene.objects, classes, difficult_below))
            content["images"].append({"id": image_id, "file_name": file, "width": width, "height": height})
            for (kind, x1, y1, x2, y2), segmentation in zip(scene.objects, scene.segmentations, strict=True):
                area = float(decode_mask(segmentation, height, width).sum())
                content["annotations"].append({"id": len(content["annotations"]) + 1, "image_id": image_id, "category_id": category_ids[kind],
                                               "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": 0, "segmentation": segmentation})
            names.append(name)
        (folder / "ImageSets" / "Main" / f"{image_set}.txt").write_text("\n".join(names) + "\n")
        written.append(names)
    if not set(classes) <= set(VOC_CLASSES):
        (voc / VOC_CLASS_FILE).write_text("\n".join(classes) + "\n")
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    for split, content in instances.items():
        (coco / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return written


# ---------------------------------------------------------------- synthetic shapes (tests, benchmark)

#: The synthetic objects: VOC class, shape, colour, COCO category id.
SYNTHETIC = (("car", "rectangle", (220, 40, 40), 3), ("dog", "ellipse", (40, 200, 60), 18), ("person", "tall", (50, 80, 230), 1))


def _shape_polygon(shape: str, x1: int, y1: int, x2: int, y2: int) -> list[float]:
    if shape == "ellipse":
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        return [float(v) for a in angles for v in (cx + rx * np.cos(a), cy + ry * np.sin(a))]
    return [float(x1), float(y1), float(x2), float(y1), float(x2), float(y2), float(x1), float(y2)]


def _synthetic_scene(rng: np.random.Generator, size: int) -> Scene:
    """Noise with 1-3 coloured shapes, each with its polygon."""
    noise = rng.integers(60, 190, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(len(SYNTHETIC)))
        _, shape, colour, _ = SYNTHETIC[kind]
        w = int(rng.integers(size // 8, size // 2))
        h = min(size - 2, w * 2) if shape == "tall" else int(rng.integers(size // 8, size // 2))
        x1, y1 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colour)
        if shape == "ellipse":
            draw.ellipse([x1, y1, x1 + w - 1, y1 + h - 1], fill=fill)
        else:
            draw.rectangle([x1, y1, x1 + w - 1, y1 + h - 1], fill=fill)
        objects.append((kind, x1, y1, x1 + w, y1 + h))
    segmentations = [[_shape_polygon(SYNTHETIC[kind][1], *box)] for kind, *box in objects]
    return Scene(image, objects, segmentations)


def write_synthetic(root: str | Path, train_images: int = 24, test_images: int = 8, size: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """A synthetic detection set in both layouts: ``root/VOCdevkit`` and ``root/coco``.

    Train images are split between VOC2007 and VOC2012 trainval (07+12), test
    images form VOC2007 test; the COCO copy holds the same images and boxes
    (``train2017``/``val2017``) with polygon masks and COCO's category ids.
    Objects thinner than ``size // 6`` are ``difficult`` in the VOC copy.
    Returns ``(VOCdevkit folder, COCO folder)``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    split_2012 = train_images // 3
    counts = [("2007", "trainval", "train2017", train_images - split_2012), ("2012", "trainval", "train2017", split_2012),
              ("2007", "test", "val2017", test_images)]
    plan = [(year, image_set, split, [_synthetic_scene(rng, size) for _ in range(count)]) for year, image_set, split, count in counts]
    _write_scenes(root, plan, [name for name, *_ in SYNTHETIC], [cid for *_, cid in SYNTHETIC], size // 6, "jpg")
    return root / "VOCdevkit", root / "coco"


# ---------------------------------------------------------------- fashion scenes (benchmark)

#: An item pixel this bright (of 1) or brighter is opaque; half of it is the edge of the item's mask and box.
ITEM_EDGE = 0.1
#: At most this share of the smaller of two item boxes may lie under the other.
ITEM_OVERLAP = 0.25


def _scaled(pixels: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """A grey uint8 patch resized to ``side`` x ``side``, mirrored half of the time, as floats in [0, 1]."""
    image = Image.fromarray(np.ascontiguousarray(pixels)).resize((side, side), Image.BILINEAR)
    scaled = np.asarray(image, dtype=np.float32) / 255
    return scaled[:, ::-1] if rng.random() < 0.5 else scaled


def _lay(canvas: np.ndarray, grey: np.ndarray, alpha: np.ndarray, tint: np.ndarray, x: int, y: int) -> None:
    """Blend ``grey`` (h, w) coloured by ``tint`` (3,) over ``canvas`` at (x, y) with opacity ``alpha``; what falls outside is cut off."""
    h, w = grey.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, canvas.shape[1]), min(y + h, canvas.shape[0])
    if x1 <= x0 or y1 <= y0:
        return
    inside = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
    region = canvas[y0:y1, x0:x1]
    region += alpha[inside][..., None] * (grey[inside][..., None] * tint - region)


def _clutter(canvas: np.ndarray, rng: np.random.Generator, images: np.ndarray, pool: np.ndarray, count: int, opacity: tuple[float, float]) -> list[int]:
    """Lay ``count`` fragments of ``pool``'s images (a 10-20 px crop, turned, rescaled) over ``canvas``; the indices used."""
    size = canvas.shape[0]
    used = []
    for _ in range(count):
        index = int(pool[rng.integers(len(pool))])
        crop = int(rng.integers(10, 21))
        cx, cy = rng.integers(0, images.shape[2] - crop + 1), rng.integers(0, images.shape[1] - crop + 1)
        piece = np.rot90(images[index, cy:cy + crop, cx:cx + crop], int(rng.integers(4)))
        side = int(rng.integers(size // 10, size // 2 + 1))
        grey = _scaled(piece, side, rng)
        alpha = rng.uniform(*opacity) * np.minimum(grey / ITEM_EDGE, 1)
        x, y = (int(v) for v in rng.integers(-side // 2, size - side // 2, size=2))
        _lay(canvas, rng.uniform(0.3, 1.0) * grey, alpha, 1 + rng.uniform(-0.2, 0.2, 3), x, y)
        used.append(index)
    return used


def _fashion_scene(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, sources: np.ndarray, pool: np.ndarray, size: int,
                   sides: tuple[int, int]) -> tuple[Scene, list[int]]:
    """The items ``sources`` on a cluttered background made from ``pool``; the scene and the clutter indices it used.

    Background: an unevenly lit grey with 8-16 fragments of other garments, some opaque; items: opaque, of random
    contrast, brightness and tint, placed where they cover at most ``ITEM_OVERLAP`` of another; then 0-2 faint
    fragments over everything and sensor noise. An item that finds no such place in 20 tries is left out.
    """
    light = np.asarray(Image.fromarray(rng.uniform(-0.1, 0.1, (4, 4)).astype(np.float32)).resize((size, size), Image.BILINEAR))
    canvas = (rng.uniform(0.1, 0.5) + light)[..., None] * (1 + rng.uniform(-0.1, 0.1, 3)).astype(np.float32)
    used = _clutter(canvas, rng, images, pool, int(rng.integers(8, 17)), (0.3, 1.0))
    objects, segmentations, placed = [], [], []
    for index in sources:
        side = int(rng.integers(sides[0], sides[1] + 1))
        grey = _scaled(images[index], side, rng)
        alpha = np.minimum(grey / ITEM_EDGE, 1)
        rows, cols = np.nonzero(alpha >= 0.5)
        if len(rows) == 0:
            continue
        for _ in range(20):
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            box = (x + int(cols.min()), y + int(rows.min()), x + int(cols.max()) + 1, y + int(rows.max()) + 1)
            if all(_covered(box, other) <= ITEM_OVERLAP for _, *other in objects):
                break
        else:
            continue
        _lay(canvas, rng.uniform(0.0, 0.25) + rng.uniform(0.5, 1.0) * grey, alpha, 1 + rng.uniform(-0.2, 0.2, 3), x, y)
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[y:y + side, x:x + side] = alpha >= 0.5
        rle = mask_utils.encode(np.asfortranarray(mask))
        objects.append((int(labels[index]), *box))
        segmentations.append({"size": rle["size"], "counts": rle["counts"].decode("ascii")})
        placed.append(int(index))
    used += _clutter(canvas, rng, images, pool, int(rng.integers(0, 3)), (0.15, 0.35))
    canvas += rng.normal(0, rng.uniform(0.01, 0.04), canvas.shape).astype(np.float32)
    image = Image.fromarray(np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8))
    return Scene(image, objects, segmentations, placed), used


def _covered(box: tuple[int, int, int, int], other: Sequence[int]) -> float:
    """The share of the smaller of two xyxy boxes that lies in both."""
    w = min(box[2], other[2]) - max(box[0], other[0])
    h = min(box[3], other[3]) - max(box[1], other[1])
    smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
    return max(w, 0) * max(h, 0) / smaller


def write_fashion_scenes(root: str | Path, train_images: int = 400, test_images: int = 100, size: int = 128, seed: int = 0,
                         items: tuple[int, int] = (1, 4), item_scale: tuple[float, float] = (0.19, 0.5)) -> tuple[Path, Path]:
    """Fashion-MNIST garments on clutter cut from other garments, in both layouts: a detection set where the backbone matters.

    On ``write_synthetic``'s coloured shapes a random-init backbone learns the three classes within the detector's own
    training; here the ten classes are Fashion-MNIST's (shirt, T-shirt, pullover and coat differ in detail only) and
    the background is made of the same kind of pixels, so features learned before detection count. Each image holds
    ``items`` (min, max) garments, their 28 px frames scaled to ``item_scale`` (min, max) of ``size``; a box is the tight
    box of its item's visible pixels, its COCO segmentation that mask. Train scenes take items and clutter from
    Fashion-MNIST's train split, test scenes from its test split, so no image is in both; in a split each item is used
    once and clutter comes from the images not used as items. ``root/manifest.json`` records every index used.
    VOC2007 trainval / test in ``root/VOCdevkit`` (PNG, ``classes.txt``), train2017 / val2017 in ``root/coco``.
    Returns ``(VOCdevkit folder, COCO folder)``.
    """
    root = Path(root)
    if not 1 <= items[0] <= items[1]:
        raise SeedError(f"items (min, max) must satisfy 1 <= min <= max, got {items}")
    sides = (max(8, round(item_scale[0] * size)), min(size, round(item_scale[1] * size)))
    if sides[0] > sides[1]:
        raise SeedError(f"item_scale {item_scale} gives no item side between 8 and {size} px")
    plan, manifest = [], {"seed": seed, "size": size, "items": list(items), "item_sides": list(sides), "classes": FASHION_MNIST_CLASSES, "splits": {}}
    for number, (image_set, coco_split, split, count) in enumerate((("trainval", "train2017", "train", train_images), ("test", "val2017", "val", test_images))):
        dataset = load_dataset("fashion-mnist", split)
        images, labels = dataset.images, np.asarray(dataset.targets)
        rng = np.random.default_rng([seed, number])
        per_scene = rng.integers(items[0], items[1] + 1, size=count)
        order = rng.permutation(len(images))
        if per_scene.sum() >= len(images):
            raise SeedError(f"{count} {split} scenes draw {per_scene.sum()} items from Fashion-MNIST's {len(images)} {split} images, "
                            "leaving none for clutter; make fewer scenes")
        pool = order[per_scene.sum():]
        starts = np.concatenate([[0], np.cumsum(per_scene)])
        scenes, clutter = [], set()
        for start, end in zip(starts[:-1], starts[1:], strict=True):
            scene, used = _fashion_scene(rng, images, labels, order[start:end], pool, size, sides)
            scenes.append(scene)
            clutter.update(used)
        plan.append(("2007", image_set, coco_split, scenes))
        manifest["splits"][image_set] = {"fashion_mnist_split": split, "items": sorted(i for s in scenes for i in s.sources),
                                         "clutter": sorted(clutter)}
    names = _write_scenes(root, plan, FASHION_MNIST_CLASSES, list(range(1, len(FASHION_MNIST_CLASSES) + 1)), 0, "png")
    manifest["images"] = {name: scene.sources for (*_, scenes), split_names in zip(plan, names, strict=True)
                          for name, scene in zip(split_names, scenes, strict=True)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "VOCdevkit", root / "coco"
