"""The generated detection sets (downstream.detection.scenes): Fashion-MNIST garments pasted on clutter, read back alike
from their VOC and COCO copies, each box holding its garment, train and test disjoint, a function of the seed."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from downstream.detection.data import decode_mask, read_coco, read_voc
from downstream.detection.scenes import write_fashion_scenes
from seed.data import FASHION_MNIST_CLASSES, FASHION_MNIST_SYSTEM, load_dataset
from seed.errors import SeedError
from tests.conftest import garment_fashion_mnist


@pytest.fixture(scope="module")
def fashion_data(tmp_path_factory):
    """$SEED_DATA with a Fashion-MNIST stand-in (40 train / 30 test two-tone blocks) while this module runs."""
    root = tmp_path_factory.mktemp("seed-data")
    garment_fashion_mnist(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEED_DATA", str(root))
        yield root


@pytest.fixture(scope="module")
def fashion(fashion_data, tmp_path_factory) -> tuple[Path, Path]:
    return write_fashion_scenes(tmp_path_factory.mktemp("fashion-scenes"), train_images=6, test_images=3, size=64, seed=0)


def check_items_in_their_boxes(voc: Path, coco: Path) -> list[float]:
    """Every object of the COCO copy: its label is its Fashion-MNIST source's, its mask lies in its box and touches all four
    sides; and where no later item covers it, the scene inside the box (its antialiased rim left out) correlates with the
    source garment, tightly cropped and scaled to the box, or mirrored. Returns those correlations."""
    manifest = json.loads((voc.parent / "manifest.json").read_text())
    data = read_coco(coco)
    correlations = []
    for records, image_set in ((data.train, "trainval"), (data.test, "test")):
        source = load_dataset("fashion-mnist", manifest["splits"][image_set]["fashion_mnist_split"])
        for record in records:
            indices = manifest["images"][record.file.stem]
            assert record.labels.tolist() == [source.targets[i] + 1 for i in indices]
            scene = np.asarray(Image.open(record.file).convert("L"), dtype=np.float32)
            boxes = record.boxes.astype(int).tolist()
            for n, ((x1, y1, x2, y2), segmentation, index) in enumerate(zip(boxes, record.segmentations, indices, strict=True)):
                mask = decode_mask(segmentation, record.height, record.width)
                assert mask.sum() == mask[y1:y2, x1:x2].sum() > 0
                assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any() and mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()
                if any(a < x2 and x1 < c and b < y2 and y1 < d for a, b, c, d in boxes[n + 1:]):
                    continue
                item = source.images[index]
                rows, cols = np.nonzero(item > 12)
                tight = Image.fromarray(np.ascontiguousarray(item[rows.min():rows.max() + 1, cols.min():cols.max() + 1]))
                expected = np.asarray(tight.resize((x2 - x1, y2 - y1), Image.BILINEAR), dtype=np.float32)[1:-1, 1:-1]
                seen = scene[y1 + 1:y2 - 1, x1 + 1:x2 - 1].ravel()
                correlations.append(max(np.corrcoef(seen, e.ravel())[0, 1] for e in (expected, expected[:, ::-1])))
    return correlations


def test_fashion_scenes_read_back_alike_from_voc_and_coco(fashion):
    voc, coco = read_voc(fashion[0]), read_coco(fashion[1])
    assert voc.classes == coco.classes == FASHION_MNIST_CLASSES and coco.category_ids == list(range(1, 11))
    assert (fashion[0] / "classes.txt").read_text().splitlines() == FASHION_MNIST_CLASSES
    assert voc.description == "VOC2007 trainval (6 images) / VOC2007 test (3 images)"
    assert (len(coco.train), len(coco.test)) == (6, 3)
    twins = {r.file.name: r for r in voc.train + voc.test}
    for record in coco.train + coco.test:
        twin = twins[record.file.name]
        assert record.file.suffix == ".png" and record.file.read_bytes() == twin.file.read_bytes()
        np.testing.assert_array_equal(record.boxes, twin.boxes)
        assert record.labels.tolist() == twin.labels.tolist() and not twin.difficult.any()
        assert 1 <= len(record.boxes) <= 4 and (record.boxes[:, 2:] > record.boxes[:, :2]).all()
        assert record.boxes.min() >= 0 and record.boxes.max() <= 64 and (record.width, record.height) == (64, 64)


def test_each_fashion_box_holds_its_pasted_garment(fashion):
    correlations = check_items_in_their_boxes(*fashion)
    assert len(correlations) >= 10 and min(correlations) > 0.5


def test_fashion_train_and_test_scenes_share_no_image(fashion):
    """Train scenes come from Fashion-MNIST's train split and test scenes from its test split; in each, items are used once and
    the clutter is cut from other images."""
    manifest = json.loads((fashion[0].parent / "manifest.json").read_text())
    train, test = manifest["splits"]["trainval"], manifest["splits"]["test"]
    assert (train["fashion_mnist_split"], test["fashion_mnist_split"]) == ("train", "val")
    for split in (train, test):
        assert split["clutter"] and len(split["items"]) == len(set(split["items"])) and not set(split["items"]) & set(split["clutter"])
    data = read_voc(fashion[0])
    for records, split in ((data.train, train), (data.test, test)):
        assert sorted(i for r in records for i in manifest["images"][r.file.stem]) == split["items"]


def test_fashion_scenes_are_a_function_of_the_seed(fashion, tmp_path):
    def files(root: Path) -> dict[Path, bytes]:
        return {path.relative_to(root): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}

    written = files(fashion[0].parent)
    assert files(write_fashion_scenes(tmp_path / "again", train_images=6, test_images=3, size=64, seed=0)[0].parent) == written
    assert files(write_fashion_scenes(tmp_path / "other", train_images=6, test_images=3, size=64, seed=1)[0].parent) != written
    more_tests = files(write_fashion_scenes(tmp_path / "more", train_images=6, test_images=5, size=64, seed=0)[0].parent)
    train = [name for name in written if "train2017" in str(name) or "trainval" in str(name)]
    assert train and all(more_tests[name] == written[name] for name in train)  # the train scenes do not depend on the test count


def test_too_many_fashion_scenes_is_a_one_line_error(fashion_data, tmp_path):
    with pytest.raises(SeedError, match="leaving none for clutter; make fewer scenes"):
        write_fashion_scenes(tmp_path, train_images=10, test_images=1, size=64, items=(4, 4))


@pytest.mark.skipif(not (FASHION_MNIST_SYSTEM / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_fashion_scenes_from_the_real_dataset(tmp_path, monkeypatch):
    monkeypatch.delenv("SEED_DATA", raising=False)
    voc, coco = write_fashion_scenes(tmp_path, train_images=30, test_images=15, size=128, seed=0)
    correlations = check_items_in_their_boxes(voc, coco)  # real garments: some are nearly flat, their tint and noise decide
    assert len(correlations) >= 50 and np.median(correlations) > 0.6
    assert len(read_voc(voc).train) == 30
