"""Supervised classifier training: a labelled teacher or student init for MEAL V2.

The standard recipe (He et al. 2016; Goyal et al. 2017): backbone + Linear
classifier, cross-entropy without label smoothing, SGD lr 0.1 x B/256,
momentum 0.9, weight decay 1e-4, cosine schedule; RandomResizedCrop + flip
(pad-and-crop + flip below 96px). ``teacher.pt`` holds the classifier as its
head and ``num_classes``.
"""

import dataclasses
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from seed.classification import report_top1, top1_meter, train_transform
from seed.config import PretrainConfig
from seed.data import dataset_for
from seed.module import TrainModule


@dataclasses.dataclass
class SupervisedConfig(PretrainConfig):
    """``seed-pretrain --method supervised``: the shared flags, nothing of its own."""


class Supervised(TrainModule):
    """Backbone + Linear classifier trained with cross-entropy on the labels."""

    STAGE, TITLE, CONFIG, CLASSIFIER = "pretrain", "supervised", SupervisedConfig, True
    DEFAULTS = {"optimizer": "sgd", "base_lr": 0.1, "weight_decay": 1e-4, "warmup_epochs": 0.0}

    @classmethod
    def train_set(cls, config: SupervisedConfig) -> Dataset:
        """One augmented view per image (not the two views of the contrastive methods)."""
        return dataset_for(config, "train", train_transform(config.image_size, config.crop_min_scale))

    def report(self, settled: nn.Sequential, monitor: list[DataLoader], run_dir: Path) -> None:
        """The kNN table, then the classifier's top-1 on the whole val split, printed and kept as ``top1.json``."""
        super().report(settled, monitor, run_dir)
        report_top1({f"{self.config.arch} supervised": settled}, {}, self.config, run_dir)

    def __init__(self, config: SupervisedConfig, num_classes: int) -> None:
        super().__init__(config, config.arch, num_classes)
        self.head = nn.Linear(self.backbone.feature_dim, num_classes)
        self.val_top1 = top1_meter(num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("loss", loss, prog_bar=True)
        return loss

    # The kNN monitor of the base, plus the classifier's top-1 on the same val images.
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        super().validation_step(batch, batch_idx, dataloader_idx)
        if dataloader_idx == 1:
            images, labels = batch
            self.val_top1.update(self(images), labels)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log("val_top1", 100.0 * self.val_top1.compute(), prog_bar=True, rank_zero_only=True)
        self.val_top1.reset()

