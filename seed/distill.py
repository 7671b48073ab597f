"""SEED: self-supervised distillation (Fang et al., ICLR 2021).

One augmented view goes to a frozen teacher and to the student; the student
learns to reproduce the teacher's similarity distribution over a FIFO queue of
teacher embeddings (``seed.losses.seed_loss``). The queue is updated after the
optimiser step, so the loss reads the bank without copying it.

Where the paper leaves it open, the official code (jacobswan1/SEED) decides:
the view recipe follows the teacher's method (``--augmentation``), MobileNetV3
and EfficientNet students drop out their features before the head, the lr warms
up from ``base_lr`` for 5 epochs, and the small-crop queue takes one patch per image.

Beyond the paper, ``--teacher-cache`` takes the teacher out of the loop after the first
``--cache-views`` epochs (``seed.teacher_cache``).
"""

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from seed.checkpoints import load_encoder, read_checkpoint
from seed.classifiers import hub_file
from seed.config import DistillConfig, option
from seed.data import seed_view_transform, small_crop_transforms
from seed.engine import data_name
from seed.errors import SeedError
from seed.knn import compare_knn, print_knn_table, random_inits
from seed.losses import seed_loss
from seed.models import is_external, teacher_input, with_input
from seed.module import TrainModule
from seed.precision import use_channels_last
from seed.queue import TeacherQueue, check_queue_size
from seed.teacher import FrozenTeacher
from seed.teacher_cache import CachedTeacher, TeacherCache, cache_for, train_views

DEMO_TEACHER = Path("runs/demo/pretrain/teacher.pt")


@dataclasses.dataclass
class SEEDConfig(DistillConfig):
    """``seed-distill --mode seed``."""

    teacher: str | None = option("teacher backbone: ours (r50), timm:NAME (timm:vit_small_patch14_dinov2.lvd142m) or tv:NAME "
                                 "(tv:resnet50) (default: the one recorded in our checkpoints)")
    teacher_checkpoint: str | None = option("teacher weights: ours (.ckpt/.pt), MoCo, SimCLR, SwAV, SEED, torchvision or timm (.pth/.safetensors) files "
                                              "(default: the hub's weights of a timm:/tv: --teacher, else the demo teacher, runs/demo/pretrain/teacher.pt)")
    teacher_head: bool | None = option("use the teacher's projection head (default: when the checkpoint has one, as SEED does)")
    queue_size: int = option("SEED queue length K (teacher embeddings)", 65536, at_least=1)
    tau_s: float = option("student temperature", 0.2, above=0)
    tau_t: float = option("teacher temperature (1e-4: near one-hot, the official code's)", 1e-4, above=0)
    small_crops: int = option("SwAV-style extra small crops per image, with their own queue (0: off; the paper's variant uses 6)", 0, at_least=0)
    augmentation: Literal["mocov2", "mocov1", "swav"] | None = option(
        "SEED's view recipe: mocov2, mocov1 or swav (default: the official code's for the teacher's method: "
        "swav for SwAV teachers, mocov1 for SimCLR ones, else mocov2)")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, start: float) -> float:
    """The lr factor at ``step``: linear from ``start`` to 1 over ``warmup_steps``, then lightly's cosine from 1 to 0.

    SEED's official schedule (``tools/utils.py:adjust_learning_rate``) warms up
    for 5 epochs from 0.03 to 0.03 x B/256, one step per epoch; here the ramp
    is per optimiser step. Without warm-up this is the cosine every method uses.
    """
    if step < warmup_steps:
        return start + (1.0 - start) * step / warmup_steps
    return cosine_schedule(step - warmup_steps, total_steps - warmup_steps, 1.0, 0.0)


class SEED(CachedTeacher, TrainModule):
    """Student backbone + MLP head trained with SEED's loss against a frozen teacher."""

    STAGE, TITLE, CONFIG, TEACHERS = "distill", "SEED", SEEDConfig, "teacher"
    DEFAULTS = {"optimizer": "sgd", "base_lr": 0.03, "weight_decay": 1e-4, "warmup_epochs": 5.0}

    def __init__(self, config: SEEDConfig, teacher: FrozenTeacher, num_classes: int, cache: TeacherCache | None = None) -> None:
        super().__init__(config, config.student, num_classes)
        dim = self.backbone.feature_dim
        # the official MobileNetV3/EfficientNet students keep their Dropout(0.2) between the features and the (MLP) fc
        rate = self.backbone.feature_dropout
        self.dropout = nn.Dropout(rate) if rate > 0 else nn.Identity()
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, teacher.embed_dim))
        self.teacher = teacher
        self.queue = TeacherQueue(config.queue_size, teacher.embed_dim)
        self.small_queue = TeacherQueue(config.queue_size, teacher.embed_dim) if config.small_crops else None
        self.cache = cache  # --teacher-cache: batches are FixedCrops items
        self._pending: list[tuple[TeacherQueue, Tensor]] = []

    # ---- the runner's view (seed.runner.run) ----
    @classmethod
    def configure(cls, config: SEEDConfig) -> SEEDConfig:
        """Defaults, checks, and the view recipe of the teacher's method (its file names it; no model is built yet)."""
        config = super().configure(config)
        check_queue_size(config.queue_size, config.batch_size * config.devices * config.num_nodes, "SEED")
        if config.teacher_cache and config.small_crops:
            raise SeedError("--teacher-cache keeps fixed views, --small-crops draws new patches every step; drop one of them")
        checkpoint = default_teacher_checkpoint(config)
        if config.augmentation is None:
            config = dataclasses.replace(config, augmentation=default_augmentation(read_checkpoint(checkpoint)["format"]))
        return dataclasses.replace(config, teacher_checkpoint=checkpoint)

    @classmethod
    def train_set(cls, config: SEEDConfig) -> Dataset:
        return train_views(config, train_transform(config))

    @classmethod
    def prepare(cls, config: SEEDConfig, train_set: Dataset) -> tuple[SEEDConfig, dict[str, Any]]:
        teacher, found = build_teacher(config, config.teacher_checkpoint)
        print(f"teacher: {config.teacher_checkpoint} ({found}, {teacher.embed_dim}-d embeddings); views: --augmentation {config.augmentation}")
        return config, {"teacher": teacher, "images": len(train_set)}

    @classmethod
    def run_name(cls, config: SEEDConfig, parts: dict[str, Any]) -> str:
        return f"seed-{Path(config.teacher_checkpoint).stem}-{config.student}-{data_name(config)}"

    @classmethod
    def build(cls, config: SEEDConfig, parts: dict[str, Any], num_classes: int, run_dir: Path) -> "SEED":
        teacher = parts["teacher"]
        cache = cache_for(config, run_dir, [(config.teacher, config.teacher_checkpoint)], teacher.channels_last, ("teacher_head", "augmentation"),
                          parts["images"], teacher.embed_dim)
        return cls(config, teacher, num_classes=num_classes, cache=cache)

    def exported(self, settled: nn.Sequential) -> tuple[nn.Module, int, None]:
        return settled[1], self.teacher.embed_dim, None

    def report(self, settled: nn.Sequential, monitor: list[DataLoader], run_dir: Path) -> None:
        """The kNN table of teacher, random-init student and distilled student."""
        config = self.config
        scores = compare_knn({
            f"teacher {self.teacher.arch}": with_input(load_encoder(config.teacher_checkpoint, config.teacher, False)[0]),
            f"student {config.student} random init": random_inits(config.student, bool(config.small_images)),
            f"student {config.student} distilled": settled[0],
        }, config, self.num_classes, monitor)
        print_knn_table(scores, config, run_dir)

    def embed(self, images: Tensor) -> Tensor:
        """The student's L2-normalised embedding."""
        return F.normalize(self.head(self.dropout(self.backbone(images))), dim=1)

    def seed_step(self, images: Tensor, teacher: Tensor, queue: TeacherQueue, enqueue: int | None = None) -> Tensor:
        """SEED's loss for one batch of views and their ``teacher`` embeddings; the first ``enqueue`` of these (all by
        default) wait to be enqueued."""
        loss = seed_loss(self.embed(images), teacher, queue.bank, self.config.tau_s, self.config.tau_t)
        self._pending.append((queue, teacher[:enqueue]))
        return loss

    def training_step(self, batch: tuple[Any, ...], batch_idx: int) -> Tensor:
        if self.cache is not None:  # FixedCrops items (view, label, index, view number); no small crops (configure)
            images, _, index, view = batch
            # a batch with a miss runs the teacher on the whole batch, as without the cache; every step reads the fp16 rows
            teacher = self.cached(index, view, lambda miss: self.teacher(images)[miss])
            loss = self.seed_step(images, teacher, self.queue)
        else:
            views, _ = batch
            big, *small = views if isinstance(views, (list, tuple)) else [views]
            loss = self.seed_step(big, self.teacher(big), self.queue)
            if small:
                # crop-major rows: the first len(big) are each image's first small crop, the one patch per image
                # the official code enqueues (small_patch_builder.py), so the queue does not fill with near-duplicates
                crops = torch.cat(small)
                loss = loss + self.seed_step(crops, self.teacher(crops), self.small_queue, enqueue=len(big))
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        """The base's optimiser with SEED's schedule: warm-up from ``base_lr`` (the lr of 256 images) to the
        scaled lr over ``warmup_epochs`` (5), then cosine; nothing to warm up when the batch does not raise the lr."""
        setup = super().configure_optimizers()
        peak = self.lr()
        start = min(self.config.base_lr, peak) / peak
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(int(self.config.warmup_epochs * self.trainer.num_training_batches), total) if start < 1.0 else 0
        schedule = LambdaLR(setup["optimizer"], partial(warmup_cosine, warmup_steps=warmup, total_steps=total, start=start))
        return {**setup, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The step, then the enqueue: before any callback (``last.ckpt``) sees the queue."""
        super().optimizer_step(*args, **kwargs)
        for queue, teacher in self._pending:
            queue.enqueue(teacher)
        self._pending.clear()



def default_teacher_checkpoint(config: SEEDConfig) -> str:
    """``--teacher-checkpoint``, else the hub's weights of a timm or torchvision ``--teacher`` (saved as a file, needs
    internet the first time), else the demo's teacher when ``make demo`` made one."""
    if config.teacher_checkpoint:
        return config.teacher_checkpoint
    if config.teacher and is_external(config.teacher):
        return hub_file(config.teacher, "pass the weights' file in --teacher-checkpoint")
    if DEMO_TEACHER.is_file():
        return str(DEMO_TEACHER)
    raise SeedError(f"no --teacher-checkpoint given and no demo teacher at {DEMO_TEACHER}; pass one, or run seed-pretrain --config configs/demo/pretrain.yaml")


def default_augmentation(found: str) -> str:
    """The official code's view recipe for a teacher (its ``main.py``): SwAV's for SwAV teachers, MoCo v1's for
    SimCLR ones, MoCo v2's otherwise. ``found`` is the checkpoint's format name, which names the method."""
    name = found.lower()
    if "swav" in name:
        return "swav"
    return "mocov1" if "simclr" in name else "mocov2"


def train_transform(config: SEEDConfig) -> Any:
    """One view by ``--augmentation``; with ``--small-crops N`` also N small patches (1 + N views)."""
    view = seed_view_transform(config.augmentation or "mocov2", config.image_size, config.crop_min_scale)
    if not config.small_crops:
        return view
    return MultiViewTransform([view, *small_crop_transforms(config.image_size, config.small_crops)])


def build_teacher(config: SEEDConfig, checkpoint: str) -> tuple[FrozenTeacher, str]:
    """The frozen teacher; a timm one reads the student's crop resized and renormalised to its own input
    (:func:`seed.models.teacher_input`)."""
    backbone, head, found = load_encoder(checkpoint, config.teacher, config.teacher_head)
    return FrozenTeacher(backbone, head, fold_bn=config.teacher_fold_bn, channels_last=use_channels_last(config), inputs=teacher_input(backbone)), found
