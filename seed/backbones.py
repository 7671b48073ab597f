"""The architecture registry: short name -> backbone that maps images to pooled features.

Each backbone is the torchvision model object itself with its classifier removed
(or, for MobileNetV3, cut after its first Linear + Hardswish as SEED does), not a
wrapper: parameter names stay torchvision's, so torchvision state dicts and
published MoCo/SwAV checkpoints (after prefix stripping) load with
``strict=False`` and only classifier keys left over. Models start from random
weights; loading pretrained ones happens elsewhere.

Three families of names, one door: ours (``r18``), ``timm:NAME`` (``timm:resnet18d``, any timm model) and
``tv:NAME`` (``tv:mobilenet_v3_small``, any torchvision classifier); the last two are built by :mod:`seed.models`.
"""

import difflib
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import Bottleneck, ResNet

from seed.errors import SeedError
from seed.models import create_external, external_feature_dim, is_external

Builder = Callable[[bool], nn.Module]


def _torchvision_init(conv: nn.Conv2d) -> nn.Conv2d:
    """Give a conv we create torchvision's ResNet init, so it starts like the layer it replaces."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class _WideResNet50(ResNet):
    """ResNet-50 with every width (stem and all stages) times ``widen``: SwAV's RN50-w2/w4.

    Inner bottleneck width equals ``planes`` (base width 64), which is what the
    released SwAV checkpoints hold (94M/375M params, e.g. ``layer1.0.conv1`` is
    128x128 for w2; see facebookresearch/swav issue #49), although SwAV's
    ``src/resnet50.py`` today sets ``base_width = 64 * widen``. This is not
    torchvision's ``wide_resnet50_2``, which widens only the inner convolution.
    """

    def __init__(self, widen: int) -> None:
        # torchvision's constructor hard-codes a 64-wide stem: let it build its layers on the
        # meta device (no memory, no init time) and replace every one that holds parameters.
        with torch.device("meta"):
            super().__init__(Bottleneck, [1, 1, 1, 1])
        width = 64 * widen
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(Bottleneck, width, 3)
        self.layer2 = self._make_layer(Bottleneck, width * 2, 4, stride=2)
        self.layer3 = self._make_layer(Bottleneck, width * 4, 6, stride=2)
        self.layer4 = self._make_layer(Bottleneck, width * 8, 3, stride=2)
        self.fc = nn.Identity()  # a backbone: no classifier
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                _torchvision_init(module)


def _resnet(make: Callable[[], nn.Module]) -> Builder:
    def build(small_images: bool) -> nn.Module:
        model = make()
        model.fc = nn.Identity()
        if small_images:
            model.conv1 = _torchvision_init(nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False))
            model.maxpool = nn.Identity()
        return model

    return build


def _stride_one_stem(model: nn.Module) -> None:
    """Small images: the first conv of MobileNetV3/EfficientNet keeps full resolution."""
    model.features[0][0].stride = (1, 1)


def _mobilenet_v3(make: Callable[[], nn.Module]) -> Builder:
    def build(small_images: bool) -> nn.Module:
        model = make()
        # keep Linear + Hardswish (SEED's feature layer); the Dropout before the class Linear becomes feature_dropout
        model.feature_dropout = model.classifier[2].p
        model.classifier = nn.Sequential(model.classifier[0], model.classifier[1])
        if small_images:
            _stride_one_stem(model)
        return model

    return build


def _efficientnet(make: Callable[[], nn.Module]) -> Builder:
    def build(small_images: bool) -> nn.Module:
        model = make()
        model.feature_dropout = model.classifier[0].p  # the Dropout before the class Linear
        model.classifier = nn.Identity()
        if small_images:
            _stride_one_stem(model)
        return model

    return build


# name -> (builder taking small_images, pooled feature dim); order is what available() returns
_REGISTRY: dict[str, tuple[Builder, int]] = {
    "r18": (_resnet(models.resnet18), 512),
    "r34": (_resnet(models.resnet34), 512),
    "r50": (_resnet(models.resnet50), 2048),
    "r101": (_resnet(models.resnet101), 2048),
    "r152": (_resnet(models.resnet152), 2048),
    "r50x2": (_resnet(lambda: _WideResNet50(2)), 4096),
    "r50x4": (_resnet(lambda: _WideResNet50(4)), 8192),
    "mbv3l": (_mobilenet_v3(models.mobilenet_v3_large), 1280),
    "mbv3s": (_mobilenet_v3(models.mobilenet_v3_small), 1024),
    "effb0": (_efficientnet(models.efficientnet_b0), 1280),
    "effb1": (_efficientnet(models.efficientnet_b1), 1280),
}


def available() -> list[str]:
    """Registry names in a fixed order (by family, smaller first), for help texts and errors."""
    return list(_REGISTRY)


def _lookup(name: str) -> tuple[Builder, int]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, available(), n=3, cutoff=0.5)
        if name in models.list_models(module=models):
            close.append(f"tv:{name}")
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise SeedError(f"unknown architecture '{name}'; choose one of: {', '.join(available())}, timm:NAME or tv:NAME{hint}")
    return _REGISTRY[name]


def feature_dim(name: str) -> int:
    """Pooled feature size of ``name``, without building it (for sizing heads up front; a timm or torchvision model is
    built once, on the meta device)."""
    return external_feature_dim(name) if is_external(name) else _lookup(name)[1]


def create_backbone(name: str, small_images: bool = False, state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Build ``name`` with random weights; maps (N, 3, H, W) images to (N, feature_dim) features.

    The result carries ``.feature_dim``, ``.arch`` (the registry name) and
    ``.feature_dropout``: the dropout rate torchvision (and the official SEED
    code) applies to the pooled features before the last Linear, 0.2 for
    MobileNetV3 and EfficientNet-B0/B1, 0 for ResNets. The backbone does not
    apply it (features stay deterministic); heads trained on it do.
    ``small_images=True`` adapts the stem to 32px data (CIFAR, Fashion-MNIST) so
    the last stage keeps a spatial map: ResNets get a 3x3 stride-1 ``conv1`` and
    no max-pool; MobileNetV3 and EfficientNet get a stride-1 first convolution; a timm or torchvision model
    (:mod:`seed.models`) ignores it and keeps its authors' stem. ``state``: the weights it will load, when they
    decide the model's shape (a timm ViT's input size).
    """
    if is_external(name):
        return create_external(name, state=state)
    build, dim = _lookup(name)
    model = build(small_images)
    model.feature_dropout = getattr(model, "feature_dropout", 0.0)
    model.feature_dim = dim
    model.arch = name
    return model
