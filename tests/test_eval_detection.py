"""seed-eval detection: VOC/COCO readers, VOC07 metric, detectron2 conversion, torchvision runs (through the engine) on synthetic data."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from downstream import report
from downstream.common import Checkpoint, EvalConfig, file_sha256, write_results
from downstream.detection import config as flags
from downstream.detection import d2, models, run, train
from downstream.detection import metrics as scores
from downstream.detection.data import VOC_CLASSES, DetectionDataset, decode_mask, read_coco, read_voc, read_voc_xml
from downstream.detection.scenes import SYNTHETIC, write_fashion_scenes, write_synthetic
from seed.backbones import available, create_backbone
from seed.checkpoints import export_model, load_file
from seed.config import make_config
from seed.data import FASHION_MNIST_CLASSES, FASHION_MNIST_SYSTEM, load_dataset
from seed.errors import SeedError
from tests.conftest import garment_fashion_mnist
from tests.test_reliability import _assert_identical

HAS_DETECTRON2 = flags.detectron2_state() == "ready"


def non_resnets() -> list[str]:
    """Every registry backbone without ResNet stages, found by building each on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return [name for name in available() if not models.is_resnet(create_backbone(name))]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    return write_synthetic(tmp_path_factory.mktemp("detection-data"), train_images=12, test_images=4, size=64, seed=1)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("detection-ckpt") / "student.pt"
    export_model(path, "r18", create_backbone("r18"), None, None, "seed", {}, False)
    return path


@pytest.fixture(scope="module")
def mobile_student(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("detection-mbv3s") / "student.pt"
    export_model(path, "mbv3s", create_backbone("mbv3s"), None, None, "seed", {}, False)
    return path


def tiny_run(checkpoint: Path, voc: Path, out: Path, *extra: str) -> list[str]:
    """The flags of a seconds-long torchvision run on the synthetic VOC set (12 train images: 6 iterations an epoch)."""
    return ["--checkpoint", str(checkpoint), "--data", str(voc), "--engine", "torchvision", "--accelerator", "cpu", "--image-size", "64",
            "--batch-size", "2", "--num-workers", "0", "--roi-per-image", "16", "--max-eval-images", "2", "--output", str(out), *extra]


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """``downstream.run.main`` in-process: (exit code, stdout, stderr)."""
    code = 0
    try:
        run.main(args)
    except SystemExit as stop:
        code = int(stop.code)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- readers


def test_voc_xml_reader_keeps_difficult_and_shifts_to_continuous_coordinates(tmp_path):
    xml = tmp_path / "000005.xml"
    xml.write_text("""<annotation><filename>000005.jpg</filename><size><width>500</width><height>375</height><depth>3</depth></size>
        <object><name>chair</name><difficult>0</difficult><bndbox><xmin>263</xmin><ymin>211</ymin><xmax>324</xmax><ymax>339</ymax></bndbox></object>
        <object><name>dog</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>500</xmax><ymax>375</ymax></bndbox></object>
        </annotation>""")
    record = read_voc_xml(xml, 7, tmp_path / "JPEGImages")
    assert (record.image_id, record.width, record.height) == (7, 500, 375)
    assert record.file == tmp_path / "JPEGImages" / "000005.jpg"
    np.testing.assert_array_equal(record.boxes, [[262, 210, 324, 339], [0, 0, 500, 375]])
    assert record.labels.tolist() == [VOC_CLASSES.index("chair") + 1, VOC_CLASSES.index("dog") + 1] == [9, 12]
    assert record.labels.dtype == np.int64 and record.difficult.tolist() == [False, True]


def test_voc_reader_uses_07_12_trainval_and_07_test(synthetic):
    data = read_voc(synthetic[0])
    assert len(data.train) == 12 and len(data.test) == 4
    assert data.description.startswith("VOC2007 trainval + VOC2012 trainval (12 images) / VOC2007 test (4 images)")
    assert sum("VOC2012" in str(r.file) for r in data.train) == 4
    assert data.classes == list(VOC_CLASSES) and data.category_ids == list(range(1, 21))
    used = {VOC_CLASSES.index(name) + 1 for name, *_ in SYNTHETIC}
    for record in data.train + data.test:
        assert record.file.is_file() and len(record.boxes) >= 1
        assert set(record.labels.tolist()) <= used
        assert (record.boxes[:, 2:] > record.boxes[:, :2]).all() and record.boxes.min() >= 0 and record.boxes.max() <= 64
    assert read_voc(synthetic[0].parent).description == data.description  # the VOCdevkit's parent works too
    truth = data.ground_truth()
    objects = sum(len(r.boxes) for r in data.test)
    assert len(truth.anns) == objects and len(truth.imgs) == 4
    assert sum(a["iscrowd"] for a in truth.anns.values()) == sum(int(r.difficult.sum()) for r in data.test)


def test_voc_reader_falls_back_to_the_years_it_finds(synthetic, tmp_path):
    only_2012 = tmp_path / "VOCdevkit" / "VOC2012"
    only_2012.mkdir(parents=True)
    (only_2012 / "Annotations").symlink_to(synthetic[0] / "VOC2012" / "Annotations")
    (only_2012 / "JPEGImages").symlink_to(synthetic[0] / "VOC2012" / "JPEGImages")
    ids = (synthetic[0] / "VOC2012" / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    (only_2012 / "ImageSets" / "Main").mkdir(parents=True)
    (only_2012 / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids[:3]))
    (only_2012 / "ImageSets" / "Main" / "val.txt").write_text(ids[3])
    data = read_voc(tmp_path)
    assert (len(data.train), len(data.test)) == (3, 1)
    assert data.description.startswith("VOC2012 train (3 images) / VOC2012 val (1 images)")


def test_coco_reader_matches_the_voc_copy(synthetic):
    voc, coco = read_voc(synthetic[0]), read_coco(synthetic[1])
    assert coco.category_ids == [1, 3, 18] and coco.classes == ["person", "car", "dog"]
    assert (len(coco.train), len(coco.test)) == (12, 4)
    voc_by_name = {r.file.name: r for r in voc.train + voc.test}
    for record in coco.train + coco.test:
        twin = voc_by_name[record.file.name]
        np.testing.assert_allclose(record.boxes, twin.boxes)
        assert [coco.classes[label - 1] for label in record.labels] == [VOC_CLASSES[label - 1] for label in twin.labels]
    image, target = DetectionDataset(coco.train, masks=True)[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    masks = target["masks"]
    assert masks.shape == (len(target["boxes"]), 64, 64) and masks.dtype == torch.uint8
    for mask, (x1, y1, x2, y2) in zip(masks, target["boxes"].round().int().tolist(), strict=True):
        assert mask.sum() > 0 and mask[y1:y2, x1:x2].sum() == mask.sum()  # every mask lies in its box


def test_training_flip_moves_boxes_with_the_image(synthetic):
    dataset = DetectionDataset(read_voc(synthetic[0]).train, train=True)
    plain_image, plain = DetectionDataset(dataset.records)[0]
    flipped = next(sample for sample in (dataset[0] for _ in range(64)) if not torch.equal(sample[0], plain_image))
    assert torch.equal(flipped[0], plain_image.flip(-1))
    boxes = plain["boxes"]
    torch.testing.assert_close(flipped[1]["boxes"], torch.stack([64 - boxes[:, 2], boxes[:, 1], 64 - boxes[:, 0], boxes[:, 3]], 1))


# ---------------------------------------------------------------- fashion scenes


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


# ---------------------------------------------------------------- metric and schedule


def test_voc07_ap_on_a_hand_checked_example():
    """Class 1: image 1 has box A and a difficult box B, image 2 has box C (2 positives).

    By score: A (TP), A again (FP, taken), B (difficult: ignored), far away (FP),
    C shifted by one pixel (IoU 90/110 = 0.82, TP). Recall .5 .5 .5 .5 1,
    precision 1 .5 .5 1/3 .5: the 11-point AP is (6 x 1 + 5 x 0.5) / 11.
    """
    truth = {1: (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=float), np.array([False, True])),
             2: (np.array([[0, 0, 10, 10]], dtype=float), np.array([False]))}
    detections = [(1, 0.9, np.array([0, 0, 10, 10.])), (1, 0.8, np.array([0, 0, 10, 10.])), (1, 0.7, np.array([20, 20, 30, 30.])),
                  (2, 0.6, np.array([50, 50, 60, 60.])), (2, 0.5, np.array([1, 0, 11, 10.]))]
    assert scores.voc_class_ap(detections, truth, 0.5) == pytest.approx(8.5 / 11)
    assert scores.voc_class_ap(detections, truth, 0.85) == pytest.approx(6 / 11)  # C is missed: recall stays .5
    assert scores.voc_class_ap([], truth, 0.5) == 0.0
    assert scores.voc_class_ap(detections, {1: (np.zeros((1, 4)), np.array([True]))}) is None  # only difficult: no AP

    class Record:  # what voc_metrics reads of a record
        def __init__(self, image_id, boxes, labels, difficult):
            self.image_id, self.boxes, self.labels, self.difficult = image_id, np.array(boxes, float), np.array(labels), np.array(difficult)

    records = [Record(1, [[0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 9, 9]], [1, 1, 2], [False, True, False]), Record(2, [[0, 0, 10, 10]], [1], [False])]
    by_image = {}
    for image, score, box in detections:
        by_image.setdefault(image, []).append((box, score, 1))
    by_image[1].append((np.array([5, 5, 9, 9.]), 0.3, 2))  # class 2: one perfect detection, AP 1
    predictions = [{"image_id": i, "boxes": np.array([b for b, _, _ in d]), "scores": np.array([s for _, s, _ in d]),
                    "labels": np.array([lab for _, _, lab in d])} for i, d in by_image.items()]
    metrics = scores.voc_metrics(predictions, records, num_classes=20)  # classes without objects do not count
    assert metrics["VOC07_AP50"] == pytest.approx(100 * (8.5 / 11 + 1) / 2)


def test_voc07_ap_interpolates_at_eleven_recall_points():
    recall, precision = np.array([0.2, 0.4, 0.4, 0.8]), np.array([1.0, 0.5, 0.75, 0.4])
    # t = 0, .1, .2 -> 1; t = .3, .4 -> .75; t = .5 ... .8 -> .4; t = .9, 1 -> 0
    assert scores.voc07_ap(recall, precision) == pytest.approx((3 * 1 + 2 * 0.75 + 4 * 0.4) / 11)


def test_learning_rate_schedule_is_detectron2s():
    steps = [18000, 22000]
    assert train.lr_factor(0, steps, 100) == pytest.approx(0.001)
    assert train.lr_factor(50, steps, 100) == pytest.approx(0.001 * 0.5 + 0.5)
    assert [train.lr_factor(i, steps, 100) for i in (100, 17999, 18000, 22000)] == pytest.approx([1, 1, 0.1, 0.01])
    config = flags.resolve_config(flags.DetectionConfig(checkpoint="x"))
    plan = flags.schedule(config)
    assert (plan["max_iter"], plan["steps"], plan["train_sizes"][0], plan["test_size"]) == (24000, [18000, 22000], 480, 800)
    coco = flags.schedule(flags.resolve_config(flags.DetectionConfig(checkpoint="x", dataset="coco", max_iter=900)))
    assert coco["steps"] == [600, 800] and coco["train_sizes"][0] == 640


# ---------------------------------------------------------------- detectron2


def test_detectron2_conversion_follows_mocos_names():
    r18 = d2.to_detectron2(create_backbone("r18").state_dict())
    assert {"stem.conv1.weight", "stem.conv1.norm.weight", "stem.conv1.norm.bias", "stem.conv1.norm.running_mean", "stem.conv1.norm.running_var",
            "res2.0.conv1.weight", "res2.0.conv1.norm.weight", "res2.1.conv2.norm.running_var", "res3.0.shortcut.weight",
            "res3.0.shortcut.norm.running_mean", "res5.1.conv2.weight"} <= set(r18)
    assert not any(k.startswith(("backbone.", "fc", "layer")) or "bn" in k or "downsample" in k or "num_batches" in k for k in r18)
    assert not any(".conv3." in k for k in r18) and "res2.0.shortcut.weight" not in r18  # basic blocks; res2 keeps 64 channels
    assert len(r18) == 20 * 5  # 20 convs (stem, 16 in blocks, 3 shortcuts), each with 4 norm tensors
    assert r18["res2.0.conv1.weight"].shape == (64, 64, 3, 3) and isinstance(r18["res2.0.conv1.weight"], np.ndarray)

    state = create_backbone("r50").state_dict()
    r50 = d2.to_detectron2(state)
    assert {"res2.0.conv3.norm.weight", "res2.0.shortcut.weight", "res2.0.shortcut.norm.running_var", "res4.5.conv2.weight",
            "res5.2.conv3.norm.bias"} <= set(r50)
    np.testing.assert_array_equal(r50["res5.0.shortcut.norm.running_mean"], state["layer4.0.downsample.1.running_mean"].numpy())
    assert len(r50) == len([k for k in state if not k.endswith("num_batches_tracked")])


def test_detectron2_conversion_and_config_for_small_resnets(tmp_path):
    path = d2.write_detectron2_weights(create_backbone("r34").state_dict(), tmp_path / "r34.pkl")
    import pickle

    with open(path, "rb") as handle:
        content = pickle.load(handle)
    assert content["__author__"] == "seed" and content["matching_heuristics"] is True and "res5.2.conv2.norm.weight" in content["model"]
    config = flags.resolve_config(flags.DetectionConfig(checkpoint="x", dataset="voc"))
    overrides = d2.detectron2_overrides(config, flags.schedule(config), 34, 20, str(path), ("train", "test"), str(tmp_path), "cpu")
    values = dict(zip(overrides[::2], overrides[1::2], strict=True))
    assert values["MODEL.RESNETS.DEPTH"] == 34 and values["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 64
    assert values["MODEL.RESNETS.NORM"] == "SyncBN" and values["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    assert (values["SOLVER.MAX_ITER"], values["SOLVER.STEPS"], values["SOLVER.BASE_LR"], values["SOLVER.IMS_PER_BATCH"]) == (24000, (18000, 22000), 0.02, 16)
    assert values["MODEL.ROI_HEADS.NUM_CLASSES"] == 20 and values["MODEL.MASK_ON"] is False and values["INPUT.MIN_SIZE_TEST"] == 800
    with pytest.raises(Exception, match="not a ResNet parameter"):
        d2.to_detectron2(create_backbone("mbv3s").state_dict())


def test_a_detectron2_without_its_compiled_ops_is_never_picked(monkeypatch):
    """PyPI's detectron2-cdo 0.5 installs without detectron2._C (its archive holds no C++ sources) and its models then fail
    to import: auto falls back to torchvision, and --engine detectron2 says why in one line."""
    found = {"detectron2": object(), "detectron2._C": None}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: found.get(name))
    assert flags.detectron2_state() == "no-ops" and flags.select_engine("auto") == "torchvision"
    with pytest.raises(SeedError, match="this detectron2 has no compiled ops"):
        flags.select_engine("detectron2")
    found["detectron2._C"] = object()
    assert flags.select_engine("auto") == "detectron2"


@pytest.mark.skipif(not HAS_DETECTRON2, reason="detectron2 with its compiled ops is not installed (not on PyPI; detectron2-cdo 0.5 lacks them)")
def test_detectron2_engine_trains_and_scores(synthetic, student, tmp_path, capsys):
    code, printed, err = run_main(["--checkpoint", str(student), "--data", str(synthetic[0]), "--engine", "detectron2", "--accelerator", "cpu",
                          "--image-size", "64", "--max-iter", "2", "--batch-size", "2", "--num-workers", "0", "--output", str(tmp_path)], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["engine"] == "detectron2" and 0 <= results["metrics"]["VOC07_AP50"] <= 100


@pytest.mark.skipif(HAS_DETECTRON2, reason="detectron2 is installed with its compiled ops")
def test_detectron2_engine_without_detectron2_is_a_one_line_error(synthetic, student, capsys):
    code, printed, err = run_main(["--checkpoint", str(student), "--data", str(synthetic[0]), "--engine", "detectron2"], capsys)
    said = "detectron2 is not installed" if flags.detectron2_state() == "missing" else "this detectron2 has no compiled ops"
    assert code == 2 and err.count("\n") == 1 and said in err and "--engine torchvision" in err


# ---------------------------------------------------------------- torchvision engine


def test_torchvision_voc_fpn_run_writes_results(synthetic, student, tmp_path, capsys):
    out = tmp_path / "runs" / "detection"
    code, printed, err = run_main(["--checkpoint", str(student), "--data", str(synthetic[0]), "--engine", "torchvision", "--head", "fpn",
                          "--image-size", "64", "--max-iter", "2", "--batch-size", "2", "--num-workers", "0",
                          "--max-eval-images", "3", "--output", str(out)], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    assert results["protocol"] == "detection" and results["primary"] == "VOC07_AP50" and results["data"] == str(synthetic[0])
    assert settings["engine"] == "torchvision" and settings["iterations"] == 2 and settings["test_images"] == 3
    assert results["checkpoint"] == {"path": str(student), "sha256": file_sha256(student), "arch": "r18", "format": "seed export (seed)"}
    assert set(results["metrics"]) == {"AP", "AP50", "AP75", "VOC07_AP50", "VOC07_AP75", "VOC07_AP"}
    assert settings["model"] == "Faster R-CNN FPN" and settings["max_iter"] == 2
    assert settings["splits"].startswith("VOC2007 trainval + VOC2012 trainval")
    assert (out / "config.yaml").is_file() and load_file(out / "last.ckpt")["global_step"] == 2 and (out / "logs" / "metrics.csv").is_file()
    assert f"run folder: {out} (results.json, config.yaml, last.ckpt, logs/)" in printed
    assert "AP50 (VOC07 11-point)" in printed and "AP (COCO, IoU .50:.95)" in printed

    # seed-eval report over this run beside a knn and a linear result, all written by the one writer
    checkpoint = Checkpoint(student, file_sha256(student), "r18", "ours", create_backbone("r18"))
    config = EvalConfig(checkpoint=str(student), data="digits", image_size=16)
    write_results(tmp_path / "runs" / "knn", "knn", {"top1_k200": 81.25, "top1_k20": 83.5}, "top1_k200", config, checkpoint, {}, 1.0)
    write_results(tmp_path / "runs" / "linear", "linear", {"top1": 90.125, "top5": 99.0}, "top1", config, checkpoint, {}, 1.0)
    report.main([str(tmp_path / "runs"), "--png", str(tmp_path / "chart.png")])
    lines = capsys.readouterr().out.splitlines()
    label = f"student.pt ({file_sha256(student)[:8]})"
    assert lines[2:] == [f"| detection | detection | VOC07_AP50 | {results['metrics']['VOC07_AP50']:.2f} | {label} | {synthetic[0]} |",
                         f"| knn | knn | top1_k200 | 81.25 | {label} | digits |",
                         f"| linear | linear | top1 | 90.12 | {label} | digits |"]
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_undefined_detection_metrics_as_n_a(student, tmp_path, capsys):
    """A COCO run whose test images hold no object has no AP (null); a detection file of the old layout is still read."""
    checkpoint = Checkpoint(student, "f" * 64, "r18", "ours", create_backbone("r18"))
    config = flags.DetectionConfig(checkpoint=str(student), dataset="coco", data="coco-dir")
    written = write_results(tmp_path / "coco", "detection", {"AP": float("nan"), "AP50": None, "AP75": 12.5}, "AP", config, checkpoint, {}, 1.0)
    assert written["metrics"] == {"AP": None, "AP50": None, "AP75": 12.5}
    assert json.loads((tmp_path / "coco" / "results.json").read_text())["metrics"]["AP"] is None
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps({"protocol": "detection", "checkpoint": "/x/student.pt", "checkpoint_sha256": "ab" * 32,
                                                                "data": "VOC2007 ...", "metrics": {"AP": 50.0, "VOC07_AP50": 80.5}}))
    report.main([str(tmp_path), "--all-metrics"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == ["| coco | detection | AP | n/a | student.pt (ffffffff) | coco-dir |",
                         "| coco | detection | AP50 | n/a | student.pt (ffffffff) | coco-dir |",
                         "| coco | detection | AP75 | 12.50 | student.pt (ffffffff) | coco-dir |",
                         "| old | detection | AP | 50.00 | student.pt (abababab) | VOC2007 ... |",
                         "| old | detection | VOC07_AP50 | 80.50 | student.pt (abababab) | VOC2007 ... |"]
    assert (tmp_path / "report.png").is_file()


def test_torchvision_coco_mask_rcnn_c4_run(synthetic, student, tmp_path, capsys):
    out = tmp_path / "run"
    code, printed, err = run_main(["--checkpoint", str(student), "--dataset", "coco", "--data", str(synthetic[1]), "--engine", "torchvision",
                          "--image-size", "64", "--max-iter", "1", "--batch-size", "2", "--num-workers", "0", "--roi-per-image", "16",
                          "--max-eval-images", "2", "--output", str(out)], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["model"] == "Mask R-CNN C4" and results["settings"]["masks"] is True and results["primary"] == "AP"
    assert set(results["metrics"]) == {"AP", "AP50", "AP75", "mask_AP", "mask_AP50", "mask_AP75"}  # no VOC07 metric on COCO
    assert all(0 <= value <= 100 for value in results["metrics"].values())


def perfect(records) -> list[dict]:
    """Every non-difficult ground-truth box found once, with distinct scores."""
    found = []
    for record in records:
        keep = ~record.difficult
        found.append({"image_id": record.image_id, "boxes": record.boxes[keep].astype(np.float32),
                      "scores": np.linspace(0.9, 0.5, int(keep.sum()), dtype=np.float32), "labels": record.labels[keep]})
    return found


def test_metrics_of_perfect_predictions_are_100_and_of_one_miss_the_hand_computed_value(synthetic):
    """The synthetic VOC test split: person (15) 7 boxes on 3 images, dog (12) 1 box on image 12 and 1 (+1 difficult) on image 13.

    Perfect detections: every AP is 100. Without the dog of image 12, dog recall stops at 1/2 at precision 1
    and person stays perfect. VOC07 11-point: the dog scores at t = 0, .1, ..., .5, so 6/11, and the mAP is
    (1 + 6/11) / 2. COCOeval's 101 recall points: 0, .01, ..., .50 are reached, 51/101, at every IoU
    threshold (the boxes are exact), so AP = AP50 = AP75 = (1 + 51/101) / 2.
    """
    data = read_voc(synthetic[0])
    test = data.test
    assert [(r.image_id, r.labels.tolist(), r.difficult.tolist()) for r in test] == [
        (12, [15, 15, 12], [False] * 3), (13, [12, 12], [True, False]), (14, [15], [False]), (15, [15] * 3, [False] * 3)]
    metrics = scores.evaluate_predictions(perfect(test), data, test, masks=False)
    assert metrics == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0, "VOC07_AP50": 100.0, "VOC07_AP75": 100.0, "VOC07_AP": 100.0}

    missed = perfect(test)
    first = missed[0]
    keep = first["labels"] != 12
    missed[0] = {"image_id": first["image_id"], "boxes": first["boxes"][keep], "scores": first["scores"][keep], "labels": first["labels"][keep]}
    metrics = scores.evaluate_predictions(missed, data, test, masks=False)
    voc, coco = 100 * (1 + 6 / 11) / 2, 100 * (1 + 51 / 101) / 2
    assert metrics == pytest.approx({"AP": coco, "AP50": coco, "AP75": coco, "VOC07_AP50": voc, "VOC07_AP75": voc, "VOC07_AP": voc}, abs=1e-9)
    assert round(voc, 2) == 77.27 and round(coco, 2) == 75.25


def test_detector_on_a_non_resnet_uses_its_last_feature_map():
    plan = flags.schedule(flags.resolve_config(flags.DetectionConfig(checkpoint="x", image_size=64, max_iter=1)))
    model = models.build_detector(create_backbone("mbv3s"), 4, "c4", False, plan, roi_per_image=8)
    image = torch.rand(3, 64, 64)
    losses = model([image], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([2])}])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert model.roi_heads.box_roi_pool.scales == [1 / 32]  # the true stride, not a guess from the first 64-px image (1/16)
    c4 = models.build_detector(create_backbone("r18"), 4, "c4", True, plan)
    assert c4.roi_heads.mask_head is c4.roi_heads.box_head[0]  # Mask R-CNN C4 shares res5 between box and mask heads
    assert c4.backbone.out_channels == 256 and not hasattr(c4.backbone, "layer4")
    assert c4.roi_heads.box_roi_pool.scales == c4.roi_heads.mask_roi_pool.scales == [1 / 16]


@pytest.mark.parametrize("arch", non_resnets())
def test_every_non_resnet_shows_its_resolutions_to_the_fpn_without_moving_a_statistic(arch):
    """The last block at each resolution of ``.features``: strides 2..32, or 1..16 with the small-image stem."""
    backbone = create_backbone(arch)
    before = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
    levels = models.resolution_ends(backbone.features)
    assert [level.stride for level in levels] == [2, 4, 8, 16, 32] and levels[-1].block == str(len(backbone.features) - 1)
    assert levels[-1].channels == backbone.features[-1].out_channels
    assert backbone.features.training and all(torch.equal(before[name], tensor) for name, tensor in backbone.state_dict().items())
    small = models.resolution_ends(create_backbone(arch, small_images=True).features)
    assert [level.stride for level in small] == [1, 2, 4, 8, 16]


def test_fpn_detector_on_mbv3s_reads_strides_8_to_64_and_trains():
    plan = flags.schedule(flags.resolve_config(flags.DetectionConfig(checkpoint="x", image_size=64, max_iter=1)))
    torch.manual_seed(0)
    model = models.build_detector(create_backbone("mbv3s"), 4, "fpn", False, plan, roi_per_image=8)
    with torch.no_grad():
        maps = model.backbone.eval()(torch.zeros(1, 3, 128, 128))
    assert {name: (128 // value.shape[-1], value.shape[1]) for name, value in maps.items()} == {
        "0": (8, 256), "1": (16, 256), "2": (32, 256), "pool": (64, 256)}
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2"] and model.roi_heads.box_roi_pool.scales == [1 / 8, 1 / 16, 1 / 32]
    model.train()
    losses = model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([2])}])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    for part in (model.backbone.body["3"], model.backbone.body["12"], model.backbone.fpn):  # the stride-8 and stride-32 blocks, the pyramid
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    masks = models.build_detector(create_backbone("mbv3s"), 4, "fpn", True, plan, roi_per_image=8)
    assert masks.roi_heads.mask_roi_pool.featmap_names == ["0", "1", "2"]
    assert models.detector_name(create_backbone("mbv3s"), "fpn", True) == "Mask R-CNN FPN"


def test_torchvision_fpn_run_on_a_mobilenet_student(synthetic, mobile_student, tmp_path, capsys):
    out = tmp_path / "run"
    code, printed, err = run_main(tiny_run(mobile_student, synthetic[0], out, "--head", "fpn", "--max-iter", "2"), capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"]["arch"] == "mbv3s" and results["settings"]["model"] == "Faster R-CNN FPN" and results["settings"]["iterations"] == 2
    assert 0 <= results["metrics"]["VOC07_AP50"] <= 100 and "note:" not in printed
    assert load_file(out / "last.ckpt")["global_step"] == 2


def test_a_stopped_run_resumes_from_last_ckpt_as_if_never_stopped(synthetic, mobile_student, tmp_path, capsys):
    """2 iterations, then the same command to 4: it continues mid-epoch at iteration 2 and ends with the weights, momentum
    and lr schedule of a run that did 4 at once, bit for bit. (mbv3s with --head c4: the last-map detector, and a note.)"""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    schedule_flags = ["--max-iter", "4", "--warmup-iters", "2"]
    code, printed, err = run_main(tiny_run(mobile_student, synthetic[0], whole, *schedule_flags), capsys)
    assert code == 0, err
    assert "note: mbv3s has no res5 to put in the RoI head (--head c4): it detects on its last feature map (Faster R-CNN last-map)" in printed
    code, printed, err = run_main(tiny_run(mobile_student, synthetic[0], stopped, *schedule_flags, "--max-steps", "2"), capsys)
    assert code == 0, err
    assert load_file(stopped / "last.ckpt")["global_step"] == 2
    code, printed, err = run_main(tiny_run(mobile_student, synthetic[0], stopped, *schedule_flags, "--max-steps", "4"), capsys)
    assert code == 0, err
    assert f"resuming from {stopped / 'last.ckpt'}" in printed
    assert json.loads((stopped / "results.json").read_text())["settings"]["iterations"] == 4
    expected, got = load_file(whole / "last.ckpt"), load_file(stopped / "last.ckpt")
    assert got["global_step"] == expected["global_step"] == 4
    for part in ("state_dict", "optimizer_states", "lr_schedulers", "callbacks"):
        _assert_identical(got[part], expected[part], part)


def test_a_nan_loss_stops_the_run_with_the_engines_one_line_error(synthetic, mobile_student, tmp_path, capsys, monkeypatch):
    finite = train.DetectionModule.training_step
    monkeypatch.setattr(train.DetectionModule, "training_step",
                        lambda self, batch, batch_idx: finite(self, batch, batch_idx) * (float("nan") if self.global_step == 1 else 1.0))
    out = tmp_path / "run"
    code, printed, err = run_main(tiny_run(mobile_student, synthetic[0], out, "--max-iter", "4", "--checkpoint-every", "1"), capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == f"seed-eval detection: error: loss became nan at step 2; last good checkpoint: {out / 'last.ckpt'} (step 1)"
    assert load_file(out / "last.ckpt")["global_step"] == 1 and not (out / "results.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_asked_for_without_one_is_a_one_line_error(synthetic, student, capsys):
    code, printed, err = run_main(["--checkpoint", str(student), "--data", str(synthetic[0]), "--engine", "torchvision", "--accelerator", "gpu"], capsys)
    assert code == 2 and err == "seed-eval detection: error: --accelerator gpu: no CUDA GPU is visible; use --accelerator cpu\n"


# ---------------------------------------------------------------- user errors


@pytest.mark.parametrize("case", ["missing-path", "empty-voc", "no-coco-json", "no-data", "masks-on-voc"])
def test_bad_input_is_a_one_line_error(case, synthetic, student, tmp_path, capsys):
    args = {
        "missing-path": ["--data", str(tmp_path / "nowhere")],
        "empty-voc": ["--data", str(tmp_path)],
        "no-coco-json": ["--dataset", "coco", "--data", str(tmp_path)],
        "no-data": [],
        "masks-on-voc": ["--data", str(synthetic[0]), "--masks"],
    }[case]
    (tmp_path / "train2017").mkdir()
    code, printed, err = run_main(["--checkpoint", str(student), "--engine", "torchvision", *args], capsys)
    expected = {"missing-path": "does not exist", "empty-voc": "no VOC data under", "no-coco-json": "instances_train2017.json",
                "no-data": "pass --data PATH", "masks-on-voc": "VOC has no instance masks"}[case]
    assert code == 2 and err.startswith("seed-eval detection: error: ") and err.count("\n") == 1 and expected in err


@pytest.mark.parametrize("name", ["detection_voc_c4", "detection_coco_c4_1x", "detection_voc_smoke"])
def test_recipe_files_are_valid_configs(name):
    path = Path(__file__).parents[1] / "configs" / "eval" / f"{name}.yaml"
    config = flags.resolve_config(make_config(flags.DetectionConfig, {"config": str(path), "checkpoint": "x"}))
    if name == "detection_voc_c4":  # MoCo's numbers are the defaults too
        assert config == flags.resolve_config(flags.DetectionConfig(checkpoint="x", config=str(path)))
    assert config.masks is (name == "detection_coco_c4_1x")
