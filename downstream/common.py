"""What every ``seed-eval`` protocol shares: its config base, the checkpoint it
evaluates, its run folder and the ``results.json`` it leaves there."""

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seed.checkpoints import file_sha256, load_encoder
from seed.config import CommonConfig, option
from seed.engine import data_name, run_folder
from seed.errors import SeedError
from seed.models import check_image_size

#: Checkpoints ``seed-eval`` falls back to, in order, when ``--checkpoint`` is omitted.
DEMO_CHECKPOINTS = ("runs/demo/distill/student.pt", "runs/demo/pretrain/teacher.pt")
RESULTS = "results.json"


@dataclass
class EvalConfig(CommonConfig):
    """Flags of every ``seed-eval`` protocol: the common ones plus the checkpoint to evaluate."""

    checkpoint: str | None = option("weights to evaluate: our teacher.pt/student.pt/last.ckpt, MoCo, SimCLR, SwAV, SEED or torchvision files "
                                   f"(default: the demo's, the first of {', '.join(DEMO_CHECKPOINTS)})")
    arch: str | None = option("backbone of the checkpoint: ours (seed.backbones.available()), timm:NAME or tv:NAME "
                                      "(default: the one our files record)")


def default_checkpoint() -> str:
    """The demo's student, else its teacher."""
    for path in DEMO_CHECKPOINTS:
        if Path(path).is_file():
            return path
    raise SeedError("no checkpoint given and no demo run found; pass --checkpoint or run make demo")


def state_digest(module: nn.Module) -> str:
    """SHA-256 of every tensor of ``module.state_dict()``: its weights and its BatchNorm statistics."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class Checkpoint:
    """A checkpoint opened for evaluation: its backbone and what identifies it.

    ``weights`` is the digest of the backbone as loaded: features are cached
    under the file's hash, so they must come from exactly these weights.
    """

    path: Path
    sha256: str
    arch: str
    format: str
    backbone: nn.Module
    weights: str = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.weights = state_digest(self.backbone)

    def describe(self) -> dict[str, str]:
        return {"path": str(self.path), "sha256": self.sha256, "arch": self.arch, "format": self.format}

    def check_unchanged(self) -> None:
        """Fail when the backbone's weights or BatchNorm statistics moved since loading (a bug, not a user mistake)."""
        if state_digest(self.backbone) != self.weights:
            raise RuntimeError(f"the backbone of {self.path} changed since it was loaded; its features are not the checkpoint's")


def open_checkpoint(config: EvalConfig) -> Checkpoint:
    """Load ``--checkpoint`` (or the demo's) into a registry backbone; a wrong ``--arch`` fails here."""
    path = Path(config.checkpoint or default_checkpoint())
    backbone, _, found_format = load_encoder(path, config.arch, use_head=False)  # load_backbone's readers, and the format's name
    check_image_size(backbone, config.image_size)
    return Checkpoint(path, file_sha256(path), backbone.arch, found_format, backbone)


def eval_folder(config: EvalConfig, protocol: str, checkpoint: Checkpoint) -> Path:
    """``--output``, else ``runs/eval/<protocol>-<checkpoint stem>-<data>``."""
    return run_folder(config, "eval", f"{protocol}-{checkpoint.path.stem}-{data_name(config)}")


def seed_version() -> str:
    try:
        return importlib.metadata.version("seed-distill")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def write_results(
    run_dir: Path,
    protocol: str,
    metrics: dict[str, float | None],
    primary: str,
    config: CommonConfig,
    checkpoint: Checkpoint,
    settings: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Write ``results.json``, the one schema of every protocol: the metrics (``primary`` is the headline one) and everything needed to
    reproduce them. A metric that is undefined (NaN or ``None``, e.g. COCO AP of a class-free subset) is written as ``null``."""
    results = {
        "protocol": protocol,
        "primary": primary,
        "metrics": {name: None if value is None or not math.isfinite(value) else round(float(value), 4) for name, value in metrics.items()},
        "settings": settings,
        "checkpoint": checkpoint.describe(),
        "data": config.data,
        "image_size": config.image_size,
        "seed": config.seed,
        "seconds": round(seconds, 2),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed_version": seed_version(),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "config"},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_table(title: str, headers: list[str], rows: list[tuple[str, list[float | None]]], run_dir: Path) -> None:
    """A short table on stdout (first column a name, then numbers; ``None`` prints as -), then where the results went."""
    width = max(len(headers[0]), *(len(name) for name, _ in rows)) + 2
    columns = [max(len(h), 7) + 2 for h in headers[1:]]
    print(f"\n{title}")
    print(f"{headers[0]:<{width}}" + "".join(f"{h:>{w}}" for h, w in zip(headers[1:], columns, strict=True)))
    for name, values in rows:
        cells = ("-" if v is None else f"{v:.2f}" for v in values)
        print(f"{name:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, columns, strict=True)))
    print(f"\nresults: {run_dir / RESULTS}")
