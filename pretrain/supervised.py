"""Supervised classifier training: a labelled teacher or student init for MEAL V2.

The standard recipe (He et al. 2016; Goyal et al. 2017): backbone + Linear
classifier, cross-entropy without label smoothing, SGD lr 0.1 x B/256,
momentum 0.9, weight decay 1e-4, cosine schedule; RandomResizedCrop + flip
(pad-and-crop + flip below 96px). ``teacher.pt`` holds the classifier as its
head and ``num_classes``.

``--init FILE`` continues from a classifier file (a student init, a distilled
student): with the same steps, optimiser and schedule as a distillation run, it
is that run's label control, the same network learning from the labels instead.
"""

import dataclasses
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from seed.checkpoints import load_classifier
from seed.classification import report_top1, top1_meter, train_transform
from seed.classifiers import init_stem
from seed.config import PretrainConfig, option
from seed.data import dataset_for
from seed.errors import SeedError
from seed.module import TrainModule


@dataclasses.dataclass
class SupervisedConfig(PretrainConfig):
    """``seed-pretrain --method supervised``."""

    init: str | None = option("start from this classifier file (our teacher.pt / student.pt, or torchvision's) instead of random weights: "
                              "its backbone and classifier (a new classifier when it has none), trained on with this run's optimiser "
                              "and schedule; e.g. the label control of a distilled student, from the same init for the same steps")


class Supervised(TrainModule):
    """Backbone + Linear classifier trained with cross-entropy on the labels."""

    STAGE, TITLE, CONFIG, CLASSIFIER = "pretrain", "supervised", SupervisedConfig, True
    DEFAULTS = {"optimizer": "sgd", "base_lr": 0.1, "weight_decay": 1e-4, "warmup_epochs": 0.0}

    @classmethod
    def train_set(cls, config: SupervisedConfig) -> Dataset:
        """One augmented view per image (not the two views of the contrastive methods)."""
        return dataset_for(config, "train", train_transform(config.image_size, config.crop_min_scale))

    @classmethod
    def prepare(cls, config: SupervisedConfig, train_set: Dataset) -> tuple[SupervisedConfig, dict[str, Any]]:
        """``--init``: its backbone and classifier, checked against the data's classes; its stem becomes the run's."""
        if config.init is None:
            return config, {}
        backbone, classifier, found, small_images = load_classifier(config.init, config.arch, require_classifier=False)
        print(f"init: {config.init} ({found}{'' if classifier is not None else ', no classifier: a new one'})")
        if classifier is not None and classifier.out_features != len(train_set.classes):
            raise SeedError(f"--init {config.init} classifies {classifier.out_features} classes, --data {config.data} has "
                            f"{len(train_set.classes)}; start from a classifier of these classes")
        return init_stem(config, config.init, small_images), {"init": (backbone, classifier)}

    @classmethod
    def build(cls, config: SupervisedConfig, parts: dict[str, Any], num_classes: int, run_dir: Path) -> "Supervised":
        module = cls(config, num_classes)
        backbone, classifier = parts.get("init", (None, None))
        if backbone is not None:
            module.backbone.load_state_dict(backbone.state_dict())
        if classifier is not None:
            module.head.load_state_dict(classifier.state_dict())
        return module

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

