"""torchvision detectors around a transferred backbone: Faster / Mask R-CNN, C4 (res5 in the RoI head, MoCo's extra norm) or FPN.

ResNets (ours, ``tv:resnet*``, ``timm:resnet*``) and torchvision's MobileNetV3 / EfficientNet (their ``features``) are read
directly; any other ``timm:NAME`` CNN gives its maps through timm's ``features_only`` machinery (:class:`TimmMaps`); a
network that gives tokens, not maps (a ViT), stops with one line.
"""

import math
from collections import OrderedDict
from typing import Any, NamedTuple

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.poolers import initLevelMapper

from seed.errors import SeedError
from seed.models import timm_module


def is_resnet(backbone: nn.Module) -> bool:
    return all(hasattr(backbone, name) for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"))


def detector_name(backbone: nn.Module, head: str, masks: bool) -> str:
    """What :func:`build_detector` builds, for results: ``Faster R-CNN C4``, ``Mask R-CNN FPN``, ``Faster R-CNN last-map``."""
    kind = "FPN" if head == "fpn" else "C4" if is_resnet(backbone) else "last-map"
    return f"{'Mask' if masks else 'Faster'} R-CNN {kind}"


class Level(NamedTuple):
    """A block of a backbone's ``features`` whose output a feature pyramid reads."""

    block: str  # its name in ``features``
    stride: int  # input pixels per output pixel
    channels: int


#: Side of the blank image that shows a backbone's strides (every stride here divides it).
PROBE = 256


@torch.no_grad()
def resolution_ends(features: nn.Sequential, probe: int = PROBE) -> list[Level]:
    """The last block at each resolution of ``features``: every block after which the map shrinks, and the final one.

    Found by running a blank ``probe`` x ``probe`` image through the blocks in eval mode (no BatchNorm statistic moves,
    no random number is drawn), so one rule serves every MobileNetV3 and EfficientNet, small-image stems included.
    """
    was_training = features.training
    features.eval()
    x = torch.zeros(1, 3, probe, probe, device=next(features.parameters()).device)
    outputs = []
    for name, block in features.named_children():
        x = block(x)
        outputs.append(Level(name, probe // x.shape[-1], x.shape[1]))
    features.train(was_training)
    return [level for level, after in zip(outputs, [*outputs[1:], None], strict=True) if after is None or after.stride > level.stride]


def feature_pyramid(backbone: nn.Module) -> BackboneWithFPN:
    """torchvision's FPN (256 channels) on the last three resolutions of a MobileNetV3 / EfficientNet ``features``
    (strides 8, 16, 32 with the full-size stem), plus a max-pooled level above them, as on a ResNet's res5."""
    levels = resolution_ends(backbone.features)[-3:]
    return BackboneWithFPN(backbone.features, {level.block: str(i) for i, level in enumerate(levels)}, [level.channels for level in levels], 256,
                           extra_blocks=LastLevelMaxPool())


class TimmMaps(nn.Module):
    """The last ``count`` feature maps of a timm model, by timm's ``FeatureListNet`` (what ``features_only=True`` builds)
    over the very modules that hold the transferred weights; with ``fpn``, torchvision's FPN (256 channels) on them plus
    a max-pooled level, as on a ResNet's res5; without, the last map alone (``last-map``)."""

    def __init__(self, backbone: nn.Module, fpn: bool) -> None:
        super().__init__()
        arch = getattr(backbone, "arch", type(backbone).__name__)
        info = getattr(backbone, "feature_info", None)
        if not info:
            raise SeedError(f"backbone {arch} declares no feature maps (no timm feature_info) to detect on; use a CNN of timm, ours or tv:NAME")
        count = min(3 if fpn else 1, len(info))
        flatten = any("." in level["module"] for level in info)  # maps inside a Sequential (EfficientNet's blocks.N)
        self.body = timm_module().models.FeatureListNet(backbone, out_indices=tuple(range(len(info) - count, len(info))), flatten_sequential=flatten)
        self.names = [str(i) for i in range(count)]
        channels = self.body.feature_info.channels()
        self.fpn = FeaturePyramidNetwork(channels, 256, extra_blocks=LastLevelMaxPool()) if fpn else None
        self.out_channels = 256 if fpn else channels[-1]
        training = self.training
        try:
            with torch.no_grad():
                probe = self.body.eval()(torch.zeros(1, 3, PROBE, PROBE))
        except (RuntimeError, AssertionError):
            probe = None
        self.body.train(training)
        if probe is None or any(out.dim() != 4 for out in probe):
            raise SeedError(f"backbone {arch} gives tokens, not feature maps (a ViT); seed-eval detection needs a convolutional backbone")

    def forward(self, images: torch.Tensor) -> torch.Tensor | OrderedDict:
        maps = self.body(images)
        if self.fpn is None:
            return maps[-1]
        return self.fpn(OrderedDict(zip(self.names, maps, strict=True)))


@torch.no_grad()
def pin_roi_scales(detector: nn.Module, probe: int = PROBE) -> None:
    """Give the RoI poolers the true scale of each feature map, 1 / its stride, read off a blank image in eval mode.

    torchvision's ``MultiScaleRoIAlign`` guesses them at its first forward from that batch's image and map sizes and
    keeps the guess: at image sizes that are not multiples of the largest stride (small ``--image-size``) it is off by
    2x, and it depends on which batch came first, so a resumed run would pool unlike an uninterrupted one.
    """
    training = detector.backbone.training
    maps = detector.backbone.eval()(torch.zeros(1, 3, probe, probe, device=next(detector.parameters()).device))
    detector.backbone.train(training)
    maps = {"0": maps} if isinstance(maps, torch.Tensor) else maps  # one map is named "0", as GeneralizedRCNN names it
    for pooler in (detector.roi_heads.box_roi_pool, getattr(detector.roi_heads, "mask_roi_pool", None)):
        if pooler is None:
            continue
        strides = [probe // value.shape[-1] for name, value in maps.items() if name in pooler.featmap_names]
        pooler.scales = [1 / stride for stride in strides]
        pooler.map_levels = initLevelMapper(int(math.log2(strides[0])), int(math.log2(strides[-1])), pooler.canonical_scale, pooler.canonical_level)


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
    backbones (MobileNetV3, EfficientNet) have no res5 to move: ``fpn`` puts the
    FPN on their last three resolutions (:func:`feature_pyramid`) with the 5
    sizes x 3 ratios at every level, as torchvision's MobileNetV3-FPN detector
    does, since the finest level (stride 8) is coarser than res2; ``c4`` gives
    their last feature map to a two-layer MLP box head (``last-map``).

    Anchors keep detectron2's sizes (32-512 px) at every ``--image-size``: they
    go with the feature strides, which do not shrink with the image. Scaled with
    the image (4-61 px at 96 px) they halved VOC07 AP50 on the synthetic
    benchmark (40.9 vs 84.3 for the SEED student, ``bench/detection_bench.py``).
    The RoI poolers are given each map's true scale (:func:`pin_roi_scales`).
    """
    model = _assemble(backbone, num_classes, head, masks, plan, roi_per_image)
    pin_roi_scales(model)
    return model


def _assemble(backbone: nn.Module, num_classes: int, head: str, masks: bool, plan: dict[str, Any], roi_per_image: int) -> nn.Module:
    detector = MaskRCNN if masks else FasterRCNN
    common = {"min_size": tuple(plan["train_sizes"]), "max_size": plan["max_size"], "box_batch_size_per_image": roi_per_image}
    if is_resnet(backbone) and head == "fpn":
        channels = [_channels(getattr(backbone, f"layer{i}")) for i in range(1, 5)]
        body = BackboneWithFPN(backbone, {f"layer{i}": str(i - 1) for i in range(1, 5)}, channels, 256, extra_blocks=LastLevelMaxPool())
        return detector(body, num_classes=num_classes, **common)
    timm_maps = not is_resnet(backbone) and not hasattr(backbone, "features")
    if timm_maps and not str(getattr(backbone, "arch", "")).startswith("timm:"):
        raise SeedError(f"backbone {getattr(backbone, 'arch', type(backbone).__name__)} has no feature maps to detect on")
    sizes, ratios = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)
    if head == "fpn":
        body = TimmMaps(backbone, fpn=True) if timm_maps else feature_pyramid(backbone)
        maps = body.names if timm_maps else list(body.body.return_layers.values())  # the pooled level above has anchors, no RoI
        anchors = AnchorGenerator(sizes=(sizes,) * (len(maps) + 1), aspect_ratios=(ratios,) * (len(maps) + 1))
        pools = {"box_roi_pool": MultiScaleRoIAlign(maps, 7, sampling_ratio=2)}
        if masks:
            pools["mask_roi_pool"] = MultiScaleRoIAlign(maps, 14, sampling_ratio=2)
        return detector(body, num_classes=num_classes, rpn_anchor_generator=anchors, **pools, **common)
    anchors = AnchorGenerator(sizes=(sizes,), aspect_ratios=(ratios,))
    single = {"rpn_anchor_generator": anchors, "rpn_pre_nms_top_n_train": 12000, "rpn_pre_nms_top_n_test": 6000, **common}
    if is_resnet(backbone):
        names = ("conv1", "bn1", "relu" if hasattr(backbone, "relu") else "act1", "maxpool", "layer1", "layer2", "layer3")  # timm: act1
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
    if timm_maps:
        body = TimmMaps(backbone, fpn=False)
    else:
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

