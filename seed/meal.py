"""MEAL V2: an ensemble of supervised teachers distilled into a student (Shen & Savvides 2020).

The target is the mean of the frozen teachers' softmax outputs; the student
minimises the soft cross-entropy to it (``seed.losses.soft_cross_entropy``),
never reading a hard label. A discriminator on the class outputs tells the
student's apart from the teachers' (``seed.losses.discriminator_loss``). As in
the public code, its loss is added to the KD loss and one SGD step updates
student and discriminator together, so both *minimise* the same BCE
(``--discriminator joint``); ``minimax`` reverses the gradient into the student,
the adversarial game the paper describes. The student starts from supervised
weights (``--student-init``): a good start is the point of the method.

Beyond the paper, ``--cache-teacher-logits`` stores the target of each image
under a fixed set of crops, so that later epochs run no teacher (as FKD does).
"""

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightly.utils.lars import LARS
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from seed.backbones import available, feature_dim
from seed.classification import Top1Monitor, cutmix, report_top1, top1_meter, train_transform
from seed.classifiers import TORCHVISION_NAMES, init_stem, load_student_init, load_teacher
from seed.config import ClassifierDistillConfig, option, resolve
from seed.errors import SeedError
from seed.loaders import train_eval_loader
from seed.losses import discriminator_loss, ensemble_target, soft_cross_entropy
from seed.models import check_image_size
from seed.module import TrainModule
from seed.teacher import FrozenTeacher
from seed.teacher_cache import CachedTeacher, TeacherCache, cache_for, train_views

DEMO = Path("runs/demo/meal")
DEMO_TEACHERS = (DEMO / "teacher-a" / "teacher.pt", DEMO / "teacher-b" / "teacher.pt")
DEMO_STUDENT_INIT = DEMO / "student-init" / "teacher.pt"


@dataclasses.dataclass
class MEALConfig(ClassifierDistillConfig):
    """``seed-distill --mode meal``."""

    teachers: str | None = option("comma-separated teacher classifiers: ours (r50), timm:NAME (timm:resnet50.a1_in1k) or tv:NAME (tv:resnet50); "
                                 "default: the architectures recorded in --teacher-checkpoints")
    teacher_checkpoints: str | None = option("comma-separated teacher weights, ours (seed-pretrain --method supervised), torchvision's "
                                            "or timm's (.pth/.safetensors); an empty entry takes torchvision's or timm's ImageNet weights "
                                            "(default: the demo's teachers, runs/demo/meal/)")
    student_init: str | None = option("the student's starting weights, a classifier file (our teacher.pt/student.pt, torchvision's or timm's "
                                     ".pth/.safetensors), 'torchvision' for its ImageNet V1 weights (of ours and tv:NAME students), or timm:NAME "
                                     "for timm's pretrained ones (the public code's r50: timm:resnet50.ram_in1k); "
                                     "default: the demo's with the demo's teachers, else random")
    kd_temperature: float = option("softmax temperature of the soft cross-entropy (the paper's is 1)", 1.0, above=0)
    discriminator: Literal["joint", "minimax", "off"] = option(
        "joint (the public code: student and discriminator minimise the same BCE in one SGD step), "
        "minimax (gradient reversal into the student), or off", "joint")
    discriminator_weight: float = option("weight of the discriminator loss added to the KD loss", 1.0, at_least=0)
    lr_schedule: Literal["step", "cosine"] | None = option("step or cosine (default: step, the paper's)")
    lr_milestones: str | None = option("step schedule: comma-separated epochs (counted from 0) at which the lr is multiplied by 0.1 (default: 101)")
    label_weight: float = option("weight of a cross-entropy to the hard labels added to the loss (0, the paper's: no labels; "
                                 "its ablation adds them and finds them unneeded with a good init)", 0.0, at_least=0)
    cutmix: bool = option("CutMix each batch; the teachers see the mixed images, so the soft target follows the mix", False)
    cutmix_alpha: float = option("CutMix: the mixed area is drawn from Beta(alpha, alpha)", 1.0, above=0)


class Discriminator(nn.Module):
    """MEAL V2's discriminator on class outputs: C -> C/8 -> C/64 -> 2 with a ReLU after each layer.

    The public code writes these as 1x1 convolutions on (N, C, 1, 1), which are
    these linear layers, and puts a ReLU after the last one too; that quirk is
    kept. Widths are at least 1, so that 10-class data works.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        widths = [num_classes, max(num_classes // 8, 1), max(num_classes // 64, 1), 2]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, outputs: Tensor) -> Tensor:
        return self.layers(outputs)


class _ReverseGradient(torch.autograd.Function):
    """Identity forward, negated gradient backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return -grad


#: The discriminator's log-probabilities are floored here (p = 1e-6), on both sides alike: a cached target can hold zeros.
LOG_FLOOR = math.log(1e-6)


class MEAL(CachedTeacher, Top1Monitor, TrainModule):
    """Student classifier (backbone + Linear) trained on the mean softmax of frozen teachers."""

    # MEAL V2 (paper Sec. 4.1 and the public code): SGD momentum 0.9, weight decay 0, lr 0.01 at batch 512
    # (here 0.005 per 256 images), then 0.001; no warm-up. The code's regime is [0, 100, 0.01, 101, 300, 0.001]
    # with inclusive bounds over epochs counted from 0: 101 epochs at 0.01, the drop after epoch 100 (milestone 101).
    STAGE, TITLE, CONFIG, TEACHERS, CLASSIFIER = "distill", "MEAL V2", MEALConfig, "teachers", True
    DEFAULTS = {"optimizer": "sgd", "base_lr": 0.005, "weight_decay": 0.0, "warmup_epochs": 0.0, "lr_schedule": "step", "lr_milestones": "101"}

    # ---- the runner's view (seed.runner.run) ----
    @classmethod
    def configure(cls, config: MEALConfig) -> MEALConfig:
        """The paper defaults and checks; the stem waits for the student init, which may name it."""
        config = dataclasses.replace(config, **{k: v for k, v in cls.DEFAULTS.items() if getattr(config, k) is None})
        feature_dim(config.student)
        check_image_size(config.student, config.image_size)
        milestones(config)
        if config.label_weight and config.cutmix:
            raise SeedError("--cutmix mixes the images, whose hard labels --label-weight would read unmixed; drop one of them")
        if config.teacher_cache and config.cutmix:
            raise SeedError("--cutmix mixes new images every step, which no cache holds; drop --cutmix or --teacher-cache")
        return config

    @classmethod
    def train_set(cls, config: MEALConfig) -> Dataset:
        return train_views(config, train_transform(config.image_size, config.crop_min_scale))

    @classmethod
    def prepare(cls, config: MEALConfig, train_set: Dataset) -> tuple[MEALConfig, dict[str, Any]]:
        """The teachers and the student init (the demo's with the demo's teachers), checked to classify the data's classes."""
        demo_teachers = not (config.teachers or config.teacher_checkpoints)
        teachers, lines = load_teachers(config)
        print("\n".join(lines))
        num_classes = teachers[0].embed_dim
        path, backbone, classifier, small_images = load_student_init(config, DEMO_STUDENT_INIT if demo_teachers else None)
        if path is None:
            print(f"student: {config.student} from random weights (MEAL V2 starts from supervised ones: pass --student-init)")
        if classifier is not None and classifier.out_features != num_classes:
            raise SeedError(f"student init {path} has {classifier.out_features} classes, the teachers {num_classes}; "
                            "student and teachers must classify the same classes")
        config = resolve(init_stem(config, path, small_images), {})
        if len(train_set.classes) != num_classes:
            raise SeedError(f"--data {config.data} has {len(train_set.classes)} classes, the teachers {num_classes}; distil on the teachers' classes")
        return config, {"teachers": teachers, "images": len(train_set), "init": (backbone, classifier)}

    @classmethod
    def classes(cls, train_set: Dataset, parts: dict[str, Any]) -> int:
        return parts["teachers"][0].embed_dim

    @classmethod
    def build(cls, config: MEALConfig, parts: dict[str, Any], num_classes: int, run_dir: Path) -> "MEAL":
        teachers = parts["teachers"]
        cache = cache_for(config, run_dir, teacher_specs(config), teachers[0].channels_last, ("kd_temperature",), parts["images"], num_classes,
                          config.cache_top_k)
        module = cls(config, teachers, num_classes, cache=cache)
        backbone, classifier = parts["init"]
        if backbone is not None:
            module.backbone.load_state_dict(backbone.state_dict())
        if classifier is not None:
            module.head.load_state_dict(classifier.state_dict())
        module.init = nn.Sequential(backbone, classifier) if classifier is not None else None
        return module

    def final(self, monitor: list[DataLoader]) -> nn.Sequential:
        """With PreciseBN statistics over train images (the monitor holds val images only)."""
        return self.settled_copy(train_eval_loader(self.config, self.config.precise_bn_images))

    def report(self, settled: nn.Sequential, monitor: list[DataLoader], run_dir: Path) -> None:
        """Top-1 on the whole val split of the init, the student (as exported), each teacher and their ensemble: ``top1.json``."""
        students = {f"student {self.config.student} init": self.init} if self.init is not None else {}
        students[f"student {self.config.student} MEAL V2"] = settled
        report_top1(students, {f"teacher {n} {t.arch}": t for n, t in enumerate(self.teachers, 1)}, self.config, run_dir)

    def __init__(self, config: MEALConfig, teachers: Sequence[nn.Module], num_classes: int, cache: TeacherCache | None = None) -> None:
        super().__init__(config, config.student, num_classes)
        self.head = nn.Linear(self.backbone.feature_dim, num_classes)
        self.teachers = nn.ModuleList(teachers)
        self.discriminator = Discriminator(num_classes) if config.discriminator != "off" else None
        self.cache = cache  # --teacher-cache: batches are FixedCrops items
        self.val_top1 = top1_meter(num_classes)
        self.init: nn.Module | None = None  # the student init as it was, for the report

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def teacher_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The ensemble target (mean of softmaxes) and the mean of the teachers' logits (the discriminator's input)."""
        logits = torch.stack([teacher(images) for teacher in self.teachers])
        return ensemble_target(logits, self.config.kd_temperature), logits.mean(0)

    def losses(self, student: Tensor, target: Tensor, teacher: Tensor, log_probs: bool = False) -> dict[str, Tensor]:
        """KD loss plus the weighted discriminator loss on the student's and the teachers' outputs.

        ``teacher`` is what the discriminator sees of the teachers: the mean of their logits (the code's), or with
        ``log_probs`` their log-probabilities (the cache holds no logits); then it sees the student's log-probabilities
        too, so the two sides differ in what they predict, not by a per-row offset of the logits.
        """
        kd = soft_cross_entropy(student, target, self.config.kd_temperature)
        if self.discriminator is None:
            return {"loss": kd, "kd_loss": kd}
        if log_probs:
            student = (student / self.config.kd_temperature).log_softmax(1).clamp_min(LOG_FLOOR)
        if self.config.discriminator == "minimax":
            student = _ReverseGradient.apply(student)
        adversarial = discriminator_loss(self.discriminator(student), self.discriminator(teacher))
        return {"loss": kd + self.config.discriminator_weight * adversarial, "kd_loss": kd, "disc_loss": adversarial}

    def cached_outputs(self, images: Tensor, index: Tensor, crop: Tensor) -> tuple[Tensor, Tensor]:
        """The target and its log (the discriminator's teacher input), read from the cache; the teachers run on the misses.

        A miss is written first and read back like a hit, so every step trains on the cached form (top-k, fp16), and
        a run that restarts without the cache recomputes the very targets it lost.
        """
        target = self.cached(index, crop, lambda miss: self.teacher_outputs(images[miss])[0])
        return target, target.clamp_min(math.exp(LOG_FLOOR)).log()

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        images = batch[0]  # batch[1], the labels, is read only with --label-weight: MEAL V2 learns from the teachers alone
        if self.cache is not None:
            target, teacher = self.cached_outputs(images, batch[2], batch[3])
        else:
            if self.config.cutmix:
                images = cutmix(images, self.config.cutmix_alpha)
            target, teacher = self.teacher_outputs(images)
        student = self(images)
        losses = self.losses(student, target, teacher, log_probs=self.cache is not None)
        if self.config.label_weight:
            labelled = F.cross_entropy(student.float(), batch[1])
            losses = {**losses, "loss": losses["loss"] + self.config.label_weight * labelled, "label_loss": labelled}
        for name, value in losses.items():
            self.log(name, value, prog_bar=name == "loss")
        return losses["loss"]

    def configure_optimizers(self) -> Any:
        if self.config.lr_schedule == "cosine":
            return super().configure_optimizers()
        params = [p for p in self.parameters() if p.requires_grad]  # student and discriminator: one optimiser, as the code
        kind = LARS if self.config.optimizer == "lars" else torch.optim.SGD
        optimizer = kind(params, lr=self.lr(), momentum=self.config.momentum, weight_decay=self.config.weight_decay)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones(self.config), gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


def milestones(config: MEALConfig) -> list[int]:
    try:
        return [int(m) for m in str(config.lr_milestones).split(",") if m.strip()]
    except ValueError:
        raise SeedError(f"--lr-milestones must be comma-separated epochs such as 100 or 60,80, got {config.lr_milestones!r}") from None


def teacher_specs(config: MEALConfig) -> list[tuple[str | None, str | None]]:
    """(architecture, checkpoint) per teacher from --teachers / --teacher-checkpoints, else the demo's."""
    archs = [a.strip() or None for a in config.teachers.split(",")] if config.teachers else []
    files = [c.strip() or None for c in config.teacher_checkpoints.split(",")] if config.teacher_checkpoints else []
    if not archs and not files:
        if not all(path.is_file() for path in DEMO_TEACHERS):
            raise SeedError(f"no --teacher-checkpoints given and no demo teachers in {DEMO}; pass them, "
                            "or train them: seed-pretrain --config configs/demo/meal_teacher_a.yaml (then meal_teacher_b, meal_student_init)")
        files = [str(path) for path in DEMO_TEACHERS]
    if archs and files and len(archs) != len(files):
        raise SeedError(f"--teachers names {len(archs)} teachers but --teacher-checkpoints gives {len(files)} files; give one file per teacher")
    specs = list(zip(archs or [None] * len(files), files or [None] * len(archs), strict=True))
    for arch, path in specs:
        if path is None and arch in available() and arch not in TORCHVISION_NAMES:
            raise SeedError(f"teacher {arch} has no torchvision weights: give its file in --teacher-checkpoints")
    return specs


def load_teachers(config: MEALConfig) -> tuple[list[FrozenTeacher], list[str]]:
    """All teachers, checked to share one number of classes; and a line describing each."""
    teachers, lines = [], []
    for number, (arch, path) in enumerate(teacher_specs(config), 1):
        teacher, found = load_teacher(arch, path, config)
        if teachers and teacher.embed_dim != teachers[0].embed_dim:
            raise SeedError(f"teacher {number} ({path or arch}) has {teacher.embed_dim} classes, teacher 1 has {teachers[0].embed_dim}; "
                            "an ensemble averages class probabilities, so all teachers need the same classes")
        teachers.append(teacher)
        source = path or ("timm pretrained weights" if arch.startswith("timm:") else "torchvision ImageNet weights")
        lines.append(f"teacher {number}: {teacher.arch} from {source} ({found}, {teacher.embed_dim} classes)")
    return teachers, lines

