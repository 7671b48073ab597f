"""The command: read the data, open the checkpoint, train with the chosen engine, score, write ``results.json``."""

import random
import time
from pathlib import Path
from typing import Any

import torch

from downstream.common import open_checkpoint, write_results
from downstream.detection.config import PROG, DetectionConfig, resolve_config, schedule, select_engine
from downstream.detection.d2 import run_detectron2
from downstream.detection.data import read_detection_data
from downstream.detection.metrics import evaluate_predictions
from downstream.detection.models import build_detector, detector_name, is_resnet
from downstream.detection.train import predict_torchvision, train_torchvision
from downstream.features import eval_device
from seed.cli import run_cli
from seed.config import load_config, save_config
from seed.engine import run_folder
from seed.errors import SeedError


def check_engine_flags(config: DetectionConfig, engine: str) -> None:
    """What the chosen engine cannot do stops here, in one line, before any data is read."""
    if engine == "detectron2" and config.resume not in ("auto", "never"):
        raise SeedError(f"--resume {config.resume}: the detectron2 engine resumes from its own run folder only; use auto or never")
    if config.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise SeedError(f"--accelerator {config.accelerator}: no CUDA GPU is visible; use --accelerator cpu")


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
    check_engine_flags(config, engine)
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
    model_name = detector_name(backbone, config.head, bool(config.masks))
    if engine == "detectron2":
        save_config(config, run_dir / "config.yaml")
        metrics = run_detectron2(config, plan, backbone, data, test, run_dir)
        iterations = plan["max_iter"]
        train_time = time.time() - started
    else:
        if not is_resnet(backbone) and config.head == "c4":
            print(f"note: {checkpoint.arch} has no res5 to put in the RoI head (--head c4): it detects on its last feature map "
                  f"({model_name}); --head fpn gives it a feature pyramid")
        detector = build_detector(backbone, len(data.classes) + 1, config.head, bool(config.masks), plan, config.roi_per_image)
        trainer = train_torchvision(detector, data, config, plan, run_dir)
        if not trainer.is_global_zero:  # DDP: rank 0 alone scores the trained detector
            return None
        save_config(config, run_dir / "config.yaml")  # the flags as given, not the engine's copy (its epochs, max_steps, precision derived from them)
        iterations, train_time = trainer.global_step, time.time() - started
        device = eval_device(config)
        predictions = predict_torchvision(trainer.lightning_module.detector.to(device), test, config, device)
        metrics = evaluate_predictions(predictions, data, test, bool(config.masks))
    settings = {"dataset": config.dataset, "splits": data.description, "engine": engine, "model": model_name, "head": config.head,
                "masks": config.masks, "batch_size": config.batch_size, "lr": config.lr, "momentum": config.momentum,
                "weight_decay": config.weight_decay, "roi_per_image": config.roi_per_image, "precision": config.precision,
                "iterations": iterations, "train_images": sum(1 for r in data.train if len(r.boxes)), "test_images": len(test),
                "train_seconds": round(train_time, 1), **plan}
    primary = "VOC07_AP50" if config.dataset == "voc" else "AP"  # the headline numbers of MoCo's and SEED's tables
    results = write_results(run_dir, "detection", metrics, primary, config, checkpoint, settings, time.time() - started)
    print_table(results)
    print(f"\nrun folder: {run_dir} (results.json, config.yaml{', last.ckpt, logs/' if engine == 'torchvision' else ', detectron2/'})")
    return results


DESCRIPTION = ("Fine-tune a checkpoint's backbone for object detection (MoCo's protocol: Faster R-CNN C4 on VOC07+12, "
               "Mask R-CNN C4 on COCO) and report COCO AP/AP50/AP75 and VOC07 AP50.")


def main(argv: list[str] | None = None) -> None:
    """``seed-eval detection ARGS``: ``argv`` without the word ``detection``."""
    run_cli(PROG, lambda args: detect(load_config(DetectionConfig, args, PROG, DESCRIPTION)), argv)


if __name__ == "__main__":
    main()

