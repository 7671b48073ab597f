"""Generated detection sets written in both real layouts (VOCdevkit XML and COCO JSON), for the tests and the benchmarks.

Coloured shapes on noise (``write_synthetic``: the tests, the suite's detection benchmark) and Fashion-MNIST
garments pasted at several scales on clutter cut from other garments (``write_fashion_scenes``: a set where the
pretrained backbone matters). They are read back by the same readers as real data (``downstream.detection.data``).
"""

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from downstream.detection.data import VOC_CLASS_FILE, VOC_CLASSES, decode_mask
from seed.data import FASHION_MNIST_CLASSES, load_dataset
from seed.errors import SeedError


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
