"""SEED: self-supervised distillation (Fang et al., ICLR 2021).

One augmented view goes to a frozen teacher and to the student; the student
learns to reproduce the teacher's similarity distribution over a FIFO queue of
teacher embeddings (``seed.losses.seed_loss``). The queue is updated after the
optimiser step, so the loss reads the bank without copying it.
"""

import dataclasses
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightly.transforms import SwaVTransform
from torch import Tensor, nn

from seed.backbones import create_backbone, feature_dim
from seed.checkpoints import export_model, load_encoder
from seed.config import DistillConfig, resolve
from seed.data import dataset_for, single_view_transform
from seed.engine import check_batch, data_name, fit, make_loader, monitor_loaders, run_folder
from seed.errors import SeedError
from seed.knn import compare_knn, print_knn_table
from seed.losses import seed_loss
from seed.module import TrainModule
from seed.queue import TeacherQueue
from seed.teacher import FrozenTeacher

DEMO_TEACHER = Path("runs/demo/pretrain/teacher.pt")


class SEED(TrainModule):
    """Student backbone + MLP head trained with SEED's loss against a frozen teacher."""

    DEFAULTS = {"optimizer": "sgd", "base_lr": 0.03, "weight_decay": 1e-4, "warmup_epochs": 0.0}

    def __init__(self, config: DistillConfig, teacher: FrozenTeacher, num_classes: int) -> None:
        super().__init__(config, config.student, num_classes)
        dim = self.backbone.feature_dim
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, teacher.embed_dim))
        self.teacher = teacher
        self.queue = TeacherQueue(config.queue_size, teacher.embed_dim)
        self.small_queue = TeacherQueue(config.queue_size, teacher.embed_dim) if config.small_crops else None
        self.strict_loading = False  # the teacher is rebuilt from its own file, not stored in ours
        self._pending: list[tuple[TeacherQueue, Tensor]] = []

    def embed(self, images: Tensor) -> Tensor:
        """The student's L2-normalised embedding."""
        return F.normalize(self.head(self.backbone(images)), dim=1)

    def seed_step(self, images: Tensor, queue: TeacherQueue) -> Tensor:
        """SEED's loss for one batch of views; the teacher embeddings wait to be enqueued."""
        teacher = self.teacher(images)
        loss = seed_loss(self.embed(images), teacher, queue.bank, self.config.tau_s, self.config.tau_t)
        self._pending.append((queue, teacher))
        return loss

    def training_step(self, batch: tuple[Any, Tensor], batch_idx: int) -> Tensor:
        views, _ = batch
        big, *small = views if isinstance(views, (list, tuple)) else [views]
        loss = self.seed_step(big, self.queue)
        if small:
            loss = loss + self.seed_step(torch.cat(small), self.small_queue)
        self.log("loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The step, then the enqueue: before any callback (``last.ckpt``) sees the queue."""
        super().optimizer_step(*args, **kwargs)
        for queue, teacher in self._pending:
            queue.enqueue(teacher)
        self._pending.clear()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}


def default_teacher_checkpoint(config: DistillConfig) -> str:
    """``--teacher-checkpoint``, else the demo's teacher when ``make demo`` made one."""
    if config.teacher_checkpoint:
        return config.teacher_checkpoint
    if DEMO_TEACHER.is_file():
        return str(DEMO_TEACHER)
    raise SeedError(f"no --teacher-checkpoint given and no demo teacher at {DEMO_TEACHER}; pass one, or run seed-pretrain --config configs/demo/pretrain.yaml")


def check_config(config: DistillConfig) -> None:
    """Mistakes that would otherwise surface deep inside training."""
    for name in ("tau_s", "tau_t"):
        if getattr(config, name) <= 0:
            raise SeedError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    global_batch = config.batch_size * config.devices * config.num_nodes
    if config.queue_size < global_batch:
        raise SeedError(f"--queue-size {config.queue_size} is smaller than the global batch {global_batch}; use K >= batch (SEED uses 65536)")
    feature_dim(config.student)  # unknown names fail here, before any data is read


def train_transform(config: DistillConfig) -> Any:
    """One MoCo v2 view; with ``--small-crops N`` lightly's SwAV multi-crop (1 big + N small)."""
    if not config.small_crops:
        return single_view_transform("mocov2", config.image_size, min_scale=config.crop_min_scale)
    small = max(round(config.image_size * 96 / 224), 8)
    return SwaVTransform(crop_sizes=(config.image_size, small), crop_counts=(1, config.small_crops),
                         crop_min_scales=(0.14, 0.05), crop_max_scales=(1.0, 0.14), gaussian_blur=0.5 if config.image_size >= 96 else 0.0)


def build_teacher(config: DistillConfig, checkpoint: str) -> tuple[FrozenTeacher, str]:
    backbone, head, found = load_encoder(checkpoint, config.teacher, config.teacher_head)
    channels_last = config.channels_last if config.channels_last is not None else torch.cuda.is_available()
    return FrozenTeacher(backbone, head, fold_bn=config.teacher_fold_bn, channels_last=channels_last), found


def distill(config: DistillConfig) -> Path:
    """Run SEED as ``config`` says; returns the run folder."""
    config = resolve(config, SEED.DEFAULTS)
    check_config(config)
    checkpoint = default_teacher_checkpoint(config)
    train_set = dataset_for(config, "train", train_transform(config))
    check_batch(len(train_set), config)
    monitor = monitor_loaders(config)
    teacher, found = build_teacher(config, checkpoint)
    print(f"teacher: {checkpoint} ({found}, {teacher.embed_dim}-d embeddings)")
    pl.seed_everything(config.seed, workers=True, verbose=False)
    run_dir = run_folder(config, "distill", f"seed-{Path(checkpoint).stem}-{config.student}-{data_name(config)}")
    module = SEED(config, teacher, num_classes=len(train_set.classes))
    trainer = fit(module, make_loader(train_set, config, shuffle=True, drop_last=True), monitor, config, run_dir)
    if trainer.is_global_zero:
        export_model(run_dir / "student.pt", config.student, module.backbone, module.head, teacher.embed_dim, "seed",
                     dataclasses.asdict(config), bool(config.small_images))
        torch.manual_seed(config.seed)
        scores = compare_knn({
            f"teacher {teacher.arch}": load_encoder(checkpoint, config.teacher, False)[0],
            f"student {config.student} random init": create_backbone(config.student, small_images=bool(config.small_images)),
            f"student {config.student} distilled": module.backbone,
        }, config, len(train_set.classes), monitor)
        print_knn_table(scores, config, run_dir)
        print(f"\nrun folder: {run_dir} (student.pt, last.ckpt, config.yaml, logs/)")
    return run_dir


def main(config: DistillConfig) -> Path | None:
    """``seed-distill --mode seed``."""
    return distill(config)
