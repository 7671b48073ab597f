"""Checkpoint files: ours (Lightning ``.ckpt`` to resume, exported ``.pt`` to use)
and readers that turn any supported file into a registry backbone.

Every load goes through :func:`load_file`, which uses
``torch.load(weights_only=True)``: a file that carries pickled code is refused,
and nothing in it runs. A ``.safetensors`` file (timm's hub format) is read by
``safetensors.torch.load_file``, which holds no pickle at all.
"""

import hashlib
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seed.backbones import create_backbone
from seed.errors import SeedError

EXPORT_FORMAT = "seed-export-v1"


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` next to ``path`` and rename it into place.

    A crash or a full disk during the write leaves the previous file intact.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


#: How every file ``torch.save`` writes begins: a zip archive (the default since torch 1.6) or a pickle (protocol 2-5).
_CHECKPOINT_STARTS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_file(path: str | Path) -> Any:
    """``torch.load`` a checkpoint safely onto the CPU, with one-line errors.

    A file that does not start as ``torch.save``'s output (a text file, random
    bytes) is named as such before torch's unpickler sees it: that unpickler
    fails on it with an ``IndexError`` or a misleading "unsupported global".
    """
    path = Path(path)
    if not path.is_file():
        raise SeedError(f"checkpoint {path} does not exist; pass the path of a .pt/.pth/.ckpt/.safetensors file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    with open(path, "rb") as handle:
        start = handle.read(4)
    if not start.startswith(_CHECKPOINT_STARTS):
        raise SeedError(f"{path} is not a PyTorch checkpoint (it starts with {start!r}, not as a torch.save file); "
                        "pass a .pt/.pth/.ckpt file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unsupported content"
        raise SeedError(
            f"refusing to load {path}: it holds pickled objects other than tensors ({first[:160]}); "
            "only weights are loaded, re-save the state_dict with torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, OSError, IndexError, ValueError, KeyError) as error:
        detail = str(error).splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise SeedError(f"checkpoint {path} cannot be read ({detail}); the file is truncated or not a PyTorch checkpoint") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors
    except ImportError:
        raise SeedError(f"{path} is a safetensors file and safetensors is not installed; pip install safetensors") from None
    try:
        return load_safetensors(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise SeedError(f"safetensors file {path} cannot be read ({str(error).splitlines()[0][:160]}); the file is truncated or not safetensors") from None


def export_model(
    path: Path,
    arch: str,
    backbone: nn.Module,
    head: nn.Module | None,
    embed_dim: int | None,
    method: str,
    config: dict[str, Any],
    small_images: bool,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write the ``.pt`` that downstream tools read: backbone with torchvision-style keys plus head.

    ``extra`` adds entries, such as a classifier's ``num_classes``.
    """
    atomic_save(
        {
            "format": EXPORT_FORMAT,
            "arch": arch,
            "small_images": small_images,
            "method": method,
            "embed_dim": embed_dim,
            "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
            "head_state_dict": None if head is None else {k: v.detach().cpu() for k, v in head.state_dict().items()},
            "config": config,
            **(extra or {}),
        },
        path,
    )


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _tensors(content: Any) -> dict[str, torch.Tensor] | None:
    """The tensor mapping inside a file: the file itself, or its ``state_dict``/``model`` entry."""
    if not isinstance(content, Mapping):
        return None
    for key in ("state_dict", "model"):
        if isinstance(content.get(key), Mapping):
            content = content[key]
            break
    if not content or not all(isinstance(v, torch.Tensor) for v in content.values()):
        return None
    return dict(content)


def _split(state: Mapping[str, torch.Tensor], head_prefix: str, drop: tuple[str, ...] = ()) -> tuple[dict, dict | None]:
    """Backbone keys and the projection head's keys (``None`` when the file has no head)."""
    head = _strip(state, head_prefix) or None
    backbone = {k: v for k, v in state.items() if not k.startswith(head_prefix) and not k.startswith(drop)}
    return backbone, head


def _read_export(content: Mapping[str, Any]) -> dict[str, Any] | None:
    if content.get("format") != EXPORT_FORMAT:
        return None
    head = content.get("head_state_dict")
    return {"state_dict": content["state_dict"], "head": head, "arch": content["arch"], "small_images": content.get("small_images"),
            "format": f"seed export ({content.get('method')})"}


def _read_lightning(content: Mapping[str, Any]) -> dict[str, Any] | None:
    if "pytorch-lightning_version" not in content or "state_dict" not in content:
        return None
    state = content["state_dict"]
    head = _strip(state, "projection_head.") or _strip(state, "head.") or None
    hparams = content.get("hyper_parameters", {})
    config = hparams.get("config", {})
    method = config.get("method") or config.get("mode")
    return {"state_dict": _strip(state, "backbone."), "head": head, "arch": hparams.get("arch"),
            "small_images": config.get("small_images"), "format": f"seed Lightning checkpoint ({method})" if method else "seed Lightning checkpoint"}


def _read_moco(content: Mapping[str, Any]) -> dict[str, Any] | None:
    """facebookresearch/moco: ``module.encoder_q.*``; v2's MLP head is ``fc.0``/``fc.2``, v1's is one ``fc``."""
    state = _tensors(content)
    if state is None or not any(k.startswith("module.encoder_q.") for k in state):
        return None
    backbone, head = _split(_strip(state, "module.encoder_q."), "fc.")
    version = "v2" if head and "0.weight" in head else "v1"
    return {"state_dict": backbone, "head": head, "arch": None, "format": f"MoCo {version}"}


def _read_seed_official(content: Mapping[str, Any]) -> dict[str, Any] | None:
    """The official SEED code saves the whole distiller; its student is ``module.student.*`` with an MLP ``fc``."""
    state = _tensors(content)
    if state is None or not any(k.startswith("module.student.") for k in state):
        return None
    backbone, head = _split(_strip(state, "module.student."), "fc.")
    return {"state_dict": backbone, "head": head, "arch": None, "format": "SEED official student"}


def _read_swav(content: Mapping[str, Any]) -> dict[str, Any] | None:
    """facebookresearch/swav: ``module.*`` with ``projection_head.*``; the ``prototypes`` are dropped."""
    state = _tensors(content)
    if state is None:
        return None
    state = _strip(state, "module.") or state
    if not any(k.startswith(("prototypes", "projection_head.")) for k in state):
        return None
    backbone, head = _split(state, "projection_head.", drop=("prototypes",))
    return {"state_dict": backbone, "head": head, "arch": None, "format": "SwAV"}


def _read_simclr(content: Mapping[str, Any]) -> dict[str, Any] | None:
    """SimCLR converted to PyTorch: ``model``/``state_dict`` whose keys carry a prefix such as
    ``module.``, ``encoder.``, ``backbone.`` or ``resnet.``; the 2048-2048(BN)-128 head as ``head.*`` or ``projector.*``."""
    state = _tensors(content)
    if state is None:
        return None
    for prefix in ("module.", "model."):
        state = _strip(state, prefix) or state
    for encoder in ("encoder.", "backbone.", "resnet.", "convnet."):
        backbone = _strip(state, encoder)
        if "conv1.weight" in backbone:
            head = _strip(state, "head.") or _strip(state, "projector.") or _strip(state, "projection_head.") or None
            return {"state_dict": backbone, "head": head, "arch": None, "format": "SimCLR (converted)"}
    return None


def _read_resnet_mlp(content: Mapping[str, Any]) -> dict[str, Any] | None:
    """A ResNet whose ``fc`` is an MLP projection head (``fc.0`` ... ``fc.N``), not a classifier, under any number of ``module.``.

    SEED's released SimCLR teacher (``simclr_200.pth``) is ``{'model': ...}`` with
    keys ``module.module.module.<torchvision key>`` (SEED's ``SimCLRResNet`` holds
    the ResNet as ``module``, wrapped twice in DataParallel) and the head ``fc.0``
    Linear(d, d), ``fc.1`` BatchNorm1d, ``fc.2`` ReLU, ``fc.3`` Linear(d, 128).
    A copy without the prefixes, or a MoCo v2 encoder saved alone, keeps its head too.
    """
    state = _tensors(content)
    if state is None:
        return None
    wrappers = 0
    while all(k.startswith("module.") for k in state):
        state, wrappers = _strip(state, "module."), wrappers + 1
    if "conv1.weight" not in state or not any(re.match(r"fc\.\d+\.", k) for k in state):
        return None
    backbone, head = _split(state, "fc.")
    name = "SimCLR (SEED release)" if wrappers == 3 and "model" in content else "ResNet state_dict with an MLP head (fc.0...)"
    return {"state_dict": backbone, "head": head, "arch": None, "format": name}


def _read_plain(content: Mapping[str, Any]) -> dict[str, Any] | None:
    """A torchvision classifier's state dict: its ``fc``/``classifier`` is a classifier, not a projection head."""
    state = _tensors(content)
    if state is None:
        return None
    return {"state_dict": state, "head": None, "arch": None, "format": "plain state_dict (torchvision)"}


#: Format readers tried in order; each returns None when the file is not its format.
READERS: list[Callable[[Mapping[str, Any]], dict[str, Any] | None]] = [
    _read_export, _read_lightning, _read_moco, _read_seed_official, _read_swav, _read_simclr, _read_resnet_mlp, _read_plain,
]
KNOWN_FORMATS = ("seed export .pt, seed Lightning .ckpt, MoCo v1/v2, SEED official, SwAV, SimCLR (converted), SimCLR (SEED release), "
                 "torchvision state_dict")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Detect the format of ``path``: ``{"state_dict", "head", "arch", "format"}``.

    ``state_dict`` holds the backbone with torchvision key names; ``head`` the
    projection head's keys (or ``None``).
    """
    content = load_file(path)
    if isinstance(content, Mapping):
        for reader in READERS:
            found = reader(content)
            if found is not None:
                return found
    keys = list(content)[:8] if isinstance(content, Mapping) else type(content).__name__
    raise SeedError(f"checkpoint {path} fits no known format (found keys {keys}); known: {KNOWN_FORMATS}")


def build_head(state: Mapping[str, torch.Tensor]) -> nn.Sequential:
    """Rebuild an MLP projection head from its weights alone.

    Works for every published layout (MoCo ``fc.0/fc.2``, SwAV/SimCLR
    ``0 Linear, 1 BN, 3 Linear``, lightly's ``layers.*``): a 2-D weight is a
    Linear, a 1-D weight with running stats a BatchNorm1d, and an index
    without parameters a ReLU. A head saved as one Linear (MoCo v1) has no index.
    """
    state = _strip(state, "layers.") or dict(state)
    if "weight" in state:
        state = {f"0.{k}": v for k, v in state.items()}
    indices = sorted({int(k.split(".")[0]) for k in state})
    layers: list[nn.Module] = []
    for index in range(indices[-1] + 1):
        weight = state.get(f"{index}.weight")
        if weight is None:
            layers.append(nn.ReLU())
        elif weight.dim() == 2:
            layers.append(nn.Linear(weight.shape[1], weight.shape[0], bias=f"{index}.bias" in state))
        else:
            layers.append(nn.BatchNorm1d(weight.shape[0]))
    head = nn.Sequential(*layers)
    head.load_state_dict(state)
    return head


def _small_images(found: dict[str, Any]) -> bool:
    """The stem a file was trained with: recorded in ours; in published files a 3x3 conv1 means the small-image stem."""
    if found.get("small_images") is not None:
        return bool(found["small_images"])
    conv1 = found["state_dict"].get("conv1.weight")
    return conv1 is not None and conv1.shape[-1] == 3


def _backbone_from(found: dict[str, Any], path: str | Path, arch: str | None) -> nn.Module:
    arch = arch or found["arch"]
    if arch is None:
        raise SeedError(f"checkpoint {path} ({found['format']}) does not record its architecture; pass --arch")
    state = found["state_dict"]
    backbone = create_backbone(arch, small_images=_small_images(found), state=state)
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise SeedError(f"checkpoint {path} ({found['format']}) lacks '{missing[0]}' of a {arch} backbone ({len(missing)} keys missing); check --arch")
    for key, value in own.items():
        if state[key].shape != value.shape:
            raise SeedError(
                f"checkpoint {path} ({found['format']}) does not fit {arch}: '{key}' has shape {tuple(state[key].shape)}, "
                f"{arch} needs {tuple(value.shape)}; check --arch"
            )
    backbone.load_state_dict({k: state[k] for k in own})
    return backbone


def load_backbone(path: str | Path, arch: str | None = None) -> nn.Module:
    """Read any supported checkpoint (ours or published) into a registry backbone.

    ``arch`` may be omitted for our own files, which record it.
    """
    return _backbone_from(read_checkpoint(path), path, arch)


def load_encoder(path: str | Path, arch: str | None = None, use_head: bool | None = None) -> tuple[nn.Module, nn.Module | None, str]:
    """Backbone, projection head (or ``None``) and format name of a checkpoint.

    ``use_head=None`` keeps the head when the file has one (as SEED does);
    ``True`` demands one; ``False`` drops it.
    """
    found = read_checkpoint(path)
    backbone = _backbone_from(found, path, arch)
    if use_head and found["head"] is None:
        raise SeedError(f"checkpoint {path} ({found['format']}) has no projection head; drop --teacher-head")
    head = build_head(found["head"]) if found["head"] is not None and use_head is not False else None
    if head is not None:
        mode = head.training
        with torch.no_grad():
            try:
                head.eval()(torch.zeros(2, backbone.feature_dim))  # eval: a BatchNorm of the head keeps its statistics
            except RuntimeError:
                raise SeedError(
                    f"checkpoint {path}: its projection head does not take the {backbone.feature_dim}-d features of {backbone.arch}; check --arch"
                ) from None
        head.train(mode)
    return backbone, head, found["format"]


def _classifier_keys(state: Mapping[str, torch.Tensor], backbone_keys: set[str], feature_dim: int) -> dict[str, torch.Tensor] | None:
    """The class Linear among the keys the backbone did not take.

    torchvision names it ``fc`` (ResNet), ``classifier.3`` (MobileNetV3) or
    ``classifier.1`` (EfficientNet): the one 2-D weight left over whose input
    is the pooled feature.
    """
    rest = {k: v for k, v in state.items() if k not in backbone_keys}
    prefixes = [k[: -len("weight")] for k, v in rest.items() if k.endswith(".weight") and v.dim() == 2 and v.shape[1] == feature_dim]
    return _strip(rest, prefixes[0]) if len(prefixes) == 1 else None


def load_classifier(path: str | Path, arch: str | None = None, require_classifier: bool = True) -> tuple[nn.Module, nn.Linear | None, str, bool]:
    """Backbone, class Linear, format name and stem (``small_images``) of a supervised classifier checkpoint.

    Reads our exports and Lightning checkpoints of ``seed-pretrain --method
    supervised`` and ``seed-distill --mode meal`` (the classifier is their
    ``head``), and torchvision state dicts, also saved from ``DataParallel``
    with a ``module.`` prefix (as MEAL V2's released models are). A file whose
    head is an MLP (a self-supervised projection head) has no classifier; with
    ``require_classifier=False`` its backbone is still returned.
    """
    found = read_checkpoint(path)
    state = found["state_dict"]
    if all(k.startswith("module.") for k in state):
        found = {**found, "state_dict": _strip(state, "module."), "format": f"{found['format']}, DataParallel"}
    backbone = _backbone_from(found, path, arch)
    if found["head"] is not None:
        head = build_head(found["head"])
        classifier = head[0] if len(head) == 1 and isinstance(head[0], nn.Linear) else None
    else:
        keys = _classifier_keys(found["state_dict"], set(backbone.state_dict()), backbone.feature_dim)
        classifier = None
        if keys is not None and "weight" in keys:
            classifier = nn.Linear(keys["weight"].shape[1], keys["weight"].shape[0], bias="bias" in keys)
            classifier.load_state_dict(keys)
    if classifier is not None and classifier.in_features != backbone.feature_dim:
        raise SeedError(f"checkpoint {path}: its classifier takes {classifier.in_features}-d features, "
                        f"{backbone.arch} gives {backbone.feature_dim}; check the architecture")
    if classifier is None and require_classifier:
        what = "an MLP projection head" if found["head"] is not None else "no classifier layer"
        raise SeedError(f"checkpoint {path} ({found['format']}) has {what}, not a classifier; MEAL V2 teachers are supervised classifiers "
                        "(seed-pretrain --method supervised, or torchvision weights)")
    return backbone, classifier, found["format"], _small_images(found)
