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
from typing import Any

import pytorch_lightning as pl
import torch
from lightly.transforms.utils import IMAGENET_NORMALIZE
from lightly.utils.lars import LARS
from torch import Tensor, nn

from seed.backbones import available
from seed.checkpoints import atomic_save, export_model, load_classifier, load_file
from seed.classification import cutmix, print_top1, top1, top1_meter, train_transform, val_loader
from seed.config import DistillConfig, resolve
from seed.data import check_classes, dataset_for
from seed.engine import data_name, fit, run_folder, use_channels_last
from seed.errors import SeedError
from seed.loaders import check_batch, make_loader
from seed.losses import discriminator_loss, ensemble_target, soft_cross_entropy
from seed.module import TrainModule
from seed.sampling import FixedCrops
from seed.teacher import FrozenTeacher

DEMO = Path("runs/demo/meal")
DEMO_TEACHERS = (DEMO / "teacher-a" / "teacher.pt", DEMO / "teacher-b" / "teacher.pt")
DEMO_STUDENT_INIT = DEMO / "student-init" / "teacher.pt"


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


class TargetCache:
    """Ensemble targets per (image, crop), as top-k probabilities in fp16 and their classes, in CPU memory.

    Not a module and no buffers: DDP broadcasts a module's buffers on every
    forward (hundreds of MB at ImageNet scale) and Lightning writes them into
    every ``last.ckpt``. The cache is rebuilt, not restored: a target is always
    read back from the cache, a miss included, so a target the teachers
    recompute after a restart is the one the cache held. Once full it is saved
    beside the run, once (``TARGETS``), and a resumed run reads it back there.
    A read spreads the probability left outside the top-k evenly over the other classes.
    """

    def __init__(self, num_images: int, crops: int, num_classes: int, top_k: int) -> None:
        self.num_classes = num_classes
        k = min(top_k, num_classes)
        self.values = torch.zeros(num_images, crops, k, dtype=torch.float16)
        self.classes = torch.zeros(num_images, crops, k, dtype=torch.int16 if num_classes <= 2**15 else torch.int32)
        self.filled = torch.zeros(num_images, crops, dtype=torch.bool)

    def hits(self, index: Tensor, crop: Tensor) -> Tensor:
        return self.filled[index.cpu(), crop.cpu()].to(index.device)

    def read(self, index: Tensor, crop: Tensor) -> Tensor:
        """The dense (N, C) targets, on ``index``'s device."""
        rows = index.cpu(), crop.cpu()
        values, classes = self.values[rows].to(index.device).float(), self.classes[rows].to(index.device).long()
        rest = self.num_classes - values.shape[1]
        fill = (1 - values.sum(1, keepdim=True)).clamp_min(0) / max(rest, 1)
        target = fill.expand(len(index), self.num_classes).clone() if rest else values.new_zeros(len(index), self.num_classes)
        return target.scatter_(1, classes, values)

    def write(self, index: Tensor, crop: Tensor, target: Tensor) -> None:
        values, classes = target.detach().float().topk(self.values.shape[2], dim=1)
        rows = index.cpu(), crop.cpu()
        self.values[rows] = values.cpu().to(self.values.dtype)
        self.classes[rows] = classes.cpu().to(self.classes.dtype)
        self.filled[rows] = True

    def state(self, key: dict[str, Any]) -> dict[str, Any]:
        """What ``TARGETS`` holds: the tensors and the ``key`` of the run that filled them."""
        return {"key": key, "values": self.values, "classes": self.classes, "filled": self.filled}

    def load(self, state: dict[str, Any], key: dict[str, Any]) -> bool:
        """Take a saved cache when it was filled by a run of the same ``key`` (data, crops, teachers); whether it was."""
        if state.get("key") != key or state["values"].shape != self.values.shape:
            return False
        self.values, self.classes, self.filled = state["values"], state["classes"].to(self.classes.dtype), state["filled"].bool()
        return True


#: The full teacher-target cache, saved once beside ``last.ckpt``.
TARGETS = "teacher_targets.pt"

#: The discriminator's log-probabilities are floored here (p = 1e-6), on both sides alike: a cached target can hold zeros.
LOG_FLOOR = math.log(1e-6)


class MEAL(TrainModule):
    """Student classifier (backbone + Linear) trained on the mean softmax of frozen teachers."""

    # MEAL V2 (paper Sec. 4.1 and the public code): SGD momentum 0.9, weight decay 0, lr 0.01 at batch 512
    # (here 0.005 per 256 images), then 0.001; no warm-up. The code's regime is [0, 100, 0.01, 101, 300, 0.001]
    # with inclusive bounds over epochs counted from 0: 101 epochs at 0.01, the drop after epoch 100 (milestone 101).
    DEFAULTS = {"optimizer": "sgd", "base_lr": 0.005, "weight_decay": 0.0, "warmup_epochs": 0.0, "lr_schedule": "step", "lr_milestones": "101"}

    def __init__(self, config: DistillConfig, teachers: Sequence[nn.Module], num_classes: int, num_images: int = 0) -> None:
        super().__init__(config, config.student, num_classes)
        self.head = nn.Linear(self.backbone.feature_dim, num_classes)
        self.teachers = nn.ModuleList(teachers)
        self.discriminator = Discriminator(num_classes) if config.discriminator != "off" else None
        self.cache = TargetCache(num_images, config.cache_crops, num_classes, config.cache_top_k) if config.cache_teacher_logits else None
        self.strict_loading = False  # the teachers are rebuilt from their own files, not stored in ours
        self.val_top1 = top1_meter(num_classes)
        self._targets_saved = False

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
        hit = self.cache.hits(index, crop)
        computed = images.new_zeros(len(images), self.num_classes, dtype=torch.float32)
        if not hit.all():
            computed[~hit] = self.teacher_outputs(images[~hit])[0].float()
        if self.trainer.world_size > 1:  # every rank keeps the whole cache
            gathered = (self.all_gather(t).flatten(0, 1) for t in (index, crop, hit.to(torch.uint8), computed))  # gloo gathers no bool
            all_index, all_crop, all_hit, all_computed = gathered
            miss = all_hit == 0
            self.cache.write(all_index[miss], all_crop[miss], all_computed[miss])
        else:
            self.cache.write(index[~hit], crop[~hit], computed[~hit])
        self.log("cache_hits", hit.float().mean(), prog_bar=True)
        target = self.cache.read(index, crop)
        return target, target.clamp_min(math.exp(LOG_FLOOR)).log()

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        images = batch[0]  # batch[1], the labels, is never read: MEAL V2 learns from the teachers alone
        if self.cache is not None:
            target, teacher = self.cached_outputs(images, batch[2], batch[3])
        else:
            if self.config.cutmix:
                images = cutmix(images, self.config.cutmix_alpha)
            target, teacher = self.teacher_outputs(images)
        losses = self.losses(self(images), target, teacher, log_probs=self.cache is not None)
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

    # Online monitor: the student classifier's top-1 on a val subset (every --knn-every epochs).
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        self.val_top1.update(self(images), labels)

    def on_validation_epoch_end(self) -> None:
        self.log("val_top1", 100.0 * self.val_top1.compute(), prog_bar=True, rank_zero_only=True)
        self.val_top1.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teachers.")}

    # The teacher-target cache: saved once, when full, beside last.ckpt; read back from beside the checkpoint a run resumes.
    def cache_key(self) -> dict[str, Any]:
        """What the cached targets depend on; a saved cache of another key is not used."""
        names = ("data", "image_size", "crop_min_scale", "seed", "cache_crops", "cache_top_k", "kd_temperature", "teachers",
                 "teacher_checkpoints", "teacher_checkpoint")
        return {**{name: getattr(self.config, name) for name in names}, "images": len(self.cache.filled)}

    def on_train_epoch_end(self) -> None:
        if self.cache is None or self._targets_saved or not bool(self.cache.filled.all()):
            return
        if self.trainer.is_global_zero:
            atomic_save(self.cache.state(self.cache_key()), Path(self.trainer.default_root_dir) / TARGETS)
        self._targets_saved = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.cache is None or not self.trainer.ckpt_path:
            return
        path = Path(self.trainer.ckpt_path).parent / TARGETS
        if path.is_file() and self.cache.load(load_file(path), self.cache_key()):
            self._targets_saved = path.resolve() == (Path(self.trainer.default_root_dir) / TARGETS).resolve()


def milestones(config: DistillConfig) -> list[int]:
    try:
        return [int(m) for m in str(config.lr_milestones).split(",") if m.strip()]
    except ValueError:
        raise SeedError(f"--lr-milestones must be comma-separated epochs such as 100 or 60,80, got {config.lr_milestones!r}") from None


def check_config(config: DistillConfig) -> None:
    """Mistakes that would otherwise surface deep inside training."""
    if config.kd_temperature <= 0:
        raise SeedError(f"--kd-temperature must be positive, got {config.kd_temperature}")
    milestones(config)
    if config.cache_teacher_logits and config.cutmix:
        raise SeedError("--cutmix mixes new images every step, which no cache holds; drop --cutmix or --cache-teacher-logits")
    if config.teacher_cache:
        raise SeedError("--teacher-cache is SEED's (--mode seed); MEAL V2 caches its targets with --cache-teacher-logits")
    if config.cache_crops < 1 or config.cache_top_k < 1:
        raise SeedError("--cache-crops and --cache-top-k must be at least 1")


# ---- teachers --------------------------------------------------------------------------------------------------

class _Renormalize(nn.Module):
    """Images normalised with ImageNet's mean/std, renormalised with a timm model's own."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        ours = torch.tensor(IMAGENET_NORMALIZE["mean"]), torch.tensor(IMAGENET_NORMALIZE["std"])
        self.register_buffer("scale", (ours[1] / torch.tensor(std)).view(1, 3, 1, 1))
        self.register_buffer("shift", ((ours[0] - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return images * self.scale + self.shift


def timm_model(name: str, pretrained: bool, give_file: str) -> nn.Module:
    """``timm.create_model(name)``; its errors (not installed, unknown name, no download offline) as one line, ``give_file``
    saying where the user can pass the weights instead."""
    try:
        import timm
    except ImportError:
        raise SeedError(f"timm:{name} is none of ours ({', '.join(available())}) and timm is not installed; pip install timm "
                        "(or the seed[timm] extra)") from None
    try:
        return timm.create_model(name, pretrained=pretrained)
    except RuntimeError as error:
        raise SeedError(f"timm model '{name}': {str(error).splitlines()[0]}") from None
    except Exception as error:  # noqa: BLE001 - the hub download fails in many ways offline
        raise SeedError(f"timm's pretrained weights of '{name}' could not be fetched ({type(error).__name__}); {give_file}") from None


def timm_classifier(name: str, checkpoint: str | None) -> nn.Module:
    """A timm classifier by name: weights from ``checkpoint`` (weights_only), else timm's pretrained ones."""
    model = timm_model(name, not checkpoint, "pass the file in --teacher-checkpoints")
    if checkpoint:
        content = load_file(checkpoint)
        state = content.get("state_dict", content.get("model", content)) if isinstance(content, dict) else content
        state = {k.removeprefix("module."): v for k, v in state.items()}
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        if isinstance(classifier, str) and f"{classifier}.weight" in state and state[f"{classifier}.weight"].shape[0] != model.num_classes:
            model.reset_classifier(state[f"{classifier}.weight"].shape[0])  # a fine-tuned model of other classes
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise SeedError(f"checkpoint {checkpoint} does not fit timm's {name}: {str(error).splitlines()[1].strip()[:200]}") from None
    settings = getattr(model, "pretrained_cfg", None) or {}
    ours = tuple(IMAGENET_NORMALIZE["mean"]), tuple(IMAGENET_NORMALIZE["std"])
    mean, std = tuple(settings.get("mean", ours[0])), tuple(settings.get("std", ours[1]))
    wrapped = model if (mean, std) == ours else nn.Sequential(_Renormalize(mean, std), model)
    wrapped.arch, wrapped.feature_dim = f"timm:{name}", model.num_classes
    return wrapped


TORCHVISION_NAMES = {"r18": "resnet18", "r34": "resnet34", "r50": "resnet50", "r101": "resnet101", "r152": "resnet152",
                     "mbv3l": "mobilenet_v3_large", "mbv3s": "mobilenet_v3_small", "effb0": "efficientnet_b0", "effb1": "efficientnet_b1"}


def torchvision_file(arch: str, version: str = "DEFAULT") -> str:
    """torchvision's ImageNet classifier weights of ``arch``: the file in torch.hub's cache, downloaded there when missing."""
    from torchvision.models import get_model_weights

    if arch not in TORCHVISION_NAMES:
        raise SeedError(f"{arch} has no torchvision weights; give its file ({', '.join(TORCHVISION_NAMES)} have them)")
    weights = getattr(get_model_weights(TORCHVISION_NAMES[arch]), version)
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(weights.url, str(path), progress=False)
        except (OSError, RuntimeError) as error:
            raise SeedError(f"torchvision's {weights} weights could not be fetched ({type(error).__name__}); "
                            f"put {Path(weights.url).name} in {path.parent} or pass the file") from None
    return str(path)


def teacher_specs(config: DistillConfig) -> list[tuple[str | None, str | None]]:
    """(architecture, checkpoint) per teacher from --teachers / --teacher-checkpoints, else the demo's."""
    archs = [a.strip() or None for a in config.teachers.split(",")] if config.teachers else []
    files = [c.strip() or None for c in config.teacher_checkpoints.split(",")] if config.teacher_checkpoints else []
    if not files and config.teacher_checkpoint:
        files = [config.teacher_checkpoint]
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


def load_teacher(arch: str | None, checkpoint: str | None, config: DistillConfig) -> tuple[FrozenTeacher, str]:
    """A frozen classifier (images -> logits): inference mode, BatchNorm folded, channels_last on GPU."""
    if arch is not None and arch not in available():
        model, head, found = timm_classifier(arch.removeprefix("timm:"), checkpoint), None, "timm"
    else:
        model, head, found, _ = load_classifier(checkpoint or torchvision_file(arch), arch)
    return FrozenTeacher(model, head, fold_bn=config.teacher_fold_bn, channels_last=use_channels_last(config), normalize=False), found


def load_teachers(config: DistillConfig) -> tuple[list[FrozenTeacher], list[str]]:
    """All teachers, checked to share one number of classes; and a line describing each."""
    teachers, lines = [], []
    for number, (arch, path) in enumerate(teacher_specs(config), 1):
        teacher, found = load_teacher(arch, path, config)
        if teachers and teacher.embed_dim != teachers[0].embed_dim:
            raise SeedError(f"teacher {number} ({path or arch}) has {teacher.embed_dim} classes, teacher 1 has {teachers[0].embed_dim}; "
                            "an ensemble averages class probabilities, so all teachers need the same classes")
        teachers.append(teacher)
        source = path or ("torchvision ImageNet weights" if arch in available() else "timm pretrained weights")
        lines.append(f"teacher {number}: {teacher.arch} from {source} ({found}, {teacher.embed_dim} classes)")
    return teachers, lines


def timm_student_file(name: str) -> str:
    """timm's pretrained classifier ``name`` saved as a state dict in torch.hub's cache, to start a student of ours from.

    The public MEAL V2 code starts its ResNet-50 from timm's ``resnet50`` of 2020, 79.0 % (now the
    ``resnet50.ram_in1k`` tag), not from torchvision's 76.15 %. timm's ResNets keep torchvision's layout, so the file
    loads as a torchvision state dict. The student is fed ImageNet-normalised images, so the model must expect them.
    """
    path = Path(torch.hub.get_dir()) / "checkpoints" / f"timm-{name}.pth"
    if not path.is_file():
        model = timm_model(name, True, "pass the weights' file to --student-init instead")
        settings = getattr(model, "pretrained_cfg", None) or {}
        expected = [round(v, 3) for v in (*IMAGENET_NORMALIZE["mean"], *IMAGENET_NORMALIZE["std"])]
        if [round(v, 3) for v in (*settings.get("mean", ()), *settings.get("std", ()))] not in ([], expected):
            raise SeedError(f"timm's {name} expects inputs normalised with mean {settings['mean']} and std {settings['std']}, "
                            "the student gets ImageNet's; start from a model trained on ImageNet-normalised inputs")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(model.state_dict(), path)
    return str(path)


def load_student_init(config: DistillConfig, demo_teachers: bool) -> tuple[str | None, nn.Module | None, nn.Linear | None, bool | None]:
    """--student-init (the demo's with the demo's teachers): path, backbone, classifier (or None) and stem."""
    path = config.student_init
    if path is None and demo_teachers and DEMO_STUDENT_INIT.is_file():
        path = str(DEMO_STUDENT_INIT)
    if path == "torchvision":  # ImageNet V1 weights: the paper's starting point (R-50 76.15, R-18 69.76)
        path = torchvision_file(config.student, "IMAGENET1K_V1")
    elif path is not None and path.startswith("timm:"):  # the public code's start (R-50: timm's 79.0 %)
        print(f"student init: timm's pretrained {path.removeprefix('timm:')}")
        path = timm_student_file(path.removeprefix("timm:"))
    if path is None:
        return None, None, None, None
    backbone, classifier, found, small_images = load_classifier(path, config.student, require_classifier=False)
    print(f"student init: {path} ({found}{'' if classifier is not None else ', no classifier: a new one'})")
    return path, backbone, classifier, small_images


def distill(config: DistillConfig) -> Path:
    """Run MEAL V2 as ``config`` says (``seed-distill --mode meal``); returns the run folder."""
    config = dataclasses.replace(config, **{k: v for k, v in MEAL.DEFAULTS.items() if getattr(config, k) is None})
    check_config(config)
    transform = train_transform(config.image_size, config.crop_min_scale)
    if config.cache_teacher_logits:
        train_set = FixedCrops(dataset_for(config, "train"), transform, config.cache_crops, config.seed)
    else:
        train_set = dataset_for(config, "train", transform)
    monitor = val_loader(config, config.knn_query_size)
    check_classes(train_set, monitor.dataset, config.data)
    check_batch(len(train_set), config)
    demo_teachers = not (config.teachers or config.teacher_checkpoints or config.teacher_checkpoint)
    teachers, lines = load_teachers(config)
    print("\n".join(lines))
    num_classes = teachers[0].embed_dim
    init_path, init_backbone, init_classifier, small_images = load_student_init(config, demo_teachers)
    if init_path is None:
        print(f"student: {config.student} from random weights (MEAL V2 starts from supervised ones: pass --student-init)")
    if init_classifier is not None and init_classifier.out_features != num_classes:
        raise SeedError(f"student init {init_path} has {init_classifier.out_features} classes, the teachers {num_classes}; "
                        "student and teachers must classify the same classes")
    if small_images is not None:
        if config.small_images is not None and config.small_images != small_images:
            raise SeedError(f"student init {init_path} was trained with{'' if small_images else 'out'} the small-image stem; "
                            f"drop --{'no-' if small_images else ''}small-images")
        config = dataclasses.replace(config, small_images=small_images)
    config = resolve(config, {})
    if len(train_set.classes) != num_classes:
        raise SeedError(f"--data {config.data} has {len(train_set.classes)} classes, the teachers {num_classes}; distil on the teachers' classes")
    pl.seed_everything(config.seed, workers=True, verbose=False)
    run_dir = run_folder(config, "distill", f"meal-{config.student}-{data_name(config)}")
    module = MEAL(config, teachers, num_classes, num_images=len(train_set))
    if init_backbone is not None:
        module.backbone.load_state_dict(init_backbone.state_dict())
    if init_classifier is not None:
        module.head.load_state_dict(init_classifier.state_dict())
    trainer = fit(module, make_loader(train_set, config, shuffle=True, drop_last=True), [monitor], config, run_dir)
    if trainer.is_global_zero:
        export_model(run_dir / "student.pt", config.student, module.backbone, module.head, num_classes, "meal",
                     dataclasses.asdict(config), bool(config.small_images), extra={"num_classes": num_classes})
        students = {}
        if init_classifier is not None:
            students[f"student {config.student} init"] = nn.Sequential(init_backbone, init_classifier)
        students[f"student {config.student} MEAL V2"] = module
        named = {f"teacher {n} {t.arch}": t for n, t in enumerate(module.teachers, 1)}
        loader = val_loader(config)
        scores = top1(students, named, loader, "cuda" if torch.cuda.is_available() else "cpu")
        print_top1(scores, len(loader.dataset), run_dir / "top1.json")
        print(f"\nrun folder: {run_dir} (student.pt, last.ckpt, config.yaml, top1.json, logs/)")
    return run_dir
