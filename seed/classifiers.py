"""Classifiers by name or file, for labelled distillation: teachers (ours, torchvision's, timm's) and student inits.

A teacher maps images to logits; it is frozen, BatchNorm folded (:class:`seed.teacher.FrozenTeacher`). A timm model
expecting another mean/std than ImageNet's gets its input renormalised, so every network here reads the same images.
Weights come from a file (``weights_only``) or, without one, from torchvision's or timm's hub (needs internet; offline,
the error names the file to pass).
"""

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import Tensor, nn

from seed.backbones import available
from seed.checkpoints import atomic_save, load_classifier, load_file
from seed.errors import SeedError
from seed.precision import use_channels_last
from seed.teacher import FrozenTeacher


class _Renormalize(nn.Module):
    """Images normalised with ImageNet's mean/std, renormalised with a timm model's own."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        ours = torch.tensor(IMAGENET_NORMALIZE["mean"]), torch.tensor(IMAGENET_NORMALIZE["std"])
        self.register_buffer("scale", (ours[1] / torch.tensor(std)).view(1, 3, 1, 1))
        self.register_buffer("shift", ((ours[0] - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return images * self.scale + self.shift


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


def timm_model(name: str, pretrained: bool, give_file: str) -> nn.Module:
    """``timm.create_model(name)``; its errors (not installed, unknown name, no download offline) as one line, ``give_file``
    saying where the user can pass the weights instead."""
    try:
        import timm
    except ImportError:
        raise SeedError(f"timm:{name} is none of ours ({', '.join(available())}) and timm is not installed; pip install timm "
                        "(or the seed[timm] extra)") from None
    try:
        return timm.create_model(name, pretrained=pretrained)
    except RuntimeError as error:
        raise SeedError(f"timm model '{name}': {str(error).splitlines()[0]}") from None
    except Exception as error:  # noqa: BLE001 - the hub download fails in many ways offline
        raise SeedError(f"timm's pretrained weights of '{name}' could not be fetched ({type(error).__name__}); {give_file}") from None


def timm_classifier(name: str, checkpoint: str | None) -> nn.Module:
    """A timm classifier by name: weights from ``checkpoint`` (weights_only), else timm's pretrained ones."""
    model = timm_model(name, not checkpoint, "pass the file in --teacher-checkpoints")
    if checkpoint:
        content = load_file(checkpoint)
        state = content.get("state_dict", content.get("model", content)) if isinstance(content, dict) else content
        state = {k.removeprefix("module."): v for k, v in state.items()}
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        if isinstance(classifier, str) and f"{classifier}.weight" in state and state[f"{classifier}.weight"].shape[0] != model.num_classes:
            model.reset_classifier(state[f"{classifier}.weight"].shape[0])  # a fine-tuned model of other classes
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise SeedError(f"checkpoint {checkpoint} does not fit timm's {name}: {str(error).splitlines()[1].strip()[:200]}") from None
    settings = getattr(model, "pretrained_cfg", None) or {}
    ours = tuple(IMAGENET_NORMALIZE["mean"]), tuple(IMAGENET_NORMALIZE["std"])
    mean, std = tuple(settings.get("mean", ours[0])), tuple(settings.get("std", ours[1]))
    wrapped = model if (mean, std) == ours else nn.Sequential(_Renormalize(mean, std), model)
    wrapped.arch, wrapped.feature_dim = f"timm:{name}", model.num_classes
    return wrapped


TORCHVISION_NAMES = {"r18": "resnet18", "r34": "resnet34", "r50": "resnet50", "r101": "resnet101", "r152": "resnet152",
                     "mbv3l": "mobilenet_v3_large", "mbv3s": "mobilenet_v3_small", "effb0": "efficientnet_b0", "effb1": "efficientnet_b1"}


def torchvision_file(arch: str, version: str = "DEFAULT") -> str:
    """torchvision's ImageNet classifier weights of ``arch``: the file in torch.hub's cache, downloaded there when missing."""
    from torchvision.models import get_model_weights

    if arch not in TORCHVISION_NAMES:
        raise SeedError(f"{arch} has no torchvision weights; give its file ({', '.join(TORCHVISION_NAMES)} have them)")
    weights = getattr(get_model_weights(TORCHVISION_NAMES[arch]), version)
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(weights.url, str(path), progress=False)
        except (OSError, RuntimeError) as error:
            raise SeedError(f"torchvision's {weights} weights could not be fetched ({type(error).__name__}); "
                            f"put {Path(weights.url).name} in {path.parent} or pass the file") from None
    return str(path)


def timm_student_file(name: str) -> str:
    """timm's pretrained classifier ``name`` saved as a state dict in torch.hub's cache, to start a student of ours from.

    The public MEAL V2 code starts its ResNet-50 from timm's ``resnet50`` of 2020, 79.0 % (now the
    ``resnet50.ram_in1k`` tag), not from torchvision's 76.15 %. timm's ResNets keep torchvision's layout, so the file
    loads as a torchvision state dict. The student is fed ImageNet-normalised images, so the model must expect them.
    """
    path = Path(torch.hub.get_dir()) / "checkpoints" / f"timm-{name}.pth"
    if not path.is_file():
        model = timm_model(name, True, "pass the weights' file to --student-init instead")
        settings = getattr(model, "pretrained_cfg", None) or {}
        expected = [round(v, 3) for v in (*IMAGENET_NORMALIZE["mean"], *IMAGENET_NORMALIZE["std"])]
        if [round(v, 3) for v in (*settings.get("mean", ()), *settings.get("std", ()))] not in ([], expected):
            raise SeedError(f"timm's {name} expects inputs normalised with mean {settings['mean']} and std {settings['std']}, "
                            "the student gets ImageNet's; start from a model trained on ImageNet-normalised inputs")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(model.state_dict(), path)
    return str(path)


def load_student_init(config: Any, default: Path | None = None) -> tuple[str | None, nn.Module | None, nn.Linear | None, bool | None]:
    """``--student-init`` (else ``default`` when that file exists): path, backbone, classifier (or None) and stem."""
    path = config.student_init
    if path is None and default is not None and default.is_file():
        path = str(default)
    if path == "torchvision":  # ImageNet V1 weights: the paper's starting point (R-50 76.15, R-18 69.76)
        path = torchvision_file(config.student, "IMAGENET1K_V1")
    elif path is not None and path.startswith("timm:"):  # the public code's start (R-50: timm's 79.0 %)
        print(f"student init: timm's pretrained {path.removeprefix('timm:')}")
        path = timm_student_file(path.removeprefix("timm:"))
    if path is None:
        return None, None, None, None
    backbone, classifier, found, small_images = load_classifier(path, config.student, require_classifier=False)
    print(f"student init: {path} ({found}{'' if classifier is not None else ', no classifier: a new one'})")
    return path, backbone, classifier, small_images


def init_stem(config: Any, path: str | None, small_images: bool | None) -> Any:
    """The config with the stem of the weights it starts from (``small_images`` as the file records it, None: unknown);
    a ``--small-images`` flag that contradicts the file stops here, not in a shape mismatch."""
    if small_images is None:
        return config
    if config.small_images is not None and config.small_images != small_images:
        raise SeedError(f"{path} was trained with{'' if small_images else 'out'} the small-image stem; "
                        f"drop --{'no-' if small_images else ''}small-images")
    return dataclasses.replace(config, small_images=small_images)


def load_teacher(arch: str | None, checkpoint: str | None, config: Any) -> tuple[FrozenTeacher, str]:
    """A frozen classifier (images -> logits): inference mode, BatchNorm folded, channels_last on GPU."""
    if arch is not None and arch not in available():
        model, head, found = timm_classifier(arch.removeprefix("timm:"), checkpoint), None, "timm"
    else:
        model, head, found, _ = load_classifier(checkpoint or torchvision_file(arch), arch)
    return FrozenTeacher(model, head, fold_bn=config.teacher_fold_bn, channels_last=use_channels_last(config), normalize=False), found
