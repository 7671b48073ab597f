"""Detection data and scores: the VOC/COCO readers, the VOC07 metric, detectron2's schedule and the conversion to its names."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from downstream.detection import config as flags
from downstream.detection import d2, train
from downstream.detection import metrics as scores
from downstream.detection.data import VOC_CLASSES, DetectionDataset, read_coco, read_voc, read_voc_xml
from downstream.detection.scenes import SYNTHETIC
from seed.backbones import create_backbone
from seed.errors import SeedError

from .test_eval_detection import HAS_DETECTRON2, run_main

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
