"""The architecture registry: shapes, parameter counts and torchvision-compatible names."""

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torchvision import models

from seed.backbones import available, create_backbone, feature_dim
from seed.errors import SeedError

RESNETS = {"r18", "r34", "r50", "r101", "r152", "r50x2", "r50x4"}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _input_for(name: str) -> tuple[torch.Tensor, bool]:
    """ResNets on 32px with the small-image stem, the rest on 64px with the default one."""
    if name in RESNETS:
        return torch.randn(2, 3, 32, 32), True
    return torch.randn(2, 3, 64, 64), False


def test_available_lists_every_architecture_in_a_stable_order() -> None:
    assert available() == ["r18", "r34", "r50", "r101", "r152", "r50x2", "r50x4", "mbv3l", "mbv3s", "effb0", "effb1"]


@pytest.mark.parametrize("name", available())
def test_backbone_builds_and_maps_images_to_pooled_features(name: str) -> None:
    images, small_images = _input_for(name)
    model = create_backbone(name, small_images=small_images)
    assert model.arch == name
    assert model.feature_dim == feature_dim(name)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])  # the wide ResNets build via meta
    with torch.no_grad():
        features = model.eval()(images)
    assert features.shape == (2, feature_dim(name))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("r18", 11_176_512),
        ("r50", 23_508_032),
        # SwAV's README (facebookresearch/swav, "Larger architectures") lists RN50-w2 at 94M and RN50-w4 at 375M
        ("r50x2", 93_907_072),
        ("r50x4", 375_378_176),
        ("mbv3l", 4_202_032),  # torchvision's 5,483,032 minus the 1280->1000 Linear
        ("effb0", 4_007_548),  # torchvision's 5,288,548 minus the 1280->1000 Linear
    ],
)
def test_parameter_count_without_classifier(name: str, expected: int) -> None:
    with torch.device("meta"):  # counting needs shapes only
        assert _num_params(create_backbone(name)) == expected


@pytest.mark.parametrize("name", ["r50x2", "r50x4"])
def test_wide_resnet_keeps_torchvision_parameter_names(name: str) -> None:
    with torch.device("meta"):
        wide = create_backbone(name).state_dict()
        reference = models.resnet50().state_dict()
    assert set(wide) == {key for key in reference if not key.startswith("fc.")}
    # as in SwAV's released RN50-w2 weights (128x128, see facebookresearch/swav issue #49): inner width == planes
    widen = int(name[-1])
    assert wide["layer1.0.conv1.weight"].shape == (64 * widen, 64 * widen, 1, 1)
    assert wide["conv1.weight"].shape == (64 * widen, 3, 7, 7)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(SeedError, match="unknown architecture 'r19'") as error:
        create_backbone("r19")
    assert all(name in str(error.value) for name in available())
    with pytest.raises(SeedError, match="r19"):
        feature_dim("r19")


@pytest.mark.parametrize(
    ("name", "make", "classifier_keys"),
    [
        ("r18", models.resnet18, {"fc.weight", "fc.bias"}),
        ("mbv3l", models.mobilenet_v3_large, {"classifier.3.weight", "classifier.3.bias"}),
    ],
)
def test_torchvision_state_dict_loads_with_only_classifier_keys_unexpected(name: str, make: Callable[[], nn.Module], classifier_keys: set[str]) -> None:
    result = create_backbone(name).load_state_dict(make().state_dict(), strict=False)
    assert result.missing_keys == []
    assert set(result.unexpected_keys) == classifier_keys


def test_small_images_resnet_stem_keeps_a_4x4_map_at_32px() -> None:
    model = create_backbone("r18", small_images=True)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    shapes = []
    model.layer4.register_forward_hook(lambda _module, _inputs, output: shapes.append(output.shape))
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, 32, 32))
    assert shapes == [(2, 512, 4, 4)]


def test_default_resnet_stem_is_torchvisions() -> None:
    model = create_backbone("r18")
    assert model.conv1.kernel_size == (7, 7)
    assert model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("name", ["mbv3l", "mbv3s", "effb0", "effb1"])
def test_small_images_sets_first_conv_stride_to_one(name: str) -> None:
    assert create_backbone(name).features[0][0].stride == (2, 2)
    model = create_backbone(name, small_images=True)
    assert model.features[0][0].stride == (1, 1)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, feature_dim(name))


@pytest.mark.parametrize("name, rate", [("r18", 0.0), ("r50", 0.0), ("mbv3l", 0.2), ("mbv3s", 0.2), ("effb0", 0.2), ("effb1", 0.2)])
def test_feature_dropout_is_the_one_before_torchvisions_class_linear(name: str, rate: float) -> None:
    """Recorded, not applied: heads trained on the features use it (SEED's official MobileNetV3/EfficientNet students do)."""
    backbone = create_backbone(name, small_images=True)
    assert backbone.feature_dropout == rate
    tail = getattr(backbone, "classifier", None) or backbone.fc
    assert not any(isinstance(m, nn.Dropout) for m in tail.modules())
