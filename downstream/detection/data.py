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

Generated sets in both layouts, for the tests and the benchmarks, are in
``downstream.detection.scenes``.
"""

import contextlib
import dataclasses
import io
import json
import random
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

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
