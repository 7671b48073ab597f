"""Backbones from other libraries by name: ``timm:NAME`` (any timm model) and ``tv:NAME`` (any torchvision classifier).

:func:`seed.backbones.create_backbone` hands these names here, so every stage (pretraining, students, teachers,
evaluation) builds them the same way. Like ours, each backbone is the library's model object itself, not a wrapper:
its parameter names stay the library's, so the library's own state dicts load into it.

- ``timm:NAME`` is ``timm.create_model(NAME, num_classes=0)``: timm's pooled features (its ``global_pool``: the
  CLS token for DINOv2 and DeiT, the average for CNNs), ``num_features`` wide. For a ViT teacher the CLS token is
  the embedding its authors' objective trains (DINO's head, DeiT's classifier read it); DINOv2's linear-probe
  recipe (CLS concatenated with the mean patch token) is kept out so that every timm model's width is its ``num_features``.
- ``tv:NAME`` is ``torchvision.models.get_model(NAME)`` with its last Linear (``fc``, ``classifier[-1]``,
  ``heads.head``) replaced by Identity, its ``in_features`` wide; a Dropout just before it becomes ``feature_dropout``.

``small_images`` does nothing for them: they are built as their authors define them (our small-image stems are
our ResNets', MobileNetV3's and EfficientNet's). Hub weights come through :func:`seed.classifiers.hub_file`, which
saves them as a plain state dict, so every later step reads a file as it would one the user passed.
"""

import difflib
import math
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import Tensor, nn

from seed.errors import SeedError

PREFIXES = ("timm:", "tv:")
IMAGENET = tuple(IMAGENET_NORMALIZE["mean"]), tuple(IMAGENET_NORMALIZE["std"])


def is_external(name: str) -> bool:
    """Whether ``name`` is a timm or torchvision model rather than one of our registry names."""
    return name.startswith(PREFIXES)


def timm_module() -> Any:
    """The ``timm`` package, or one line saying how to install it."""
    try:
        import timm
        import timm.data
        import timm.optim
        import timm.utils
    except ImportError:
        raise SeedError("this needs timm, which is not installed; pip install timm (or the seed[timm] extra)") from None
    return timm


def _close(name: str, names: Sequence[str]) -> str:
    matches = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"did you mean {', '.join(matches)}?" if matches else "none is close"


def check_name(name: str) -> None:
    """Stop with one line, with close matches, when the library does not know ``name`` (``timm:NAME`` or ``tv:NAME``)."""
    family, inner = name.split(":", 1)
    if family == "timm":
        timm = timm_module()
        if not timm.is_model(inner):
            raise SeedError(f"timm has no model '{inner}' ({_close(inner.split('.')[0], timm.list_models())}); "
                            "timm.list_models('*PATTERN*') lists them")
        return
    from torchvision import models

    names = models.list_models(module=models)
    if inner not in names:
        raise SeedError(f"torchvision has no classification model '{inner}' ({_close(inner, names)}); torchvision.models.list_models() lists them")


def vit_size(model: nn.Module, state: Mapping[str, Tensor] | None) -> int | None:
    """The input size a timm ViT's weights were made for, from their ``pos_embed`` (None: the model's own fits)."""
    own, embed = getattr(model, "pos_embed", None), getattr(model, "patch_embed", None)
    if state is None or "pos_embed" not in state or own is None or embed is None or state["pos_embed"].shape == own.shape:
        return None
    tokens = state["pos_embed"].shape[1] - (own.shape[1] - embed.num_patches)
    side = math.isqrt(tokens)
    return side * embed.patch_size[0] if side * side == tokens else None


def create_timm(name: str, pretrained: bool, give_file: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained, **kwargs)``; its errors (not installed, unknown name, no download offline)
    as one line, ``give_file`` saying where the user can pass the weights instead."""
    timm = timm_module()
    check_name(f"timm:{name}")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as error:
        raise SeedError(f"timm model '{name}': {str(error).splitlines()[0]}") from None
    except Exception as error:  # noqa: BLE001 - the hub download fails in many ways offline
        raise SeedError(f"timm's pretrained weights of '{name}' could not be fetched ({type(error).__name__}); {give_file}") from None


def _timm(name: str, pretrained: bool, state: Mapping[str, Tensor] | None, give_file: str) -> nn.Module:
    model = create_timm(name, pretrained, give_file, num_classes=0)
    size = vit_size(model, state)
    if size is not None:  # weights of another input size (e.g. a ViT made with img_size=32): the model they fit
        model = create_timm(name, pretrained, give_file, num_classes=0, img_size=size)
    model.feature_dim = model.num_features
    model.feature_dropout = float(getattr(model, "drop_rate", 0.0) or 0.0)
    return model


def _last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """The classifier: the last Linear registered in the model, with its parent and attribute name."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not found:
        raise SeedError(f"torchvision's {type(model).__name__} has no Linear classifier to remove; use another model")
    path, linear = found[-1]
    parent_path, _, attribute = path.rpartition(".")
    return model.get_submodule(parent_path), attribute, linear


def _torchvision(name: str, pretrained: bool, give_file: str) -> nn.Module:
    from torchvision import models

    try:
        model = models.get_model(name, weights="DEFAULT" if pretrained else None)
    except (OSError, RuntimeError) as error:  # the download, offline
        raise SeedError(f"torchvision's weights of '{name}' could not be fetched ({type(error).__name__}); {give_file}") from None
    if getattr(model, "aux_logits", False):  # GoogLeNet / Inception v3: their auxiliary classifiers are training losses, not features
        model.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, name):
                setattr(model, name, None)
    parent, attribute, linear = _last_linear(model)
    model.feature_dropout = 0.0
    if isinstance(parent, nn.Sequential) and attribute.isdigit() and int(attribute) > 0 and isinstance(parent[int(attribute) - 1], nn.Dropout):
        model.feature_dropout = parent[int(attribute) - 1].p  # as for our MobileNetV3/EfficientNet: heads apply it
        parent[int(attribute) - 1] = nn.Identity()
    setattr(parent, attribute, nn.Identity())
    model.feature_dim = linear.in_features
    return model


def create_external(name: str, pretrained: bool = False, state: Mapping[str, Tensor] | None = None,
                    give_file: str = "pass the weights' file instead") -> nn.Module:
    """``timm:NAME`` or ``tv:NAME`` as a backbone (images -> pooled features) carrying ``.arch``, ``.feature_dim`` and
    ``.feature_dropout``; random weights unless ``pretrained`` (the hub's: needs internet, offline ``give_file`` says
    what to pass). ``state``: the weights it will load, when they decide its shape (a timm ViT's input size)."""
    check_name(name)
    family, inner = name.split(":", 1)
    model = _timm(inner, pretrained, state, give_file) if family == "timm" else _torchvision(inner, pretrained, give_file)
    model.arch = name
    return model


@cache
def external_feature_dim(name: str) -> int:
    """Pooled feature size of ``name``: the model is built once, on the meta device (no memory, no init time)."""
    check_name(name)
    try:
        with torch.device("meta"):
            return create_external(name).feature_dim
    except (NotImplementedError, RuntimeError):  # a model whose constructor reads tensor values
        return create_external(name).feature_dim


class Renormalize(nn.Module):
    """Images normalised with ImageNet's mean/std, renormalised with a model's own."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        ours = torch.tensor(IMAGENET[0]), torch.tensor(IMAGENET[1])
        self.register_buffer("scale", (ours[1] / torch.tensor(std)).view(1, 3, 1, 1))
        self.register_buffer("shift", ((ours[0] - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return images * self.scale + self.shift


def model_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std a timm model's weights expect (its ``pretrained_cfg``); ImageNet's for every other model."""
    settings = getattr(model, "pretrained_cfg", None) or {}
    return tuple(settings.get("mean", IMAGENET[0])), tuple(settings.get("std", IMAGENET[1]))


class TeacherInput(nn.Module):
    """What a teacher of another library reads of the student's crop: the same crop, resized to the teacher's input
    size (a ViT's ``img_size``; a ViT that takes any size gets the nearest multiple of its patch; a CNN any size, so
    none), then renormalised to the teacher's mean/std. SEED's single view: both networks see one crop."""

    def __init__(self, size: int | None, patch: int | None, mode: str, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.size, self.patch, self.mode = size, patch, mode
        self.renormalize = Renormalize(mean, std) if (tuple(mean), tuple(std)) != IMAGENET else nn.Identity()

    def forward(self, images: Tensor) -> Tensor:
        size = self.size or (max(self.patch, round(images.shape[-1] / self.patch) * self.patch) if self.patch else None)
        if size is not None and tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, size=(size, size), mode=self.mode, align_corners=False, antialias=True)
        return self.renormalize(images)


def teacher_input(model: nn.Module) -> TeacherInput | None:
    """The :class:`TeacherInput` of a timm model (None for ours and torchvision's, which read the crop as it is)."""
    if not str(getattr(model, "arch", "")).startswith("timm:"):
        return None
    settings = getattr(model, "pretrained_cfg", None) or {}
    mode = settings.get("interpolation") if settings.get("interpolation") in ("bilinear", "bicubic") else "bilinear"
    embed = getattr(model, "patch_embed", None)
    size = patch = None
    if embed is not None and getattr(embed, "patch_size", None) is not None:
        patch = int(embed.patch_size[0])
        fixed = getattr(embed, "strict_img_size", False) and not getattr(embed, "dynamic_img_size", False)
        size = int(embed.img_size[0]) if fixed and getattr(embed, "img_size", None) else None
    return TeacherInput(size, patch, mode, *model_normalization(model))


def with_input(model: nn.Module) -> nn.Module:
    """``model`` behind its :func:`teacher_input` (the model itself when it has none), keeping ``.arch`` and ``.feature_dim``."""
    adapter = teacher_input(model)
    if adapter is None:
        return model
    wrapped = nn.Sequential(adapter, model)
    wrapped.arch, wrapped.feature_dim = model.arch, model.feature_dim
    return wrapped


def check_image_size(model: nn.Module | str, image_size: int) -> None:
    """A timm ViT made for one input size, trained or evaluated at another, stops here in one line rather than in
    timm's assertion mid-run (a name is built on the meta device to find out)."""
    if isinstance(model, str):
        if not model.startswith("timm:"):
            return
        with torch.device("meta"):
            model = create_external(model)
    adapter = teacher_input(model)
    if adapter is not None and adapter.size is not None and adapter.size != image_size:
        raise SeedError(f"{model.arch} takes {adapter.size}px images (its img_size), not --image-size {image_size}; "
                        f"pass --image-size {adapter.size} or another model")
