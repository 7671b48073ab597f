"""``seed-pretrain``: train a self-supervised teacher and export ``teacher.pt``."""

import dataclasses
from pathlib import Path

import pytorch_lightning as pl

from pretrain.mocov2 import MoCoV2
from pretrain.simclr import SimCLR
from pretrain.supervised import Supervised, report
from seed.backbones import feature_dim
from seed.checkpoints import export_model
from seed.cli import run_cli
from seed.config import PretrainConfig, load_config, resolve
from seed.data import dataset_for, view_transform
from seed.engine import data_name, fit, run_folder
from seed.errors import SeedError
from seed.knn import compare_knn, print_knn_table, random_inits
from seed.loaders import check_batch, make_loader, monitor_loaders

METHODS = {"mocov2": MoCoV2, "simclr": SimCLR, "supervised": Supervised}


def check_sizes(config: PretrainConfig, dataset_size: int) -> None:
    """A batch larger than the dataset trains on nothing; a MoCo queue smaller than the batch drops keys."""
    check_batch(dataset_size, config)
    global_batch = config.batch_size * config.devices * config.num_nodes
    if config.method == "mocov2" and config.queue_size < global_batch:
        raise SeedError(f"--queue-size {config.queue_size} is smaller than the global batch {global_batch}; use K >= batch (MoCo uses 65536)")


def pretrain(config: PretrainConfig) -> Path:
    """Train the teacher described by ``config``; returns the run folder."""
    if config.method not in METHODS:
        raise SeedError(f"unknown method '{config.method}'; choose one of: {', '.join(METHODS)}")
    method = METHODS[config.method]
    config = resolve(config, method.DEFAULTS)
    feature_dim(config.arch)  # unknown names fail here, before any data is read
    if config.temperature is not None and config.temperature <= 0:
        raise SeedError(f"--temperature must be positive, got {config.temperature}")
    if hasattr(method, "train_transform"):
        views = method.train_transform(config)
    else:
        views = view_transform(config.method, config.image_size, min_scale=config.crop_min_scale)
    train_set = dataset_for(config, "train", views)
    check_sizes(config, len(train_set))
    monitor = monitor_loaders(config)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    run_dir = run_folder(config, "pretrain", f"{config.method}-{config.arch}-{data_name(config)}")
    module = method(config, num_classes=len(train_set.classes))
    trainer = fit(module, make_loader(train_set, config, shuffle=True, drop_last=True), monitor, config, run_dir)
    if trainer.is_global_zero:
        settled = module.settled_copy(monitor[0])
        head, embed_dim, extra = module.exported_head() if isinstance(module, Supervised) else (settled[1], config.embed_dim, None)
        export_model(
            run_dir / "teacher.pt", config.arch, settled[0], head, embed_dim,
            config.method, dataclasses.asdict(config), bool(config.small_images), extra,
        )
        random_init = random_inits(config.arch, bool(config.small_images))
        scores = compare_knn({f"{config.arch} random init": random_init, f"{config.arch} {config.method}": settled[0]}, config, len(train_set.classes),
                             monitor)
        print_knn_table(scores, config, run_dir)
        if isinstance(module, Supervised):
            report(module, config, run_dir)
        print(f"\nrun folder: {run_dir} (teacher.pt, last.ckpt, config.yaml, logs/)")
    return run_dir


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``seed-pretrain``."""
    run_cli(
        "seed-pretrain",
        lambda args: pretrain(load_config(PretrainConfig, args, "seed-pretrain", "Train a teacher: self-supervised (MoCo v2, SimCLR) or supervised.")),
        argv,
    )


if __name__ == "__main__":
    main()
