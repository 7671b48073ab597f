"""Classifiers by name or file, for labelled distillation: teachers (ours, torchvision's, timm's) and student inits.

A teacher maps images to logits; it is frozen, BatchNorm folded (:class:`seed.teacher.FrozenTeacher`). A timm model
expecting another mean/std than ImageNet's gets its input renormalised, so every network here reads the same images.
Weights come from a file (``weights_only``; ``.safetensors`` without pickle) or, without one, from torchvision's or
timm's hub (needs internet; offline, the error names the file to pass): :func:`hub_file` saves them as a file first.
Models themselves are built by name in :mod:`seed.models` (timm, torchvision) and :mod:`seed.backbones` (ours).
"""

import dataclasses
from pathlib import Path
from typing import Any

import torch
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import nn

from seed.checkpoints import atomic_save, load_classifier, load_file
from seed.errors import SeedError
from seed.models import check_name, create_timm, teacher_input, vit_size
from seed.precision import use_channels_last
from seed.teacher import FrozenTeacher


def timm_classifier(name: str, checkpoint: str | None) -> nn.Module:
    """A timm classifier by name: weights from ``checkpoint`` (weights_only, or safetensors), else timm's pretrained ones;
    it reads the images as a timm teacher of SEED does (:func:`seed.models.teacher_input`: a ViT's own size, its mean/std)."""
    give_file = "pass the file in --teacher-checkpoints"
    model = create_timm(name, not checkpoint, give_file)
    if checkpoint:
        content = load_file(checkpoint)
        state = content.get("state_dict", content.get("model", content)) if isinstance(content, dict) else content
        state = {k.removeprefix("module."): v for k, v in state.items()}
        size = vit_size(model, state)
        if size is not None:  # a ViT made for another input size
            model = create_timm(name, False, give_file, img_size=size)
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        if isinstance(classifier, str) and f"{classifier}.weight" in state and state[f"{classifier}.weight"].shape[0] != model.num_classes:
            model.reset_classifier(state[f"{classifier}.weight"].shape[0])  # a fine-tuned model of other classes
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise SeedError(f"checkpoint {checkpoint} does not fit timm's {name}: {str(error).splitlines()[1].strip()[:200]}") from None
    model.arch = f"timm:{name}"
    adapter = teacher_input(model)
    idle = adapter.size is None and adapter.patch is None and isinstance(adapter.renormalize, nn.Identity)
    wrapped = model if idle else nn.Sequential(adapter, model)
    wrapped.arch, wrapped.feature_dim = f"timm:{name}", model.num_classes
    return wrapped


TORCHVISION_NAMES = {"r18": "resnet18", "r34": "resnet34", "r50": "resnet50", "r101": "resnet101", "r152": "resnet152",
                     "mbv3l": "mobilenet_v3_large", "mbv3s": "mobilenet_v3_small", "effb0": "efficientnet_b0", "effb1": "efficientnet_b1"}


def torchvision_file(arch: str, version: str = "DEFAULT", give_file: str = "or pass the file") -> str:
    """torchvision's ImageNet classifier weights of ``arch`` (ours, or ``tv:NAME``): the file in torch.hub's cache,
    downloaded there when missing."""
    from torchvision.models import get_model_weights

    if arch.startswith("tv:"):
        check_name(arch)
    elif arch not in TORCHVISION_NAMES:
        raise SeedError(f"{arch} has no torchvision weights; give its file ({', '.join(TORCHVISION_NAMES)} and tv:NAME have them)")
    weights = getattr(get_model_weights(TORCHVISION_NAMES.get(arch) or arch.removeprefix("tv:")), version)
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(weights.url, str(path), progress=False)
        except (OSError, RuntimeError) as error:
            raise SeedError(f"torchvision's {weights} weights could not be fetched ({type(error).__name__}); "
                            f"put {Path(weights.url).name} in {path.parent}, {give_file}") from None
    return str(path)


def timm_file(name: str, give_file: str) -> str:
    """timm's pretrained model ``name`` (classifier included) saved as a state dict in torch.hub's cache, fetched once."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / f"timm-{name}.pth"
    if not path.is_file():
        model = create_timm(name, True, give_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(model.state_dict(), path)
    return str(path)


def hub_file(arch: str, give_file: str) -> str:
    """The hub's ImageNet weights of ``timm:NAME``, ``tv:NAME`` or one of ours as a file (see :func:`timm_file`,
    :func:`torchvision_file`); offline, one line where ``give_file`` names the flag that takes a file instead."""
    if arch.startswith("timm:"):
        return timm_file(arch.removeprefix("timm:"), give_file)
    return torchvision_file(arch, give_file=give_file)


def timm_student_file(name: str) -> str:
    """timm's pretrained classifier ``name`` as a state dict file, to start a student from.

    The public MEAL V2 code starts its ResNet-50 from timm's ``resnet50`` of 2020, 79.0 % (now the
    ``resnet50.ram_in1k`` tag), not from torchvision's 76.15 %. timm's ResNets keep torchvision's layout, so the file
    loads as a torchvision state dict. The student is fed ImageNet-normalised images, so the model must expect them.
    """
    path = Path(torch.hub.get_dir()) / "checkpoints" / f"timm-{name}.pth"
    if not path.is_file():
        model = create_timm(name, True, "pass the weights' file to --student-init instead")
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
        path = torchvision_file(config.student, "IMAGENET1K_V1", "or pass the file to --student-init")
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
    if arch is not None and arch.startswith("timm:"):
        model, head, found = timm_classifier(arch.removeprefix("timm:"), checkpoint), None, "timm"
    else:
        model, head, found, _ = load_classifier(checkpoint or torchvision_file(arch, give_file="or pass the file in --teacher-checkpoints"), arch)
    return FrozenTeacher(model, head, fold_bn=config.teacher_fold_bn, channels_last=use_channels_last(config), normalize=False), found
