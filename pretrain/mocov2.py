"""MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning").

Query encoder = backbone + MLP head; key encoder = its momentum copy; the
InfoNCE loss uses a queue of past keys as negatives (lightly's ``NTXentLoss``
with a memory bank); shuffle-BN via lightly's ``batch_shuffle``.

Shuffle-BN only helps when BatchNorm statistics are per GPU: on one device the
key encoder would normalise the whole batch at once, and the paper (Sec. 3.3)
shows the model then cheats through the batch statistics. There the key
encoder's BatchNorm normalises ``--bn-splits`` shuffled groups separately
(lightly's ``SplitBatchNorm``), which is what shuffle-BN on that many GPUs does.
"""

import copy
import dataclasses

import torch
from lightly.loss import NTXentLoss
from lightly.models.batchnorm import SplitBatchNorm
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn

from seed.config import ContrastiveConfig, option
from seed.module import TrainModule
from seed.queue import check_queue_size


@dataclasses.dataclass
class MoCoV2Config(ContrastiveConfig):
    """``seed-pretrain --method mocov2``."""

    queue_size: int = option("MoCo queue length K", 65536, at_least=1)
    moco_momentum: float = option("momentum of MoCo's key encoder", 0.999, at_least=0, at_most=1)
    moco_momentum_cosine: bool = option("raise the key-encoder momentum to 1 along a cosine (BYOL-style)", False)
    moco_head_bn: bool = option("BatchNorm in MoCo's projection head, as SimCLR's and MoCo v3's heads have (the MoCo v2 paper has none); "
                               "short runs need it to leave chance level", False)
    bn_splits: int | None = option("MoCo on one device: the key encoder's BatchNorm normalises this many shuffled groups separately, "
                                  "as shuffle-BN across GPUs does (default: 8 on one device, 1 under DDP, where real shuffle-BN runs)", at_least=1)


class MoCoV2(TrainModule):
    """MoCo v2 with the paper's recipe (MLP head, tau 0.2, K 65536, m 0.999, SGD lr 0.03 x B/256).

    ``--moco-head-bn`` adds BatchNorm to the head: at random init all embeddings point the same way, and
    without it a run of a few hundred steps does not leave the loss's chance level ln(K + 1).
    """

    STAGE, TITLE, CONFIG = "pretrain", "MoCo v2", MoCoV2Config
    DEFAULTS = {"optimizer": "sgd", "base_lr": 0.03, "weight_decay": 1e-4, "temperature": 0.2, "warmup_epochs": 0.0}

    @classmethod
    def configure(cls, config: MoCoV2Config) -> MoCoV2Config:
        """A queue smaller than the global batch would drop keys."""
        config = super().configure(config)
        check_queue_size(config.queue_size, config.batch_size * config.devices * config.num_nodes, "MoCo")
        return config

    def __init__(self, config: MoCoV2Config, num_classes: int) -> None:
        super().__init__(config, config.arch, num_classes)
        dim = self.backbone.feature_dim
        self.projection_head = MoCoProjectionHead(dim, dim, config.embed_dim, batch_norm=config.moco_head_bn)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        self.bn_splits = bn_splits(config)
        if self.bn_splits > 1:
            split_batchnorm(self.backbone_momentum, self.bn_splits)
            split_batchnorm(self.projection_head_momentum, self.bn_splits)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(config.temperature, memory_bank_size=(config.queue_size, config.embed_dim), gather_distributed=True)

    def training_step(self, batch: tuple[list[Tensor], Tensor], batch_idx: int) -> Tensor:
        (x_query, x_key), _ = batch
        momentum = self.config.moco_momentum
        if self.config.moco_momentum_cosine:
            momentum = cosine_schedule(self.global_step, int(self.trainer.estimated_stepping_batches), momentum, 1.0)
        update_momentum(self.backbone, self.backbone_momentum, momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, momentum)
        query = self.projection_head(self.backbone(x_query))
        with torch.no_grad():
            distributed = self.trainer.world_size > 1
            x_key, shuffle = batch_shuffle(x_key, distributed=distributed)
            key = self.projection_head_momentum(self.backbone_momentum(x_key))
            key = batch_unshuffle(key, shuffle, distributed=distributed)
        loss = self.criterion(query, key)
        self.log("loss", loss, prog_bar=True)
        return loss


def bn_splits(config: MoCoV2Config) -> int:
    """Groups for the key encoder's BatchNorm: the flag (default 8 on one device, 1 under DDP), at most, such that
    they divide the batch and hold two images or more each (BatchNorm needs two)."""
    wanted = config.bn_splits if config.bn_splits is not None else (1 if config.devices * config.num_nodes > 1 else 8)
    return next(n for n in range(max(wanted, 1), 0, -1) if config.batch_size % n == 0 and (config.batch_size // n >= 2 or n == 1))


class SplitBatchNorm2d(SplitBatchNorm):
    """``SplitBatchNorm`` that also takes channels_last maps (lightly's views the input as NCHW-contiguous)."""

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input.contiguous())


class SplitBatchNorm1d(SplitBatchNorm):
    """``SplitBatchNorm`` for the (N, C) features of a projection head."""

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input[:, :, None, None]).flatten(1)


def split_batchnorm(module: nn.Module, splits: int) -> None:
    """Replace every BatchNorm below ``module`` by a split one with the same weights and statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d | nn.BatchNorm2d):
            kind = SplitBatchNorm1d if isinstance(child, nn.BatchNorm1d) else SplitBatchNorm2d
            split = kind(child.num_features, splits, eps=child.eps, momentum=child.momentum)
            with torch.no_grad():
                split.weight.copy_(child.weight)
                split.bias.copy_(child.bias)
                split.running_mean.copy_(child.running_mean.repeat(splits))
                split.running_var.copy_(child.running_var.repeat(splits))
            setattr(module, name, split)
        else:
            split_batchnorm(child, splits)
