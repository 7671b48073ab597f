"""USI: one knowledge-distillation recipe that trains any backbone (Ridnik et al. 2022, "Solving ImageNet: a Unified
Scheme for Training any Backbone to Top Results"; code: Alibaba-MIIL/Solving_ImageNet, ``train.py``).

The student learns from the labels, mixed by Mixup/CutMix, and from a frozen classifier that sees the same mixed
images: ``seed.losses.usi_loss``, cross-entropy to the mixed labels plus ``kd_weight`` (5) x KL to the teacher's
softmax at temperature 1. The recipe is the same for every student: AdamW lr 2e-3 and weight decay 2e-2 (none on
biases and norms), a cosine from a 5-epoch warm-up, RandAugment ``rand-m7-mstd0.5-inc1``, no label smoothing, and an
EMA of the weights (0.99996) kept when it validates better. timm carries Mixup, RandAugment, the EMA and the
parameter groups (the ``timm`` extra).

Repeated augmentation (x3) runs under DDP, as in the code (``seed.sampling.EpochSampler``); left out of its recipe are
the 10 cool-down epochs at the minimum lr and the epoch's rounding to multiples of 256 images.
The lr does not follow the batch: the paper found 2e-3 right from 512 to 3456 images per step (the code's batch is
128 per GPU on 8 GPUs), so ``--lr`` is 2e-3 whatever ``--batch-size``.
"""

import dataclasses
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from seed.classification import Top1Monitor, report_top1, top1, top1_meter
from seed.classifiers import load_teacher
from seed.config import ClassifierDistillConfig, option
from seed.errors import SeedError
from seed.loaders import train_eval_loader
from seed.losses import usi_loss
from seed.models import timm_module
from seed.module import TrainModule, precise_bn
from seed.teacher_cache import CachedTeacher, TeacherCache, cache_for, train_views


@dataclasses.dataclass
class USIConfig(ClassifierDistillConfig):
    """``seed-distill --mode usi``."""

    teacher: str | None = option("teacher classifier: ours (r50), timm:NAME or tv:NAME (default: the architecture recorded in "
                                 "--teacher-checkpoint; the paper's is TResNet-L, timm:tresnet_l)")
    teacher_checkpoint: str | None = option("teacher weights: a classifier of ours (seed-pretrain --method supervised, or a MEAL V2 / USI "
                                            "student.pt), torchvision's or timm's file (.pth/.safetensors); none: the hub's ImageNet weights of --teacher")
    kd_weight: float = option("weight of the KD term (the paper's alpha_kd; 5 is best in its ablation)", 5.0, at_least=0)
    kd_only: bool = option("the KD term alone, no cross-entropy to the labels (the code's --use_kd_only_loss)", False)
    mixup_alpha: float = option("Mixup's Beta(alpha, alpha) (0: off)", 0.8, at_least=0)
    cutmix_alpha: float = option("CutMix's Beta(alpha, alpha) (0: off)", 1.0, at_least=0)
    mix_switch_prob: float = option("chance that a batch takes CutMix instead of Mixup when both are on", 0.5, at_least=0, at_most=1)
    rand_augment: str = option("timm's RandAugment recipe ('none': off)", "rand-m7-mstd0.5-inc1")
    repeated_augmentation: int = option("under DDP, each image comes back this many times in an epoch, on other devices and under "
                                        "other augmentations (repeated augmentation, the code's 3; 1: off); on one device it does nothing",
                                        3, at_least=1)
    ema_decay: float = option("decay of the weights' EMA, which is exported when it validates better (0: no EMA)", 0.99996, at_least=0, at_most=1)
    warmup_lr: float = option("lr at the start of the warm-up", 1e-4, above=0)
    min_lr: float = option("lr at the end of the cosine", 1e-6, at_least=0)


def usi_transform(config: USIConfig) -> T.Compose:
    """The code's train views: RandomResizedCrop (bicubic) + flip + RandAugment, ImageNet normalisation."""
    from timm.data.auto_augment import rand_augment_transform

    mean, std = IMAGENET_NORMALIZE["mean"], IMAGENET_NORMALIZE["std"]
    crop = T.RandomResizedCrop(config.image_size, scale=(config.crop_min_scale or 0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    augment = [] if config.rand_augment == "none" else [rand_augment_transform(
        config.rand_augment, {"translate_const": int(config.image_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)})]
    return T.Compose([crop, T.RandomHorizontalFlip(), *augment, T.ToTensor(), T.Normalize(mean=mean, std=std)])


def warmup_cosine_lr(step: int, warmup: int, total: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """The lr factor (of ``lr``) at ``step``: linear from ``warmup_lr`` over ``warmup`` steps, then a cosine to ``min_lr``."""
    if step < warmup:
        return (warmup_lr + (lr - warmup_lr) * step / warmup) / lr
    progress = (step - warmup) / max(total - warmup, 1)
    return (min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))) / lr


class USI(CachedTeacher, Top1Monitor, TrainModule):
    """Student classifier (backbone + Linear) trained on mixed labels and a frozen teacher's softmax."""

    STAGE, TITLE, CONFIG, TEACHERS, CLASSIFIER = "distill", "USI", USIConfig, "teacher", True
    DEFAULTS = {"lr": 2e-3, "weight_decay": 2e-2, "warmup_epochs": 5.0}

    # ---- the runner's view (seed.runner.run) ----
    @classmethod
    def configure(cls, config: USIConfig) -> USIConfig:
        timm_module()  # the recipe's parts are timm's: say so before anything is read
        config = super().configure(config)
        if config.optimizer is not None:
            raise SeedError(f"--optimizer {config.optimizer}: USI trains with AdamW, its recipe's; leave --optimizer out")
        if not (config.teacher or config.teacher_checkpoint):
            raise SeedError("USI needs a teacher classifier: pass --teacher-checkpoint (seed-pretrain --method supervised makes one) "
                            "or --teacher timm:NAME for its hub weights")
        if config.kd_only and config.kd_weight == 0:
            raise SeedError("--kd-only with --kd-weight 0 leaves no loss; give --kd-weight a positive weight or drop --kd-only")
        if config.teacher_cache and config.kd_weight == 0:
            raise SeedError("--teacher-cache with --kd-weight 0 would fill a cache of teacher outputs that no loss reads; drop --teacher-cache")
        if config.teacher_cache and (config.mixup_alpha or config.cutmix_alpha):
            raise SeedError("--teacher-cache keeps fixed views, Mixup and CutMix mix new images every step; "
                            "pass --mixup-alpha 0 --cutmix-alpha 0 or drop --teacher-cache")
        if config.teacher_cache and config.repeated_augmentation > 1 and config.devices * config.num_nodes > 1:
            raise SeedError("--teacher-cache keeps fixed views, repeated augmentation draws several views of an image per epoch; "
                            "pass --repeated-augmentation 1 or drop --teacher-cache")
        if (config.mixup_alpha or config.cutmix_alpha) and config.batch_size % 2:
            raise SeedError(f"--batch-size {config.batch_size}: Mixup and CutMix pair the images of a batch, so it must be even")
        return config

    @classmethod
    def repeats(cls, config: USIConfig) -> int:
        return config.repeated_augmentation

    @classmethod
    def train_set(cls, config: USIConfig) -> Dataset:
        return train_views(config, usi_transform(config))

    @classmethod
    def prepare(cls, config: USIConfig, train_set: Dataset) -> tuple[USIConfig, dict[str, Any]]:
        teacher, found = load_teacher(config.teacher, config.teacher_checkpoint, config)
        print(f"teacher: {teacher.arch} from {config.teacher_checkpoint or 'hub weights'} ({found}, {teacher.embed_dim} classes)")
        if len(train_set.classes) != teacher.embed_dim:
            raise SeedError(f"--data {config.data} has {len(train_set.classes)} classes, the teacher {teacher.embed_dim}; distil on the teacher's classes")
        return config, {"teacher": teacher, "images": len(train_set)}

    @classmethod
    def classes(cls, train_set: Dataset, parts: dict[str, Any]) -> int:
        return parts["teacher"].embed_dim

    @classmethod
    def build(cls, config: USIConfig, parts: dict[str, Any], num_classes: int, run_dir: Path) -> "USI":
        teacher = parts["teacher"]
        cache = cache_for(config, run_dir, [(config.teacher, config.teacher_checkpoint)], teacher.channels_last, ("rand_augment",),
                          parts["images"], num_classes, config.cache_top_k)
        return cls(config, teacher, num_classes, cache=cache)

    def __init__(self, config: USIConfig, teacher: nn.Module, num_classes: int, cache: TeacherCache | None = None) -> None:
        super().__init__(config, config.student, num_classes)
        timm = timm_module()
        self.head = nn.Linear(self.backbone.feature_dim, num_classes)
        self.teacher = teacher
        mixing = config.mixup_alpha > 0 or config.cutmix_alpha > 0
        self.mixup = timm.data.Mixup(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha, switch_prob=config.mix_switch_prob,
                                     label_smoothing=0.0, num_classes=num_classes) if mixing else None
        self.ema = timm.utils.ModelEmaV2(nn.Sequential(self.backbone, self.head), decay=config.ema_decay) if config.ema_decay > 0 else None
        if self.ema is not None:
            self.ema.requires_grad_(False)
        self.kept = "model"
        self.cache = cache  # --teacher-cache: batches are FixedCrops items
        self.val_top1 = top1_meter(num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        images, labels = batch[:2]
        if self.mixup is not None:
            images, target = self.mixup(images, labels)
        else:
            target = F.one_hot(labels, self.num_classes).float()
        if self.cache is not None:  # FixedCrops items (view, label, index, view number), no mixing: the teacher's softmax, cached
            probabilities = self.cached(batch[2], batch[3], lambda miss: F.softmax(self.teacher(images[miss]).float(), dim=1))
            teacher = probabilities.clamp_min(1e-6).log()  # logits whose softmax is the cached row
        elif self.config.kd_weight == 0:  # USI's own control, the recipe without KD: no teacher to run
            teacher = None
        else:
            with torch.no_grad():
                teacher = self.teacher(images)
        loss = usi_loss(self(images), teacher, target, self.config.kd_weight, self.config.kd_only)
        self.log("loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The step, then the EMA's update: before any callback (``last.ckpt``) sees the EMA, so a resumed run keeps it exact."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(nn.Sequential(self.backbone, self.head))

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over timm's parameter groups (no weight decay on biases and norm weights), the lr per step."""
        groups = timm_module().optim.param_groups_weight_decay(nn.ModuleDict({"backbone": self.backbone, "head": self.head}),
                                                               self.config.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.lr())
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(int(self.config.warmup_epochs * self.trainer.num_training_batches), total)
        factor = partial(warmup_cosine_lr, warmup=warmup, total=total, lr=self.lr(), warmup_lr=min(self.config.warmup_lr, self.lr()),
                         min_lr=self.config.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, factor), "interval": "step"}}

    # ---- after training ----
    def final(self, monitor: list[DataLoader]) -> nn.Sequential:
        """The model or its EMA, whichever has the better top-1 on the monitor's val images (the code keeps the better
        of the two), with PreciseBN statistics."""
        bn_images = train_eval_loader(self.config, self.config.precise_bn_images)
        settled = self.settled_copy(bn_images)
        if self.ema is None:
            return settled
        ema_settled = precise_bn(self.ema.module, bn_images, self.config.precise_bn_images, self.device)
        scores = top1({"model": settled, "ema": ema_settled}, {}, monitor[0], str(self.device))
        self.kept = "ema" if scores["ema"] > scores["model"] else "model"
        print(f"kept: the {'EMA' if self.kept == 'ema' else 'model'} (val top-1 on {len(monitor[0].dataset)} images: "
              f"model {scores['model']:.2f}, EMA {scores['ema']:.2f})")
        return ema_settled if self.kept == "ema" else settled

    def exported(self, settled: nn.Sequential) -> tuple[nn.Module, int, dict[str, Any]]:
        """The classifier as the head, ``num_classes``, and which weights were kept."""
        head, classes, extra = super().exported(settled)
        return head, classes, {**extra, "kept": self.kept}

    def report(self, settled: nn.Sequential, monitor: list[DataLoader], run_dir: Path) -> None:
        report_top1({f"student {self.config.student} USI ({self.kept})": settled}, {f"teacher {self.teacher.arch}": self.teacher},
                    self.config, run_dir)

