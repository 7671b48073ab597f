"""COCO box and mask AP of our predictions against pycocotools run directly on a hand-written COCO set.

The set has non-contiguous category ids (3, 7, 12, listed out of order), a crowd region, an image with ground truth
but no detection, polygon masks and an uncompressed-RLE crowd mask. Predictions are in the detector's output form:
labels from 1 in the product's contiguous label space (category ids sorted: 3 -> 1, 7 -> 2, 12 -> 3).
"""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from downstream.detection.data import read_coco
from downstream.detection.metrics import evaluate_predictions
from downstream.detection.train import prediction

SIZE = 40
LABEL_OF = {3: 1, 7: 2, 12: 3}  # written by hand: the contiguous labels of the sorted category ids

# (image id, category id, xywh box, crowd)
TRUTH = [
    (11, 3, [2, 2, 12, 12], False), (11, 7, [20, 20, 15, 10], False), (11, 12, [0, 26, 18, 14], True),
    (22, 3, [5, 5, 20, 20], False), (22, 12, [26, 2, 10, 10], False),
    (33, 7, [10, 10, 15, 15], False),  # no detection on image 33: its dog is missed
]

# (image id, category id, xyxy box, score, xyxy rectangle of the mask)
DETECTIONS = [
    (11, 3, [0, 28, 8, 36], 0.95, [0, 28, 8, 36]),  # a cat where there is none, above every true one
    (11, 3, [2, 2, 14, 14], 0.90, [2, 2, 14, 13]),
    (11, 7, [22, 21, 36, 30], 0.80, [20, 20, 35, 30]),
    (11, 12, [2, 28, 12, 38], 0.70, [2, 28, 12, 38]),  # a bird inside the crowd of birds: ignored, no false positive
    (22, 7, [30, 30, 38, 38], 0.85, [30, 30, 38, 38]),  # a dog where there is none
    (22, 3, [8, 7, 27, 26], 0.60, [5, 5, 25, 25]),
    (22, 12, [26, 2, 36, 12], 0.50, [27, 3, 36, 12]),
]


def _rectangle(box: list[int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd form: run lengths of the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"counts": [0, *runs] if flat[0] else runs, "size": [SIZE, SIZE]}


def _instances() -> dict:
    annotations = []
    for number, (image, category, (x, y, w, h), crowd) in enumerate(TRUTH, 1):
        if crowd:
            segmentation, area = _uncompressed_rle(_rectangle([x, y, x + w, y + h])), float(w * h)
        else:
            segmentation, area = [[x, y, x + w, y, x + w, y + h, x, y + h]], float(w * h)
        annotations.append({"id": number, "image_id": image, "category_id": category, "bbox": [x, y, w, h], "area": area,
                            "iscrowd": int(crowd), "segmentation": segmentation})
    return {"images": [{"id": i, "file_name": f"{i}.png", "width": SIZE, "height": SIZE} for i in (11, 22, 33)],
            "annotations": annotations,
            "categories": [{"id": 12, "name": "bird"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}


@pytest.fixture
def coco_root(tmp_path) -> Path:
    (tmp_path / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (tmp_path / split).mkdir()
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(_instances()))
    return tmp_path


def _ours() -> list[dict]:
    """The detections as the detector's outputs become predictions: tensors of boxes, scores, labels and masks per image."""
    found = []
    for image in (11, 22, 33):
        rows = [d for d in DETECTIONS if d[0] == image]
        boxes = torch.tensor([d[2] for d in rows], dtype=torch.float32).reshape(-1, 4)
        scores = torch.tensor([d[3] for d in rows], dtype=torch.float32)
        labels = torch.tensor([LABEL_OF[d[1]] for d in rows], dtype=torch.int64)
        masks = torch.from_numpy(np.stack([_rectangle(d[4]) for d in rows])).bool() if rows else torch.zeros(0, SIZE, SIZE, dtype=torch.bool)
        found.append(prediction(image, boxes, scores, labels, masks))
    return found


def _pycocotools(annotations: Path, iou_type: str, category: dict[int, int] | None = None) -> dict[str, float]:
    """AP, AP50, AP75 (percent) of DETECTIONS by COCOeval itself, on every image; ``category`` maps the detections' ids."""
    results = []
    for image, category_id, (x1, y1, x2, y2), score, mask_box in DETECTIONS:
        entry = {"image_id": image, "category_id": (category or {}).get(category_id, category_id), "score": score}
        if iou_type == "bbox":
            entry["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        else:
            entry["segmentation"] = mask_utils.encode(np.asfortranarray(_rectangle(mask_box)))
        results.append(entry)
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotations))
        evaluation = COCOeval(truth, truth.loadRes(results), iou_type)
        evaluation.params.imgIds = [11, 22, 33]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: 100 * float(value) for name, value in zip(("AP", "AP50", "AP75"), evaluation.stats[:3], strict=True)}


def test_coco_box_and_mask_ap_are_pycocotools_on_the_real_category_ids(coco_root):
    """The reader maps category ids 3, 7, 12 to labels 1, 2, 3 (crowds left out of its records, kept in the ground truth);
    box and mask AP of our predictions equal COCOeval's on the same detections with their real category ids, the
    missed image counted.

    Seen to fail when metrics.py's label -> category id mapping is replaced by the label itself, or by the label + 1.
    """
    data = read_coco(coco_root)
    assert data.category_ids == [3, 7, 12] and data.classes == ["cat", "dog", "bird"]
    assert [(r.image_id, r.labels.tolist()) for r in data.test] == [(11, [1, 2]), (22, [1, 3]), (33, [2])]
    metrics = evaluate_predictions(_ours(), data, data.test, masks=True)
    annotations = coco_root / "annotations" / "instances_val2017.json"
    boxes, masks = _pycocotools(annotations, "bbox"), _pycocotools(annotations, "segm")
    assert metrics == pytest.approx({**boxes, **{f"mask_{k}": v for k, v in masks.items()}}, abs=1e-9)
    # the set tells the mistakes apart: neither number is trivial, masks score otherwise than boxes, and ids 1, 2, 3 or
    # 2, 3, 4 in place of 3, 7, 12 (a missing or shifted mapping) score otherwise
    assert 0 < boxes["AP"] < 100 and 0 < masks["AP"] < 100 and boxes["AP"] != masks["AP"]
    for wrong in ({3: 1, 7: 2, 12: 3}, {3: 2, 7: 3, 12: 4}):
        assert _pycocotools(annotations, "bbox", wrong)["AP"] != pytest.approx(boxes["AP"], abs=1e-6)
        assert _pycocotools(annotations, "segm", wrong)["AP"] != pytest.approx(masks["AP"], abs=1e-6)


def test_the_crowd_region_and_the_missed_image_count_as_cocoeval_counts_them(coco_root):
    """Box AP50 worked out by hand: the detection in the crowd region is ignored and the missed image lowers the dog's recall.

    Cat: two true boxes, the 0.95 false positive first, then both found: precision 1/2 then 2/3 at recall 1/2 and 1,
    so interpolated precision 2/3 at all 101 recall points. Dog: two true boxes (one on the image without detections),
    the 0.85 false positive first, then the 0.80 true one: precision 1/2 up to recall 1/2 (51 points of 101), 0 after.
    Bird: one true box found at precision 1 (the detection in the crowd region is ignored, not a false positive): 1.
    AP50 = (2/3 + 51/202 + 1) / 3.

    Seen to fail when the ground truth is rebuilt from the records (crowd regions dropped) and when the image without
    detections is left out of the evaluated images.
    """
    data = read_coco(coco_root)
    metrics = evaluate_predictions(_ours(), data, data.test, masks=False)
    assert metrics["AP50"] == pytest.approx(100 * (2 / 3 + 51 / 202 + 1) / 3, abs=1e-9)
