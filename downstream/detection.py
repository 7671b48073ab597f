"""``seed-eval detection``: transfer a student backbone to VOC / COCO object detection.

The protocol is MoCo's (He et al. 2020, Sec. 4.2; SEED reports the same):
Faster R-CNN R50-C4 on VOC07+12 trainval, 24k iterations, batch 16, lr 0.02
(x0.1 at 18k and 22k), tested on VOC07 test; Mask R-CNN C4 1x on COCO
(90k iterations, x0.1 at 60k and 80k). BatchNorm is trained (SyncBN across
GPUs) and res5, in the RoI head, ends with one more norm layer (MoCo's
``Res5ROIHeadsExtraNorm``).

Two engines run it:

* ``detectron2`` (when it imports): the backbone is converted to detectron2's
  names (:func:`to_detectron2`, as MoCo's ``convert-pretrain-to-detectron2.py``)
  and detectron2's ``DefaultTrainer`` trains with MoCo's config values
  (:func:`detectron2_overrides`).
* ``torchvision`` (always): ``torchvision.models.detection`` Faster R-CNN /
  Mask R-CNN around the same backbone, C4-style (res2-res4 as backbone, res5
  in the RoI head) or with an FPN, trained by a plain SGD loop with the same
  schedule.

Both are scored the same way: pycocotools' COCOeval (AP, AP50, AP75; mask AP
with masks) and, on VOC, the VOC2007 devkit's 11-point AP at IoU 0.5, 0.75 and
averaged over 0.5:0.95 (the numbers MoCo's tables give for VOC).
"""

import bisect
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import pickle
import random
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from tqdm import tqdm

from downstream.common import open_checkpoint, write_results
from downstream.detection_data import DetectionData, DetectionDataset, Record, collate, read_detection_data
from seed.checkpoints import atomic_save, load_file
from seed.cli import run_cli
from seed.config import CommonConfig, load_config, option, save_config
from seed.engine import run_folder
from seed.errors import SeedError
from seed.loaders import default_workers

PROG = "seed-eval detection"
LAST = "last.pt"
#: MoCo's detection recipes: iterations, lr steps as fractions of them, training shorter sides (test: the last).
RECIPES = {
    "voc": {"max_iter": 24000, "steps": (18000 / 24000, 22000 / 24000), "train_sizes": tuple(range(480, 801, 32)), "masks": False},
    "coco": {"max_iter": 90000, "steps": (60000 / 90000, 80000 / 90000), "train_sizes": tuple(range(640, 801, 32)), "masks": True},
}
DETECTRON2_DEPTH = {"r18": 18, "r34": 34, "r50": 50, "r101": 101, "r152": 152}
VOC_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


@dataclasses.dataclass
class DetectionConfig(CommonConfig):
    """``seed-eval detection``; defaults are MoCo's VOC / COCO detection configs."""

    checkpoint: str | None = option("student (or any supported) checkpoint whose backbone is transferred")
    arch: str | None = option("backbone architecture (default: the one recorded in our checkpoints)")
    dataset: Literal["voc", "coco"] = option("voc (VOC07+12 trainval -> VOC07 test) or coco (train2017 -> val2017)", "voc")
    data: str | None = option("VOCdevkit folder (VOC2007/, VOC2012/) for voc; folder with annotations/, train2017/, val2017/ for coco")
    engine: Literal["auto", "detectron2", "torchvision"] = option("auto (detectron2 when it imports, else torchvision), detectron2 or torchvision", "auto")
    head: Literal["c4", "fpn"] = option("c4 (res5 in the RoI head, MoCo's R50-C4) or fpn (torchvision engine, ResNets)", "c4")
    masks: bool | None = option("Mask R-CNN instead of Faster R-CNN (default: on for coco)")
    max_iter: int | None = option("training iterations (default: 24000 voc, 90000 coco); lr steps scale with it")
    lr: float = option("base learning rate for --batch-size images", 0.02)
    momentum: float = option("SGD momentum", 0.9)
    weight_decay: float = option("weight decay (none on norm layers, as detectron2)", 1e-4)
    warmup_iters: int = option("iterations of linear warm-up from lr/1000", 100)
    image_size: int = option("shorter image side at test; training samples MoCo's sizes scaled to it", 800)
    batch_size: int = option("images per iteration over all devices (detectron2's IMS_PER_BATCH)", 16)
    roi_per_image: int = option("sampled RoIs per training image in the box head", 512)
    max_eval_images: int | None = option("score only the first N test images (smoke runs)")
    checkpoint_every: int = option("write last.pt (torchvision engine) every N iterations", 2000)
    resume: Literal["auto", "never"] = option("auto (continue from the run folder's last.pt) or never", "auto")


def resolve_config(config: DetectionConfig) -> DetectionConfig:
    """Check the flags (the enumerated ones are checked when the config is built) and fill the dataset's recipe defaults."""
    if not config.checkpoint:
        raise SeedError("pass --checkpoint PATH: the student (or teacher) whose backbone is evaluated")
    for name in ("image_size", "batch_size", "roi_per_image"):
        if getattr(config, name) < 1:
            raise SeedError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    recipe = RECIPES[config.dataset]
    masks = recipe["masks"] if config.masks is None else config.masks
    if masks and config.dataset == "voc":
        raise SeedError("VOC has no instance masks; drop --masks")
    max_iter = recipe["max_iter"] if config.max_iter is None else config.max_iter
    if max_iter < 1:
        raise SeedError(f"--max-iter must be at least 1, got {max_iter}")
    return dataclasses.replace(config, masks=masks, max_iter=max_iter)


def select_engine(engine: str) -> str:
    """``auto`` is detectron2 when it can be imported, torchvision otherwise."""
    available = importlib.util.find_spec("detectron2") is not None
    if engine == "detectron2" and not available:
        raise SeedError("--engine detectron2: detectron2 is not installed (it is not on PyPI: pip install "
                        "'git+https://github.com/facebookresearch/detectron2.git'); or use --engine torchvision")
    if engine == "auto":
        return "detectron2" if available else "torchvision"
    return engine


def schedule(config: DetectionConfig) -> dict[str, Any]:
    """Iterations, lr steps and image sizes of the run, scaled from the recipe to ``--max-iter`` and ``--image-size``."""
    recipe = RECIPES[config.dataset]
    scale = config.image_size / 800
    sizes = sorted({max(1, round(s * scale)) for s in recipe["train_sizes"]})
    return {
        "max_iter": config.max_iter,
        "steps": [round(f * config.max_iter) for f in recipe["steps"]],
        "warmup_iters": min(config.warmup_iters, config.max_iter),
        "train_sizes": sizes,
        "test_size": config.image_size,
        "max_size": max(config.image_size, round(1333 * scale)),
    }


# ---------------------------------------------------------------- torchvision detectors


def _is_resnet(backbone: nn.Module) -> bool:
    return all(hasattr(backbone, name) for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"))


def _channels(stage: nn.Module) -> int:
    """Output channels of a ResNet stage: its last norm layer's width."""
    return [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


class Res5Head(nn.Module):
    """res5 run on pooled RoI features, then a BatchNorm (MoCo's ``Res5ROIHeadsExtraNorm``).

    The C4 box head pools its output to a vector; the Mask R-CNN mask head
    shares this very module, as detectron2's C4 heads share res5.
    """

    def __init__(self, res5: nn.Module, channels: int) -> None:
        super().__init__()
        self.res5 = res5
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.res5(x))


def build_detector(backbone: nn.Module, num_classes: int, head: str, masks: bool, plan: dict[str, Any], roi_per_image: int = 512) -> nn.Module:
    """A torchvision Faster R-CNN (Mask R-CNN with ``masks``) on ``backbone``; ``num_classes`` counts background.

    ResNets: ``c4`` keeps stem..res4 as the backbone with one anchor map (5
    sizes x 3 ratios, detectron2's), RoIAlign 14x14 and res5 + norm + average
    pool as box head; ``fpn`` puts torchvision's FPN on res2..res5. Other
    backbones give their last feature map to a two-layer MLP box head.

    Anchors keep detectron2's sizes (32-512 px) at every ``--image-size``: they
    go with the feature strides, which do not shrink with the image. Scaled with
    the image (4-61 px at 96 px) they halved VOC07 AP50 on the synthetic
    benchmark (40.9 vs 84.3 for the SEED student, ``bench/detection_bench.py``).
    """
    detector = MaskRCNN if masks else FasterRCNN
    common = {"min_size": tuple(plan["train_sizes"]), "max_size": plan["max_size"], "box_batch_size_per_image": roi_per_image}
    if _is_resnet(backbone) and head == "fpn":
        channels = [_channels(getattr(backbone, f"layer{i}")) for i in range(1, 5)]
        body = BackboneWithFPN(backbone, {f"layer{i}": str(i - 1) for i in range(1, 5)}, channels, 256, extra_blocks=LastLevelMaxPool())
        return detector(body, num_classes=num_classes, **common)
    anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    single = {"rpn_anchor_generator": anchors, "rpn_pre_nms_top_n_train": 12000, "rpn_pre_nms_top_n_test": 6000, **common}
    if _is_resnet(backbone):
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
        body = nn.Sequential(OrderedDict((name, getattr(backbone, name)) for name in names))
        body.out_channels = _channels(backbone.layer3)
        res5 = Res5Head(backbone.layer4, _channels(backbone.layer4))
        width = _channels(backbone.layer4)
        box_head = nn.Sequential(res5, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        parts = {"box_roi_pool": MultiScaleRoIAlign(["0"], 14, sampling_ratio=0), "box_head": box_head,
                 "box_predictor": FastRCNNPredictor(width, num_classes)}
        if masks:
            parts.update(mask_roi_pool=MultiScaleRoIAlign(["0"], 14, sampling_ratio=0), mask_head=res5,
                         mask_predictor=MaskRCNNPredictor(width, 256, num_classes))
        return detector(body, **parts, **single)
    if not hasattr(backbone, "features"):
        raise SeedError(f"backbone {getattr(backbone, 'arch', type(backbone).__name__)} has no feature maps to detect on")
    body = backbone.features
    body.out_channels = backbone.features[-1].out_channels
    parts = {"box_roi_pool": MultiScaleRoIAlign(["0"], 7, sampling_ratio=0), "box_head": TwoMLPHead(body.out_channels * 49, 1024),
             "box_predictor": FastRCNNPredictor(1024, num_classes)}
    if masks:
        parts.update(mask_roi_pool=MultiScaleRoIAlign(["0"], 14, sampling_ratio=0), mask_head=MaskRCNNHeads(body.out_channels, [256] * 4, 1),
                     mask_predictor=MaskRCNNPredictor(256, 256, num_classes))
    return detector(body, **parts, **single)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on every parameter except norm layers' (detectron2's ``WEIGHT_DECAY_NORM = 0``)."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    seen: set[int] = set()
    decay, no_decay = [], []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if isinstance(module, norm_types) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(iteration: int, steps: list[int], warmup_iters: int) -> float:
    """detectron2's WarmupMultiStepLR: linear from 1/1000 over the warm-up, x0.1 at each step."""
    factor = 0.1 ** bisect.bisect_right(steps, iteration)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= 0.001 * (1 - alpha) + alpha
    return factor


def _forever(loader: DataLoader) -> Iterator[tuple[list, list]]:
    epoch = 0
    while True:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _autocast(precision: str, device: torch.device) -> tuple[Any, bool]:
    """The autocast context for ``--precision`` and whether a gradient scaler is needed."""
    if precision in ("auto", "32", "32-true"):  # detectron2's configs train in fp32
        return contextlib.nullcontext(), False
    if precision in ("bf16-mixed", "16-mixed"):
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        return torch.autocast(device.type, dtype=dtype), precision == "16-mixed" and device.type == "cuda"
    raise SeedError(f"--precision {precision}: detection takes auto, 32, bf16-mixed or 16-mixed")


def train_torchvision(model: nn.Module, data: DetectionData, config: DetectionConfig, plan: dict[str, Any], run_dir: Path,
                      device: torch.device, world: int, rank: int) -> int:
    """SGD over ``max_iter`` iterations (or ``--max-steps``) with the recipe's schedule; returns the iterations done."""
    dataset = DetectionDataset([r for r in data.train if len(r.boxes)], train=True, masks=bool(config.masks))
    per_device = max(1, config.batch_size // world)
    if len(dataset) < per_device:
        raise SeedError(f"--batch-size {config.batch_size} exceeds the {len(dataset)} annotated training images; lower --batch-size")
    generator = torch.Generator().manual_seed(config.seed)
    sampler = DistributedSampler(dataset, seed=config.seed) if world > 1 else RandomSampler(dataset, generator=generator)
    workers = default_workers(config)
    loader = DataLoader(dataset, batch_size=per_device, sampler=sampler, num_workers=workers, collate_fn=collate, drop_last=True,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    optimizer = torch.optim.SGD(parameter_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, plan["steps"], plan["warmup_iters"]))
    autocast, scaled = _autocast(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=scaled)
    start = _resume(model, optimizer, scheduler, run_dir) if config.resume == "auto" else 0
    stop = min(plan["max_iter"], config.max_steps) if config.max_steps is not None else plan["max_iter"]
    if start >= stop:
        return start
    model.train()
    batches = _forever(loader)
    progress = tqdm(range(start, stop), initial=start, total=stop, desc="detection", disable=rank != 0, dynamic_ncols=True)
    for iteration in progress:
        images, targets = next(batches)
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with autocast:
            losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise SeedError(f"the detection loss became {loss.item()} at iteration {iteration}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
        done = iteration + 1
        if rank == 0 and (done == stop or (config.checkpoint_every > 0 and done % config.checkpoint_every == 0)):
            state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "iteration": done}
            atomic_save(state, run_dir / LAST)
    progress.close()
    return stop


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _resume(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, run_dir: Path) -> int:
    """Continue from the run folder's ``last.pt``; returns the iteration it stopped at (0 when there is none)."""
    path = run_dir / LAST
    if not path.is_file():
        return 0
    state = load_file(path)
    try:
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, RuntimeError, ValueError):
        raise SeedError(f"{path} holds a different detector (another --head, --masks, --dataset or checkpoint architecture); "
                        "pass --resume never or another --output") from None
    print(f"resuming from {path} (iteration {state['iteration']})")
    return int(state["iteration"])


def _prediction(image_id: int, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None) -> dict[str, Any]:
    """One image's detections on the CPU; masks (N, H, W) as COCO RLEs."""
    out = {"image_id": int(image_id), "boxes": boxes.detach().float().cpu().numpy(), "scores": scores.detach().float().cpu().numpy(),
           "labels": labels.detach().cpu().numpy().astype(np.int64)}
    if masks is not None:
        binary = np.asfortranarray(masks.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
        out["rles"] = mask_utils.encode(binary) if len(out["scores"]) else []
    return out


@torch.no_grad()
def predict_torchvision(model: nn.Module, records: list[Record], config: DetectionConfig, device: torch.device) -> list[dict[str, Any]]:
    """Detections on ``records`` with the test size (torchvision maps boxes back to the original image)."""
    model.eval()
    loader = DataLoader(DetectionDataset(records), batch_size=max(1, min(config.batch_size, 8)), num_workers=default_workers(config),
                        collate_fn=collate)
    predictions = []
    for images, targets in tqdm(loader, desc="inference", dynamic_ncols=True):
        outputs = model([image.to(device) for image in images])
        for output, target in zip(outputs, targets, strict=True):
            masks = (output["masks"][:, 0] > 0.5) if "masks" in output else None
            predictions.append(_prediction(int(target["image_id"]), output["boxes"], output["scores"], output["labels"], masks))
    return predictions


# ---------------------------------------------------------------- metrics


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


# ---------------------------------------------------------------- detectron2


def to_detectron2(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A torchvision-named ResNet state dict in detectron2's names (MoCo's ``convert-pretrain-to-detectron2.py``).

    ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``; ``layer{i}`` ->
    ``res{i+1}``; ``bn{j}`` -> ``conv{j}.norm``; ``downsample.0/1`` ->
    ``shortcut``/``shortcut.norm``. No ``backbone.`` prefix: the file is
    loaded with ``matching_heuristics``, which matches name suffixes, so
    ``res5.*`` lands in ``roi_heads.res5`` of a C4 model. The classifier and
    BatchNorm counters are dropped.
    """
    converted = {}
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if parts[0] in ("conv1", "bn1") and len(parts) == 2:
            name = ["stem", "conv1"] + ([] if parts[0] == "conv1" else ["norm"]) + parts[1:]
        elif parts[0].startswith("layer") and len(parts) >= 4 and parts[0][5:].isdigit():
            stage, block, layer = f"res{int(parts[0][5:]) + 1}", parts[1], parts[2]
            if layer.startswith("conv"):
                name = [stage, block, layer, *parts[3:]]
            elif layer.startswith("bn"):
                name = [stage, block, f"conv{layer[2:]}", "norm", *parts[3:]]
            elif layer == "downsample" and parts[3] in ("0", "1"):
                name = [stage, block, "shortcut"] + ([] if parts[3] == "0" else ["norm"]) + parts[4:]
            else:
                raise SeedError(f"'{key}' is not a ResNet parameter; the detectron2 engine takes ResNets ({', '.join(DETECTRON2_DEPTH)})")
        else:
            raise SeedError(f"'{key}' is not a ResNet parameter; the detectron2 engine takes ResNets ({', '.join(DETECTRON2_DEPTH)})")
        converted[".".join(name)] = value.detach().cpu().numpy()
    return converted


def write_detectron2_weights(state: Mapping[str, torch.Tensor], path: Path) -> Path:
    """The ``.pkl`` detectron2 reads as ``MODEL.WEIGHTS``."""
    with open(path, "wb") as handle:
        pickle.dump({"model": to_detectron2(state), "__author__": "seed", "matching_heuristics": True}, handle)
    return path


def detectron2_overrides(config: DetectionConfig, plan: dict[str, Any], depth: int, num_classes: int, weights: str,
                         datasets: tuple[str, str], output_dir: str, device: str) -> list[Any]:
    """``cfg.merge_from_list`` values reproducing MoCo's ``pascal_voc_R_50_C4_24k_moco`` / ``coco_R_50_C4_1x_moco`` configs.

    ``Base-RCNN-C4-BN``: SyncBN everywhere, nothing frozen, extra norm after
    res5, precise BN before testing; MoCo's RGB pixel mean/std and
    ``STRIDE_IN_1X1 False`` (torchvision ResNets stride in the 3x3 conv).
    R18/R34 need ``RES2_OUT_CHANNELS 64``.
    """
    values = {
        "MODEL.WEIGHTS": weights,
        "MODEL.MASK_ON": bool(config.masks),
        "MODEL.DEVICE": device,
        "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
        "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
        "INPUT.FORMAT": "RGB",
        "MODEL.RESNETS.DEPTH": depth,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 64 if depth < 50 else 256,
        "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "MODEL.RESNETS.NORM": "SyncBN",
        "MODEL.BACKBONE.FREEZE_AT": 0,
        "MODEL.ROI_HEADS.NAME": "SeedRes5ROIHeads",
        "MODEL.ROI_HEADS.NUM_CLASSES": num_classes,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": config.roi_per_image,
        "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
        "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
        "TEST.PRECISE_BN.ENABLED": True,
        "TEST.EVAL_PERIOD": 0,
        "INPUT.MIN_SIZE_TRAIN": tuple(plan["train_sizes"]),
        "INPUT.MIN_SIZE_TEST": plan["test_size"],
        "INPUT.MAX_SIZE_TRAIN": plan["max_size"],
        "INPUT.MAX_SIZE_TEST": plan["max_size"],
        "SOLVER.IMS_PER_BATCH": config.batch_size,
        "SOLVER.BASE_LR": config.lr,
        "SOLVER.MOMENTUM": config.momentum,
        "SOLVER.WEIGHT_DECAY": config.weight_decay,
        "SOLVER.STEPS": tuple(plan["steps"]),
        "SOLVER.MAX_ITER": plan["max_iter"],
        "SOLVER.WARMUP_ITERS": plan["warmup_iters"],
        "SOLVER.CHECKPOINT_PERIOD": max(config.checkpoint_every, 1),
        "DATASETS.TRAIN": (datasets[0],),
        "DATASETS.TEST": (datasets[1],),
        "DATALOADER.NUM_WORKERS": default_workers(config),
        "SEED": config.seed,
        "OUTPUT_DIR": output_dir,
    }
    return [item for pair in values.items() for item in pair]


def _register_detectron2_heads() -> None:
    """Register ``SeedRes5ROIHeads``: MoCo's ``Res5ROIHeadsExtraNorm``, with a BasicBlock res5 for R18/R34."""
    from detectron2.layers import get_norm
    from detectron2.modeling import ROI_HEADS_REGISTRY
    from detectron2.modeling.backbone.resnet import BasicBlock, ResNet
    from detectron2.modeling.roi_heads import Res5ROIHeads

    if "SeedRes5ROIHeads" in ROI_HEADS_REGISTRY:
        return

    class SeedRes5ROIHeads(Res5ROIHeads):
        @classmethod
        def _build_res5_block(cls, cfg: Any) -> tuple[nn.Sequential, int]:
            depth = cfg.MODEL.RESNETS.DEPTH
            if depth >= 50:
                res5, channels = super()._build_res5_block(cfg)
            else:  # detectron2's own res5 head is Bottleneck-only
                channels, blocks = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8, 2 if depth == 18 else 3
                res5 = nn.Sequential(*ResNet.make_stage(BasicBlock, blocks, stride_per_block=[2] + [1] * (blocks - 1), in_channels=channels // 2,
                                                        out_channels=channels, norm=cfg.MODEL.RESNETS.NORM))
            res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, channels))
            return res5, channels

    ROI_HEADS_REGISTRY.register(SeedRes5ROIHeads)


def _detectron2_dicts(records: list[Record], masks: bool) -> list[dict[str, Any]]:
    from detectron2.structures import BoxMode

    dicts = []
    for r in records:
        annotations = []
        for i, (box, label) in enumerate(zip(r.boxes, r.labels, strict=True)):
            annotation = {"bbox": [float(v) for v in box], "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(label) - 1, "iscrowd": 0}
            if masks:
                annotation["segmentation"] = r.segmentations[i]
            annotations.append(annotation)
        dicts.append({"file_name": str(r.file), "image_id": r.image_id, "height": r.height, "width": r.width, "annotations": annotations})
    return dicts


def detectron2_worker(config: DetectionConfig, plan: dict[str, Any], data: DetectionData, test: list[Record], overrides: list[Any], result: str) -> None:
    """Train and test with detectron2 in one process of ``detectron2.engine.launch``; rank 0 writes the metrics to ``result``."""
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import DatasetEvaluator
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    class SeedEvaluator(DatasetEvaluator):
        """Collects detectron2's detections and scores them with this module's metrics."""

        def reset(self) -> None:
            self.predictions: list[dict[str, Any]] = []

        def process(self, inputs: list[dict], outputs: list[dict]) -> None:
            for sample, output in zip(inputs, outputs, strict=True):
                found = output["instances"].to("cpu")
                masks = found.pred_masks if found.has("pred_masks") else None
                self.predictions.append(_prediction(sample["image_id"], found.pred_boxes.tensor, found.scores, found.pred_classes + 1, masks))

        def evaluate(self) -> dict[str, Any]:
            gathered = comm.gather(self.predictions, dst=0)
            if not comm.is_main_process():
                return {}
            return {"detection": evaluate_predictions([p for part in gathered for p in part], data, test, bool(config.masks))}

    _register_detectron2_heads()
    names = (f"seed_{data.name}_train", f"seed_{data.name}_test")
    for name, records in zip(names, ([r for r in data.train if len(r.boxes)], test), strict=True):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda records=records: _detectron2_dicts(records, bool(config.masks)))
        MetadataCatalog.get(name).set(thing_classes=list(data.classes))
    cfg = get_cfg()
    cfg.merge_from_list(overrides)
    cfg.freeze()
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank())
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=config.resume == "auto")
    trainer.train()
    metrics = DefaultTrainer.test(cfg, trainer.model, evaluators=[SeedEvaluator()])
    if comm.is_main_process():
        Path(result).write_text(json.dumps(metrics.get("detection", metrics)))


def run_detectron2(config: DetectionConfig, plan: dict[str, Any], backbone: nn.Module, data: DetectionData, test: list[Record],
                   run_dir: Path) -> dict[str, float]:
    """Convert the backbone, then train and test with detectron2 on ``--devices`` GPUs (or the CPU)."""
    from detectron2.engine import launch

    arch = getattr(backbone, "arch", None)
    if arch not in DETECTRON2_DEPTH or config.head != "c4":
        raise SeedError(f"the detectron2 engine runs MoCo's R-C4 configs on {', '.join(DETECTRON2_DEPTH)}; "
                        f"for {arch} with --head {config.head} use --engine torchvision")
    if config.num_nodes > 1:
        raise SeedError("the detectron2 engine runs on one machine; pass --num-nodes 1 (up to --devices GPUs)")
    if backbone.conv1.weight.shape[-1] != 7:
        raise SeedError("this backbone has the small-image 3x3 stem, which detectron2's ResNet lacks; use --engine torchvision")
    weights = write_detectron2_weights(backbone.state_dict(), run_dir / "backbone_detectron2.pkl")
    gpus = torch.cuda.is_available() and config.accelerator != "cpu"
    overrides = detectron2_overrides(config, plan, DETECTRON2_DEPTH[arch], len(data.classes), str(weights),
                                     (f"seed_{data.name}_train", f"seed_{data.name}_test"), str(run_dir / "detectron2"), "cuda" if gpus else "cpu")
    result = run_dir / "detectron2_metrics.json"
    result.unlink(missing_ok=True)
    launch(detectron2_worker, config.devices if gpus else 1, num_machines=1, dist_url="auto", args=(config, plan, data, test, overrides, str(result)))
    return json.loads(result.read_text())


# ---------------------------------------------------------------- the command


def _device(config: DetectionConfig) -> tuple[torch.device, int, int]:
    """Device, world size and rank; several processes come from ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and config.devices * config.num_nodes > 1:
        raise SeedError("the torchvision engine trains on several devices when launched by torchrun: "
                        f"torchrun --nproc_per_node {config.devices} -m downstream.cli detection ...")
    cuda = torch.cuda.is_available() and config.accelerator != "cpu"
    if config.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise SeedError(f"--accelerator {config.accelerator}: no CUDA GPU is visible; use --accelerator cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    return torch.device("cuda", local) if cuda else torch.device("cpu"), world, rank


LABELS = {
    "AP": "AP (COCO, IoU .50:.95)", "AP50": "AP50 (COCO)", "AP75": "AP75 (COCO)",
    "mask_AP": "mask AP (COCO)", "mask_AP50": "mask AP50 (COCO)", "mask_AP75": "mask AP75 (COCO)",
    "VOC07_AP50": "AP50 (VOC07 11-point)", "VOC07_AP75": "AP75 (VOC07 11-point)", "VOC07_AP": "AP (VOC07 11-point, .50:.95)",
}


def print_table(results: dict[str, Any]) -> None:
    s = results["settings"]
    print(f"\ndetection: {results['checkpoint']['arch']} from {results['checkpoint']['path']} on {s['splits']}")
    print(f"{s['engine']} {s['model']}, {s['iterations']} iterations, batch {s['batch_size']}, lr {s['lr']}, "
          f"test size {s['test_size']}, {s['test_images']} test images")
    width = max(len(v) for v in LABELS.values()) + 2
    print(f"{'metric':<{width}}{'value':>8}")
    for key, label in LABELS.items():
        if key in results["metrics"]:
            value = results["metrics"][key]
            print(f"{label:<{width}}{'n/a' if value is None else f'{value:.2f}':>8}")


def detect(config: DetectionConfig) -> dict[str, Any] | None:
    """Run the protocol of ``config``; returns what ``results.json`` holds (``None`` on DDP ranks other than 0)."""
    config = resolve_config(config)
    engine = select_engine(config.engine)
    plan = schedule(config)
    started = time.time()
    checkpoint = open_checkpoint(config)
    backbone = checkpoint.backbone
    data = read_detection_data(config.dataset, config.data)
    test = data.test[: config.max_eval_images] if config.max_eval_images else data.test
    run_dir = run_folder(config, "eval", f"detection-{Path(config.checkpoint).stem}-{config.dataset}")
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model_name = f"{'Mask' if config.masks else 'Faster'} R-CNN {config.head.upper() if _is_resnet(backbone) else 'last-map'}"
    if engine == "detectron2":
        save_config(config, run_dir / "config.yaml")
        metrics = run_detectron2(config, plan, backbone, data, test, run_dir)
        iterations, rank = plan["max_iter"], 0
        train_time = time.time() - started
    else:
        device, world, rank = _device(config)
        random.seed(config.seed + rank)
        if rank == 0:
            save_config(config, run_dir / "config.yaml")
        model = build_detector(backbone, len(data.classes) + 1, config.head, bool(config.masks), plan, config.roi_per_image).to(device)
        if world > 1:
            if device.type == "cuda":  # torch's SyncBatchNorm runs on GPUs only
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        iterations = train_torchvision(model, data, config, plan, run_dir, device, world, rank)
        train_time = time.time() - started
        if world > 1:
            torch.distributed.barrier()
        metrics = evaluate_predictions(predict_torchvision(_unwrap(model), test, config, device), data, test, bool(config.masks)) if rank == 0 else {}
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank != 0:
        return None
    settings = {"dataset": config.dataset, "splits": data.description, "engine": engine, "model": model_name, "head": config.head,
                "masks": config.masks, "batch_size": config.batch_size, "lr": config.lr, "momentum": config.momentum,
                "weight_decay": config.weight_decay, "roi_per_image": config.roi_per_image, "precision": config.precision,
                "iterations": iterations, "train_images": sum(1 for r in data.train if len(r.boxes)), "test_images": len(test),
                "train_seconds": round(train_time, 1), **plan}
    primary = "VOC07_AP50" if config.dataset == "voc" else "AP"  # the headline numbers of MoCo's and SEED's tables
    results = write_results(run_dir, "detection", metrics, primary, config, checkpoint, settings, time.time() - started)
    print_table(results)
    print(f"\nrun folder: {run_dir} (results.json, config.yaml{', last.pt' if engine == 'torchvision' else ', detectron2/'})")
    return results


DESCRIPTION = ("Fine-tune a checkpoint's backbone for object detection (MoCo's protocol: Faster R-CNN C4 on VOC07+12, "
               "Mask R-CNN C4 on COCO) and report COCO AP/AP50/AP75 and VOC07 AP50.")


def main(argv: list[str] | None = None) -> None:
    """``seed-eval detection ARGS``: ``argv`` without the word ``detection``."""
    run_cli(PROG, lambda args: detect(load_config(DetectionConfig, args, PROG, DESCRIPTION)), argv)


if __name__ == "__main__":
    main()
