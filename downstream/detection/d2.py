"""The detectron2 engine: the backbone converted to detectron2's names, MoCo's config values, ``DefaultTrainer`` in a worker."""

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from downstream.detection.config import DETECTRON2_DEPTH, DetectionConfig
from downstream.detection.data import DetectionData, Record
from downstream.detection.metrics import evaluate_predictions
from downstream.detection.train import prediction
from seed.errors import SeedError
from seed.loaders import default_workers


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
                self.predictions.append(prediction(sample["image_id"], found.pred_boxes.tensor, found.scores, found.pred_classes + 1, masks))

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

