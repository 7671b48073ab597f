"""The shared base of every trainable method (pretraining, SEED, MEAL V2, USI).

A method subclasses :class:`TrainModule` and adds its heads, its loss and its
``training_step``, and says, in the class attributes and class methods below,
what :func:`seed.runner.run` needs to run it: its stage, title and config, its
train set, what it loads before training (teachers, a student init), what it
exports and what it reports. The base owns the backbone, the optimiser and
schedule, the kNN monitor, and the queues' place in checkpoints.
"""

import dataclasses
from copy import deepcopy as copy_module
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.utils.lars import LARS
from lightly.utils.scheduler import CosineWarmupScheduler
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Dataset, Subset

from seed.backbones import create_backbone, feature_dim
from seed.config import TrainConfig, method_name, resolve
from seed.data import dataset_for, view_transform
from seed.engine import data_name
from seed.knn import compare_knn, knn_top1, print_knn_table, random_inits
from seed.loaders import monitor_loaders
from seed.models import check_image_size


@torch.no_grad()
def precise_bn(model: nn.Module, loader: DataLoader, images: int, device: torch.device | str = "cpu") -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are recomputed (PreciseBN, Wu & Johnson 2021, "Rethinking 'Batch'
    in BatchNorm", sec. 3) as a plain average over the first ``images`` images of ``loader`` (train images, eval
    transform; the same images on every DDP rank), in eval mode; ``images`` 0 copies the running averages as they are.

    The running averages kept while training describe augmented views and lag the weights (MobileNetV3's momentum
    0.01 keeps its random-init statistics for hundreds of steps); evaluation reads centre crops of the final
    weights. ``model`` itself is never touched, so a resumed run still equals an uninterrupted one.
    """
    copy = copy_module(model)
    if images > 0:  # a loader of its own over the first images: the given one may keep persistent workers mid-epoch
        first = Subset(loader.dataset, range(min(images, len(loader.dataset))))
        update_bn(DataLoader(first, batch_size=loader.batch_size or 1, num_workers=loader.num_workers), copy, device=device)
    return copy.eval()


class TrainModule(pl.LightningModule):
    """Backbone + optimiser + cosine schedule + kNN monitor; subclasses add the method.

    The class methods are the runner's view of a method; their defaults fit a self-supervised teacher.
    """

    #: ``pretrain`` (``seed-pretrain --method NAME``, exports ``teacher.pt``) or ``distill`` (``seed-distill --mode NAME``, ``student.pt``).
    STAGE: ClassVar[str]
    #: The method's name in the papers, for help texts and errors.
    TITLE: ClassVar[str]
    #: The method's config dataclass: the stage's shared flags and its own, nothing of other methods.
    CONFIG: ClassVar[type]
    #: Paper defaults of the fields left at None.
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    #: The attribute holding the frozen teacher(s): rebuilt from their own files, so kept out of ``last.ckpt``.
    TEACHERS: ClassVar[str | None] = None
    #: Whether the method trains a classifier: its export holds the classifier as its head and ``num_classes``.
    CLASSIFIER: ClassVar[bool] = False

    @classmethod
    def configure(cls, config: Any) -> Any:
        """The config with the paper defaults filled in, checked before any data is read."""
        config = resolve(config, cls.DEFAULTS)
        feature_dim(cls.trained_arch(config))  # an unknown name fails here, before any data is read
        check_image_size(cls.trained_arch(config), config.image_size)
        return config

    @classmethod
    def trained_arch(cls, config: Any) -> str:
        """The architecture this method trains: a teacher's ``--arch``, a distiller's ``--student``."""
        return config.student if cls.STAGE == "distill" else config.arch

    @classmethod
    def train_set(cls, config: Any) -> Dataset:
        """The train split under the method's views (two views for the contrastive methods)."""
        return dataset_for(config, "train", view_transform(config.method, config.image_size, min_scale=config.crop_min_scale))

    @classmethod
    def repeats(cls, config: Any) -> int:
        """Repeated augmentation under DDP: how many times an image comes back in an epoch (1: off)."""
        return 1

    @classmethod
    def monitor(cls, config: Any) -> list[DataLoader]:
        """The validation loaders during training: the kNN monitor's bank and queries."""
        return monitor_loaders(config)

    @classmethod
    def prepare(cls, config: Any, train_set: Dataset) -> tuple[Any, dict[str, Any]]:
        """What the method loads before its module is built (teachers, a student init), as keyword arguments of
        :meth:`build`, and the config as they refine it."""
        return config, {}

    @classmethod
    def run_name(cls, config: Any, parts: dict[str, Any]) -> str:
        """The run folder's name under ``runs/<stage>/``."""
        return f"{method_name(config)}-{cls.trained_arch(config)}-{data_name(config)}"

    @classmethod
    def build(cls, config: Any, parts: dict[str, Any], num_classes: int, run_dir: Path) -> "TrainModule":
        """The module, from :meth:`prepare`'s parts."""
        return cls(config, num_classes=num_classes, **parts)

    @classmethod
    def classes(cls, train_set: Dataset, parts: dict[str, Any]) -> int:
        """The number of classes the module is built for."""
        return len(train_set.classes)

    def final(self, monitor: list[DataLoader]) -> nn.Sequential:
        """What is exported and reported: :meth:`evaluated` with PreciseBN statistics over the kNN monitor's bank
        (train images, eval transform)."""
        return self.settled_copy(monitor[0])

    def exported(self, settled: nn.Sequential) -> tuple[nn.Module, int, dict[str, Any] | None]:
        """What the exported file holds beside the backbone: the head, its output size and extra fields (a classifier's
        ``num_classes``, so that seed-eval and ``--student-init`` read it as one)."""
        if self.CLASSIFIER:
            return settled[1], self.num_classes, {"num_classes": self.num_classes}
        return settled[1], self.config.embed_dim, None

    def report(self, settled: nn.Sequential, monitor: list[DataLoader], run_dir: Path) -> None:
        """After the export: the trained backbone's kNN top-1 beside random init of its architecture."""
        arch, small = self.trained_arch(self.config), bool(self.config.small_images)
        scores = compare_knn({f"{arch} random init": random_inits(arch, small), f"{arch} {self.config.method}": settled[0]},
                             self.config, self.num_classes, monitor)
        print_knn_table(scores, self.config, run_dir)

    def __init__(self, config: TrainConfig, arch: str, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.strict_loading = self.TEACHERS is None  # the teachers are not in our checkpoints
        self.save_hyperparameters({"config": dataclasses.asdict(config), "arch": arch, "num_classes": num_classes})
        self.backbone = create_backbone(arch, small_images=bool(config.small_images))
        self._monitor: dict[int, list[tuple[Tensor, Tensor]]] = {0: [], 1: []}
        self._monitored: nn.Module | None = None

    def lr(self) -> float:
        """The flag, else the linear scaling rule lr = base_lr x global batch / 256 (Goyal et al. 2017)."""
        if self.config.lr is not None:
            return self.config.lr
        global_batch = self.config.batch_size * self.config.devices * self.config.num_nodes
        return self.config.base_lr * global_batch / 256

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        kind = LARS if self.config.optimizer == "lars" else torch.optim.SGD
        optimizer = kind(params, lr=self.lr(), momentum=self.config.momentum, weight_decay=self.config.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = min(int(self.config.warmup_epochs * self.trainer.num_training_batches), total)
        schedule = CosineWarmupScheduler(optimizer, warmup_epochs=warmup, max_epochs=max(total, 1), end_value=0.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def evaluated(self) -> nn.Sequential:
        """What is exported and evaluated: the backbone, then the projection head when the method has one."""
        heads = [m for m in (getattr(self, name, None) for name in ("projection_head", "head")) if isinstance(m, nn.Module)]
        return nn.Sequential(self.backbone, *heads[:1])

    def settled_copy(self, loader: DataLoader) -> nn.Sequential:
        """:meth:`evaluated` with PreciseBN statistics over ``--precise-bn-images`` images of ``loader`` (see :func:`precise_bn`)."""
        return precise_bn(self.evaluated(), loader, self.config.precise_bn_images, self.device)

    # kNN monitor: dataloader 0 is the bank (train images), 1 the queries (val images), both scored with settled statistics.
    def on_validation_start(self) -> None:
        self._monitored = self.settled_copy(self.trainer.val_dataloaders[0])[0]

    def on_validation_end(self) -> None:
        self._monitored = None

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        self._monitor[dataloader_idx].append((F.normalize(self._monitored(images), dim=1), labels))

    def on_validation_epoch_end(self) -> None:
        gathered = []
        for idx in (0, 1):
            features = torch.cat([f for f, _ in self._monitor[idx]])
            labels = torch.cat([y for _, y in self._monitor[idx]])
            gathered.append((self.all_gather(features).flatten(0, -2), self.all_gather(labels).flatten()))
            self._monitor[idx].clear()
        (bank, bank_labels), (queries, query_labels) = gathered
        top1 = knn_top1(bank.float(), bank_labels, queries.float(), query_labels, self.num_classes, k=self.config.knn_k)
        self.log("knn_top1", top1, prog_bar=True, rank_zero_only=True)

    # lightly keeps queues as non-persistent buffers; store them so a resumed run keeps its queue.
    def _memory_banks(self) -> dict[str, MemoryBankModule]:
        return {name: m for name, m in self.named_modules() if isinstance(m, MemoryBankModule) and m.size[0] > 0}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["memory_banks"] = {name: {"bank": m.bank.cpu(), "ptr": m.bank_ptr.cpu()} for name, m in self._memory_banks().items()}
        if self.TEACHERS:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(f"{self.TEACHERS}.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for name, module in self._memory_banks().items():
            saved = checkpoint.get("memory_banks", {}).get(name)
            if saved is not None:
                module.bank.copy_(saved["bank"])
                module.bank_ptr.copy_(saved["ptr"])
