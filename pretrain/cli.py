"""``seed-pretrain``: train a self-supervised teacher and export ``teacher.pt``."""

import dataclasses
import json
from pathlib import Path

import pytorch_lightning as pl
import torch

from pretrain.mocov2 import MoCoV2
from pretrain.simclr import SimCLR
from seed.backbones import create_backbone
from seed.checkpoints import export_model
from seed.cli import run_cli
from seed.config import PretrainConfig, load_config, resolve
from seed.data import load_dataset, view_transform
from seed.engine import check_batch, data_name, fit, make_loader, monitor_loaders, run_folder
from seed.errors import SeedError
from seed.knn import extract_features, knn_top1

METHODS = {"mocov2": MoCoV2, "simclr": SimCLR}


def knn_summary(trained: torch.nn.Module, config: PretrainConfig, num_classes: int) -> dict[str, float]:
    """kNN top-1 of the trained backbone and of a random one of the same architecture."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bank_loader, query_loader = monitor_loaders(config)
    torch.manual_seed(config.seed)
    random_init = create_backbone(config.arch, small_images=bool(config.small_images))
    scores = {}
    for name, backbone in (("random init", random_init), ("trained", trained)):
        backbone = backbone.to(device)
        bank, bank_labels = extract_features(backbone, bank_loader, device)
        queries, query_labels = extract_features(backbone, query_loader, device)
        scores[name] = knn_top1(bank, bank_labels, queries, query_labels, num_classes, k=config.knn_k)
    return scores


def pretrain(config: PretrainConfig) -> Path:
    """Train the teacher described by ``config``; returns the run folder."""
    if config.method not in METHODS:
        raise SeedError(f"unknown method '{config.method}'; choose one of: {', '.join(METHODS)}")
    method = METHODS[config.method]
    config = resolve(config, method.DEFAULTS)
    create_backbone(config.arch)  # unknown names fail here, before any data is read
    pl.seed_everything(config.seed, workers=True, verbose=False)
    train_set = load_dataset(config.data, "train", config.data_root, config.download, view_transform(config.method, config.image_size))
    check_batch(len(train_set), config)
    run_dir = run_folder(config, "pretrain", f"{config.method}-{config.arch}-{data_name(config)}")
    module = method(config, num_classes=len(train_set.classes))
    train_loader = make_loader(train_set, config, shuffle=True, drop_last=True)
    trainer = fit(module, train_loader, monitor_loaders(config), config, run_dir)
    if trainer.is_global_zero:
        export_model(
            run_dir / "teacher.pt", config.arch, module.backbone, module.projection_head, config.embed_dim,
            config.method, dataclasses.asdict(config), bool(config.small_images),
        )
        scores = knn_summary(module.backbone, config, len(train_set.classes))
        (run_dir / "knn.json").write_text(json.dumps({"metric": "knn_top1", "k": config.knn_k, **scores}, indent=2))
        print(f"\nkNN top-1 (k={config.knn_k}, {config.knn_query_size} val images, {config.knn_bank_size} train images as bank)")
        print(f"{'backbone':<28}{'top-1 %':>8}")
        for name, value in scores.items():
            print(f"{config.arch + ' ' + name:<28}{value:>8.2f}")
        print(f"\nrun folder: {run_dir} (teacher.pt, last.ckpt, config.yaml, logs/)")
    return run_dir


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``seed-pretrain``."""
    run_cli(
        "seed-pretrain",
        lambda args: pretrain(load_config(PretrainConfig, args, "seed-pretrain", "Train a self-supervised teacher (MoCo v2, SimCLR).")),
        argv,
    )


if __name__ == "__main__":
    main()
