"""Checkpoint files: ours (Lightning ``.ckpt`` to resume, exported ``.pt`` to use)
and readers that turn any supported file into a registry backbone.

Every load goes through :func:`load_file`, which uses
``torch.load(weights_only=True)``: a file that carries pickled code is refused,
and nothing in it runs.
"""

import os
import pickle
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


def load_file(path: str | Path) -> Any:
    """``torch.load`` a checkpoint safely onto the CPU, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise SeedError(f"checkpoint {path} does not exist; pass the path of a .pt/.pth/.ckpt file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unsupported content"
        raise SeedError(
            f"refusing to load {path}: it holds pickled objects other than tensors ({first[:160]}); "
            "only weights are loaded, re-save the state_dict with torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise SeedError(f"checkpoint {path} cannot be read ({str(error).splitlines()[0][:160]}); the file is truncated or not a PyTorch checkpoint") from None


def export_model(
    path: Path,
    arch: str,
    backbone: nn.Module,
    head: nn.Module | None,
    embed_dim: int | None,
    method: str,
    config: dict[str, Any],
    small_images: bool,
) -> None:
    """Write the ``.pt`` that downstream tools read: backbone with torchvision-style keys plus head."""
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
        },
        path,
    )


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _read_export(content: Mapping[str, Any]) -> dict[str, Any] | None:
    if content.get("format") != EXPORT_FORMAT:
        return None
    return {"state_dict": content["state_dict"], "arch": content["arch"], "format": "seed export"}


def _read_lightning(content: Mapping[str, Any]) -> dict[str, Any] | None:
    if "pytorch-lightning_version" not in content or "state_dict" not in content:
        return None
    config = content.get("hyper_parameters", {}).get("config", {})
    return {"state_dict": _strip(content["state_dict"], "backbone."), "arch": config.get("arch"), "format": "seed Lightning checkpoint"}


def _read_plain(content: Mapping[str, Any]) -> dict[str, Any] | None:
    state = content.get("state_dict", content)
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    return {"state_dict": dict(state), "arch": None, "format": "plain state_dict"}


#: Format readers tried in order; each returns None when the file is not its format.
READERS: list[Callable[[Mapping[str, Any]], dict[str, Any] | None]] = [_read_export, _read_lightning, _read_plain]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Detect the format of ``path``: ``{"state_dict", "arch", "format"}`` with backbone keys."""
    content = load_file(path)
    if isinstance(content, Mapping):
        for reader in READERS:
            found = reader(content)
            if found is not None:
                return found
    keys = list(content)[:8] if isinstance(content, Mapping) else type(content).__name__
    raise SeedError(
        f"checkpoint {path} fits no known format (found keys {keys}); "
        "known: seed export .pt, seed Lightning .ckpt, plain torchvision state_dict"
    )


def load_backbone(path: str | Path, arch: str | None = None) -> nn.Module:
    """Read any supported checkpoint into a registry backbone.

    ``arch`` may be omitted for our own files, which record it. A 3x3 ``conv1``
    in the weights means the small-image stem.
    """
    found = read_checkpoint(path)
    arch = arch or found["arch"]
    if arch is None:
        raise SeedError(f"checkpoint {path} ({found['format']}) does not record its architecture; pass --arch")
    state = found["state_dict"]
    conv1 = state.get("conv1.weight")
    small_images = conv1 is not None and conv1.shape[-1] == 3
    backbone = create_backbone(arch, small_images=small_images)
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise SeedError(f"checkpoint {path} ({found['format']}) lacks '{missing[0]}' of a {arch} backbone ({len(missing)} keys missing); check --arch")
    for key, value in own.items():
        if state[key].shape != value.shape:
            raise SeedError(
                f"checkpoint {path} does not fit {arch}: '{key}' has shape {tuple(state[key].shape)}, "
                f"{arch} needs {tuple(value.shape)}; check --arch"
            )
    backbone.load_state_dict({k: state[k] for k in own})
    return backbone
