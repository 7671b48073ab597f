"""The torchvision engine's training loop (MoCo's schedule: warm-up, lr steps; AMP, DDP, ``last.pt`` resume) and its predictions."""

import bisect
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from downstream.detection.config import LAST, DetectionConfig
from downstream.detection.data import DetectionData, DetectionDataset, Record, collate
from downstream.detection.models import parameter_groups
from seed.checkpoints import atomic_save, load_file
from seed.errors import SeedError
from seed.loaders import default_workers


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
            state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "iteration": done}
            atomic_save(state, run_dir / LAST)
    progress.close()
    return stop


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _resume(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, run_dir: Path) -> int:
    """Continue from the run folder's ``last.pt``; returns the iteration it stopped at (0 when there is none)."""
    path = run_dir / LAST
    if not path.is_file():
        return 0
    state = load_file(path)
    try:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, RuntimeError, ValueError):
        raise SeedError(f"{path} holds a different detector (another --head, --masks, --dataset or checkpoint architecture); "
                        "pass --resume never or another --output") from None
    print(f"resuming from {path} (iteration {state['iteration']})")
    return int(state["iteration"])


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

