"""The architecture registry: short name -> backbone that maps images to pooled features.

Each backbone is the torchvision model itself with its classifier removed (or,
for MobileNetV3, truncated after its first layer as SEED does), so parameter
names stay torchvision's and published state dicts load without renaming.
"""

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import Bottleneck, ResNet

from seed.errors import SeedError


class WideResNet50(ResNet):
    """ResNet-50 with every width (stem and all four stages) multiplied by ``widen``.

    This is SwAV's and SimCLR's ``resnet50w2``/``resnet50w4``, not torchvision's
    ``wide_resnet50_2`` (which widens only the bottleneck's inner convolution).
    """

    def __init__(self, widen: int) -> None:
        super().__init__(Bottleneck, [1, 1, 1, 1], width_per_group=64)
        width = 64 * widen
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(Bottleneck, width, 3)
        self.layer2 = self._make_layer(Bottleneck, width * 2, 4, stride=2)
        self.layer3 = self._make_layer(Bottleneck, width * 4, 6, stride=2)
        self.layer4 = self._make_layer(Bottleneck, width * 8, 3, stride=2)
        self.fc = nn.Linear(width * 8 * Bottleneck.expansion, 1000)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def _resnet(make: Callable[[], ResNet]) -> Callable[[bool], nn.Module]:
    def build(small_images: bool) -> nn.Module:
        model = make()
        model.fc = nn.Identity()
        if small_images:
            model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        return model

    return build


def _stem_stride_one(model: nn.Module) -> None:
    """MobileNet/EfficientNet on small images: the first conv keeps the full resolution."""
    model.features[0][0].stride = (1, 1)


def _mobilenet(make: Callable[[], nn.Module]) -> Callable[[bool], nn.Module]:
    def build(small_images: bool) -> nn.Module:
        model = make()
        model.classifier = nn.Sequential(model.classifier[0], model.classifier[1])  # Linear + Hardswish, as in SEED
        if small_images:
            _stem_stride_one(model)
        return model

    return build


def _efficientnet(make: Callable[[], nn.Module]) -> Callable[[bool], nn.Module]:
    def build(small_images: bool) -> nn.Module:
        model = make()
        model.classifier = nn.Identity()
        if small_images:
            _stem_stride_one(model)
        return model

    return build


#: name -> (builder taking small_images, feature dim)
_REGISTRY: dict[str, tuple[Callable[[bool], nn.Module], int]] = {
    "r18": (_resnet(models.resnet18), 512),
    "r34": (_resnet(models.resnet34), 512),
    "r50": (_resnet(models.resnet50), 2048),
    "r101": (_resnet(models.resnet101), 2048),
    "r152": (_resnet(models.resnet152), 2048),
    "r50x2": (_resnet(lambda: WideResNet50(2)), 4096),
    "r50x4": (_resnet(lambda: WideResNet50(4)), 8192),
    "mbv3l": (_mobilenet(models.mobilenet_v3_large), 1280),
    "mbv3s": (_mobilenet(models.mobilenet_v3_small), 1024),
    "effb0": (_efficientnet(models.efficientnet_b0), 1280),
    "effb1": (_efficientnet(models.efficientnet_b1), 1280),
}


def available() -> list[str]:
    """Registry names, smallest family member first."""
    return list(_REGISTRY)


def _entry(name: str) -> tuple[Callable[[bool], nn.Module], int]:
    if name not in _REGISTRY:
        raise SeedError(f"unknown architecture '{name}'; choose one of: {', '.join(available())}")
    return _REGISTRY[name]


def feature_dim(name: str) -> int:
    """Pooled feature dimension of ``name`` without building it."""
    return _entry(name)[1]


def create_backbone(name: str, small_images: bool = False) -> nn.Module:
    """Build ``name`` with random weights; the module has ``.feature_dim`` and ``.arch``.

    ``small_images`` (32px data): ResNets get a 3x3 stride-1 stem without
    max-pool; MobileNetV3/EfficientNet a stride-1 first convolution.
    """
    build, dim = _entry(name)
    with torch.device("cpu"):
        model = build(small_images)
    model.feature_dim = dim
    model.arch = name
    return model
