"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning").

Two views, backbone + BN MLP head, NT-Xent over the (all-gathered) batch;
LARS with lr 0.3 x B/256 and 10 warm-up epochs as in the paper.
"""

import dataclasses

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor

from seed.config import ContrastiveConfig
from seed.module import TrainModule


@dataclasses.dataclass
class SimCLRConfig(ContrastiveConfig):
    """``seed-pretrain --method simclr``: the contrastive flags, nothing of its own."""


class SimCLR(TrainModule):
    """SimCLR with the paper's recipe (tau 0.5, LARS, wd 1e-6)."""

    STAGE, TITLE, CONFIG = "pretrain", "SimCLR", SimCLRConfig
    DEFAULTS = {"optimizer": "lars", "base_lr": 0.3, "weight_decay": 1e-6, "temperature": 0.5, "warmup_epochs": 10.0}

    def __init__(self, config: SimCLRConfig, num_classes: int) -> None:
        super().__init__(config, config.arch, num_classes)
        dim = self.backbone.feature_dim
        self.projection_head = SimCLRProjectionHead(dim, dim, config.embed_dim)
        self.criterion = NTXentLoss(config.temperature, gather_distributed=True)

    def training_step(self, batch: tuple[list[Tensor], Tensor], batch_idx: int) -> Tensor:
        (x0, x1), _ = batch
        z0, z1 = self.projection_head(self.backbone(torch.cat([x0, x1]))).chunk(2)
        with torch.autocast(self.device.type, enabled=False):  # cosine logits / tau in float32, not bf16's 8-bit mantissa
            loss = self.criterion(z0.float(), z1.float())
        self.log("loss", loss, prog_bar=True)
        return loss
