"""A frozen teacher made cheap: eval mode, no grad, BatchNorm folded, channels_last.

The teacher is the cheap half of distillation: it only runs forward, so its
BatchNorm layers can be folded into the convolutions before training starts
(the outputs stay the same up to float rounding) and its forward runs under
``torch.inference_mode``.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold Conv+BN pairs of an eval-mode model (torch.fx); the model itself if it cannot be traced."""
    model.eval()
    try:
        return fuse(model, inplace=False)
    except Exception as error:  # noqa: BLE001 - any trace failure only costs speed
        warnings.warn(f"teacher BatchNorm not folded ({type(error).__name__}); it runs unfolded", stacklevel=2)
        return model


class FrozenTeacher(nn.Module):
    """Backbone (+ optional projection head) that maps images to embeddings, never trained.

    ``normalize`` L2-normalises the output (SEED's embeddings); off for
    classifiers whose logits are the target (MEAL V2). ``inputs`` turns the
    student's view into the teacher's input first (a timm ViT's own size and
    mean/std: :func:`seed.models.teacher_input`).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None, fold_bn: bool = True, channels_last: bool = False, normalize: bool = True,
                 inputs: nn.Module | None = None) -> None:
        super().__init__()
        self.inputs = inputs
        self.arch = backbone.arch
        self.feature_dim = backbone.feature_dim
        head = head.eval() if head is not None else None
        self.embed_dim = head(torch.zeros(2, backbone.feature_dim)).shape[1] if head is not None else backbone.feature_dim
        backbone = fold_batchnorm(backbone) if fold_bn else backbone.eval()
        self.channels_last = channels_last
        if channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        self.backbone = backbone
        self.head = head
        self.normalize = normalize
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenTeacher":
        """Always eval: the teacher's BatchNorm statistics are fixed."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        with torch.inference_mode():
            if self.inputs is not None:
                images = self.inputs(images)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            out = self.backbone(images)
            if self.head is not None:
                out = self.head(out)
            out = out.float()
            if self.normalize:
                out = F.normalize(out, dim=1)
        return out.clone()  # a normal tensor, usable in the student's autograd graph
