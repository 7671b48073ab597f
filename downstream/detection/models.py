"""torchvision detectors around a transferred backbone: Faster / Mask R-CNN, C4 (res5 in the RoI head, MoCo's extra norm) or FPN."""

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from seed.errors import SeedError


def is_resnet(backbone: nn.Module) -> bool:
    return all(hasattr(backbone, name) for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"))


def _channels(stage: nn.Module) -> int:
    """Output channels of a ResNet stage: its last norm layer's width."""
    return [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


class Res5Head(nn.Module):
    """res5 run on pooled RoI features, then a BatchNorm (MoCo's ``Res5ROIHeadsExtraNorm``).

    The C4 box head pools its output to a vector; the Mask R-CNN mask head
    shares this very module, as detectron2's C4 heads share res5.
    """

    def __init__(self, res5: nn.Module, channels: int) -> None:
        super().__init__()
        self.res5 = res5
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.res5(x))


def build_detector(backbone: nn.Module, num_classes: int, head: str, masks: bool, plan: dict[str, Any], roi_per_image: int = 512) -> nn.Module:
    """A torchvision Faster R-CNN (Mask R-CNN with ``masks``) on ``backbone``; ``num_classes`` counts background.

    ResNets: ``c4`` keeps stem..res4 as the backbone with one anchor map (5
    sizes x 3 ratios, detectron2's), RoIAlign 14x14 and res5 + norm + average
    pool as box head; ``fpn`` puts torchvision's FPN on res2..res5. Other
    backbones give their last feature map to a two-layer MLP box head.

    Anchors keep detectron2's sizes (32-512 px) at every ``--image-size``: they
    go with the feature strides, which do not shrink with the image. Scaled with
    the image (4-61 px at 96 px) they halved VOC07 AP50 on the synthetic
    benchmark (40.9 vs 84.3 for the SEED student, ``bench/detection_bench.py``).
    """
    detector = MaskRCNN if masks else FasterRCNN
    common = {"min_size": tuple(plan["train_sizes"]), "max_size": plan["max_size"], "box_batch_size_per_image": roi_per_image}
    if is_resnet(backbone) and head == "fpn":
        channels = [_channels(getattr(backbone, f"layer{i}")) for i in range(1, 5)]
        body = BackboneWithFPN(backbone, {f"layer{i}": str(i - 1) for i in range(1, 5)}, channels, 256, extra_blocks=LastLevelMaxPool())
        return detector(body, num_classes=num_classes, **common)
    anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    single = {"rpn_anchor_generator": anchors, "rpn_pre_nms_top_n_train": 12000, "rpn_pre_nms_top_n_test": 6000, **common}
    if is_resnet(backbone):
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
        body = nn.Sequential(OrderedDict((name, getattr(backbone, name)) for name in names))
        body.out_channels = _channels(backbone.layer3)
        res5 = Res5Head(backbone.layer4, _channels(backbone.layer4))
        width = _channels(backbone.layer4)
        box_head = nn.Sequential(res5, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        parts = {"box_roi_pool": MultiScaleRoIAlign(["0"], 14, sampling_ratio=0), "box_head": box_head,
                 "box_predictor": FastRCNNPredictor(width, num_classes)}
        if masks:
            parts.update(mask_roi_pool=MultiScaleRoIAlign(["0"], 14, sampling_ratio=0), mask_head=res5,
                         mask_predictor=MaskRCNNPredictor(width, 256, num_classes))
        return detector(body, **parts, **single)
    if not hasattr(backbone, "features"):
        raise SeedError(f"backbone {getattr(backbone, 'arch', type(backbone).__name__)} has no feature maps to detect on")
    body = backbone.features
    body.out_channels = backbone.features[-1].out_channels
    parts = {"box_roi_pool": MultiScaleRoIAlign(["0"], 7, sampling_ratio=0), "box_head": TwoMLPHead(body.out_channels * 49, 1024),
             "box_predictor": FastRCNNPredictor(1024, num_classes)}
    if masks:
        parts.update(mask_roi_pool=MultiScaleRoIAlign(["0"], 14, sampling_ratio=0), mask_head=MaskRCNNHeads(body.out_channels, [256] * 4, 1),
                     mask_predictor=MaskRCNNPredictor(256, 256, num_classes))
    return detector(body, **parts, **single)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on every parameter except norm layers' (detectron2's ``WEIGHT_DECAY_NORM = 0``)."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    seen: set[int] = set()
    decay, no_decay = [], []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if isinstance(module, norm_types) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

