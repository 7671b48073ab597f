"""The torchvision engine: the detector as a LightningModule trained by the one engine (``seed.engine.fit``: devices,
DDP, mixed precision, ``last.ckpt`` and resume, nan stop) on MoCo's schedule, and its predictions."""

import bisect
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pycocotools import mask as mask_utils
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from downstream.detection.config import DetectionConfig
from downstream.detection.data import DetectionData, DetectionDataset, Record, collate
from downstream.detection.models import parameter_groups
from seed.engine import fit
from seed.errors import SeedError
from seed.loaders import default_workers
from seed.sampling import EpochSampler, SeededSamples


def lr_factor(iteration: int, steps: list[int], warmup_iters: int) -> float:
    """detectron2's WarmupMultiStepLR: linear from 1/1000 over the warm-up, x0.1 at each step."""
    factor = 0.1 ** bisect.bisect_right(steps, iteration)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= 0.001 * (1 - alpha) + alpha
    return factor


class DetectionModule(pl.LightningModule):
    """A torchvision Faster / Mask R-CNN fine-tuned as detectron2 does: SGD with no weight decay on norm layers,
    the lr set per iteration by :func:`lr_factor`, the loss the sum of the detector's losses."""

    def __init__(self, detector: nn.Module, config: DetectionConfig, plan: dict[str, Any]) -> None:
        super().__init__()
        self.detector = detector
        self.lr, self.momentum, self.weight_decay = config.lr, config.momentum, config.weight_decay
        self.lr_steps, self.warmup_iters = plan["steps"], plan["warmup_iters"]

    def training_step(self, batch: tuple[list[Tensor], list[dict[str, Tensor]]], batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.detector(images, targets)
        loss = sum(losses.values())
        self.log_dict(losses, batch_size=len(images))
        self.log("loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(parameter_groups(self.detector, self.weight_decay), lr=self.lr, momentum=self.momentum)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: lr_factor(iteration, self.lr_steps, self.warmup_iters))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of another detector stops here with one line, before Lightning loads its weights."""
        shapes = {name: tuple(tensor.shape) for name, tensor in self.state_dict().items()}
        if {name: tuple(tensor.shape) for name, tensor in checkpoint["state_dict"].items()} != shapes:
            raise SeedError(f"{self.trainer.ckpt_path} holds a different detector (another --head, --masks, --dataset or checkpoint architecture); "
                            "pass --resume never or another --output")


def engine_precision(config: DetectionConfig) -> str:
    """detectron2's configs train in fp32, so ``auto`` is 32 here (the engine's ``auto`` would be bf16 on GPUs); mixed precision when asked."""
    on_gpu = config.accelerator != "cpu" and torch.cuda.is_available()
    if config.precision in ("auto", "32", "32-true"):
        return "32-true"
    if config.precision == "bf16-mixed" or (config.precision == "16-mixed" and on_gpu):
        return config.precision  # the engine refuses emulated bf16 (seed.precision.check_cpu_bf16)
    if config.precision == "16-mixed":
        raise SeedError("--precision 16-mixed needs a GPU (fp16 autocast with a gradient scaler); on the CPU use 32 (or bf16-mixed on a CPU with bf16 units)")
    raise SeedError(f"--precision {config.precision}: detection takes auto, 32, bf16-mixed or 16-mixed")


def train_loader(data: DetectionData, config: DetectionConfig) -> DataLoader:
    """The annotated training images, ``--batch-size`` per iteration over all devices. Their order and flips are functions of
    ``(seed, epoch, index)`` and the training size of each iteration comes from the engine's per-step seed, so a resumed run
    sees the batches an uninterrupted one does."""
    dataset = DetectionDataset([r for r in data.train if len(r.boxes)], train=True, masks=bool(config.masks))
    world = config.devices * config.num_nodes
    per_device = max(1, config.batch_size // world)
    if len(dataset) < per_device * world:
        raise SeedError(f"--batch-size {config.batch_size} exceeds the {len(dataset)} annotated training images; lower --batch-size")
    workers = default_workers(config)
    return DataLoader(SeededSamples(dataset, config.seed), batch_size=per_device, sampler=EpochSampler(len(dataset), config.seed, per_device),
                      collate_fn=collate, drop_last=True, num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())


def train_torchvision(detector: nn.Module, data: DetectionData, config: DetectionConfig, plan: dict[str, Any], run_dir: Path) -> pl.Trainer:
    """Fine-tune ``detector`` for the plan's iterations (fewer with ``--max-steps``) through the engine.

    The engine counts epochs too: the run is given enough of them to end at its last iteration.
    """
    precision = engine_precision(config)
    loader = train_loader(data, config)
    world = config.devices * config.num_nodes
    stop = min(plan["max_iter"], config.max_steps) if config.max_steps is not None else plan["max_iter"]
    batches_per_epoch = math.ceil(len(loader.dataset) / world) // loader.batch_size
    engine = dataclasses.replace(config, max_steps=stop, epochs=math.ceil(stop / batches_per_epoch), precision=precision)
    if world > 1 and config.accelerator != "cpu" and torch.cuda.is_available():  # torch's SyncBatchNorm runs on GPUs only
        detector = nn.SyncBatchNorm.convert_sync_batchnorm(detector)
    module = DetectionModule(detector, config, plan)
    module.train()  # the engine keeps the modes it finds; the checkpoint's backbone may come in eval mode
    return fit(module, loader, None, engine, run_dir)


def prediction(image_id: int, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None) -> dict[str, Any]:
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
            predictions.append(prediction(int(target["image_id"]), output["boxes"], output["scores"], output["labels"], masks))
    return predictions

