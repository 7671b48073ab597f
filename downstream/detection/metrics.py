"""Detection scores: the VOC2007 devkit's 11-point AP at IoU 0.5:0.95 and pycocotools' COCOeval (boxes and masks)."""

import contextlib
import io
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou

from downstream.detection.config import VOC_THRESHOLDS
from downstream.detection.data import DetectionData, Record


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007's 11-point interpolated AP: the mean over t in {0, 0.1, ..., 1} of the best precision at recall >= t."""
    points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]
    return float(np.mean(points))


def voc_class_ap(detections: list[tuple[int, float, np.ndarray]], ground_truth: dict[int, tuple[np.ndarray, np.ndarray]],
                 iou_threshold: float = 0.5) -> float | None:
    """VOC07 AP of one class, as the devkit's ``voc_eval`` (and detectron2's) computes it.

    ``detections`` are ``(image_id, score, xyxy box)``; ``ground_truth`` maps
    an image to ``(boxes (N, 4), difficult (N,))``. Each detection, by
    decreasing score, takes the ground-truth box it overlaps most: above the
    IoU threshold it is a true positive if that box is new, a false positive
    if already taken, and ignored if the box is ``difficult``. Recall counts
    non-difficult boxes only. ``None`` when the class has none.
    """
    positives = sum(int((~difficult).sum()) for _, difficult in ground_truth.values())
    if positives == 0:
        return None
    order = sorted(range(len(detections)), key=lambda i: -detections[i][1])
    taken = {image: np.zeros(len(boxes), dtype=bool) for image, (boxes, _) in ground_truth.items()}
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for rank, index in enumerate(order):
        image, _, box = detections[index]
        boxes, difficult = ground_truth.get(image, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        if len(boxes) == 0:
            fp[rank] = 1
            continue
        ious = box_iou(torch.as_tensor(box, dtype=torch.float64)[None], torch.as_tensor(boxes, dtype=torch.float64))[0].numpy()
        best = int(ious.argmax())
        if ious[best] <= iou_threshold:
            fp[rank] = 1
        elif difficult[best]:
            continue
        elif not taken[image][best]:
            tp[rank], taken[image][best] = 1, True
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / positives
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc07_ap(recall, precision)


def voc_metrics(predictions: list[dict[str, Any]], records: list[Record], num_classes: int) -> dict[str, float]:
    """VOC07 11-point mAP at IoU 0.5, 0.75 and averaged over 0.5:0.95 (detectron2's PascalVOCDetectionEvaluator).

    The mean is over the classes that have non-difficult objects in ``records``.
    """
    per_threshold = {t: [] for t in VOC_THRESHOLDS}
    for label in range(1, num_classes + 1):
        truth = {r.image_id: (r.boxes[r.labels == label], r.difficult[r.labels == label]) for r in records}
        detections = [(p["image_id"], float(s), b) for p in predictions for b, s, lab in zip(p["boxes"], p["scores"], p["labels"], strict=True)
                      if lab == label]
        for threshold in VOC_THRESHOLDS:
            ap = voc_class_ap(detections, truth, threshold)
            if ap is not None:
                per_threshold[threshold].append(ap)
    maps = {t: 100 * float(np.mean(aps)) if aps else float("nan") for t, aps in per_threshold.items()}
    return {"VOC07_AP50": maps[0.5], "VOC07_AP75": maps[0.75], "VOC07_AP": float(np.mean(list(maps.values())))}


def coco_metrics(predictions: list[dict[str, Any]], ground_truth: COCO, category_ids: list[int], iou_type: str = "bbox") -> dict[str, float]:
    """COCOeval AP (IoU 0.5:0.95), AP50 and AP75 in percent, over the predicted images."""
    results = []
    for p in predictions:
        for i, (score, label) in enumerate(zip(p["scores"], p["labels"], strict=True)):
            entry = {"image_id": p["image_id"], "category_id": category_ids[int(label) - 1], "score": float(score)}
            if iou_type == "bbox":
                x1, y1, x2, y2 = (float(v) for v in p["boxes"][i])
                entry["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                entry["segmentation"] = p["rles"][i]
            results.append(entry)
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), iou_type)
        evaluation.params.imgIds = sorted(p["image_id"] for p in predictions)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [100 * float(v) if v >= 0 else float("nan") for v in evaluation.stats[:3]]
    return dict(zip(("AP", "AP50", "AP75"), stats, strict=True))


def evaluate_predictions(predictions: list[dict[str, Any]], data: DetectionData, records: list[Record], masks: bool) -> dict[str, float]:
    """Every metric of the run: COCOeval box AP (and mask AP), and the VOC07 metric on VOC."""
    ground_truth = data.ground_truth([r.image_id for r in records])
    metrics = coco_metrics(predictions, ground_truth, data.category_ids, "bbox")
    if masks:
        metrics.update({f"mask_{k}": v for k, v in coco_metrics(predictions, ground_truth, data.category_ids, "segm").items()})
    if data.name == "voc":
        metrics.update(voc_metrics(predictions, records, len(data.classes)))
    return metrics

