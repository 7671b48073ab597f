"""``seed-eval semi``: semi-supervised evaluation with 1% or 10% of the labels.

The labelled subset is SimCLR's published split (Chen et al., ICML 2020,
sec. B.5: ``1percent.txt`` / ``10percent.txt``, one image file name per line)
when ``--split-file`` is given, else a seeded class-balanced subset with
round(fraction x images of the class) images per class, at least one. The
subset used is written as ``split.txt`` next to ``results.json`` (file names
for an ImageFolder, indices for the built-in datasets), so ``--split-file``
can reuse it.

By default a Linear layer is trained on the frozen features of the subset (the
fast probe of ``seed-eval linear --fast``): quick, but not the protocol of the
semi-supervised tables, and its output says so. ``--finetune`` is that
protocol: the whole network trained on augmented images of the subset through
the engine with SimCLR's recipe (appendix B.5: Nesterov SGD, momentum 0.9, lr
0.05 x batch/256, no weight decay, 60 epochs on 1% of the labels and 30 on
10%; the lr decays by a cosine without warm-up, as in SimCLR's code). Flags
that depart from it are listed in ``results.json`` (``settings.recipe``,
``settings.differs_from_simclr``).
"""

import dataclasses
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from downstream.common import eval_folder, open_checkpoint, write_results
from downstream.features import cached_features, eval_device, extract, open_split
from downstream.linear import (
    FAST_LR,
    EngineProbeConfig,
    LinearClassifier,
    evaluate_head,
    fit_linear,
    parse_milestones,
    probe_settings,
    report,
    save_head,
    train_classifier,
)
from seed.classification import train_transform
from seed.config import load_config, option
from seed.data import check_classes, dataset_for
from seed.errors import SeedError
from seed.loaders import default_workers

SPLIT = "split.txt"
#: SimCLR's fine-tuning (Chen et al., ICML 2020, appendix B.5; cosine decay as in its code's learning_rate_schedule).
SIMCLR_FINETUNE = "SimCLR fine-tuning (Chen et al. 2020, app. B.5): Nesterov SGD, momentum 0.9, lr 0.05 x batch/256, no weight decay, " \
                  "cosine decay without warm-up, 60 epochs below 10% of the labels, 30 from 10%"
LINEAR_NOTE = "linear probe on frozen features: NOT the fine-tuning protocol of SimCLR's and SEED's semi-supervised tables (add --finetune)"


@dataclass
class SemiConfig(EngineProbeConfig):
    """``seed-eval semi``."""

    epochs: int | None = option("training epochs (default: 100 for the linear probe; with --finetune SimCLR's 60 below 10%% of the labels, "
                                "30 from 10%%)", at_least=1)
    lr: float | None = option(f"learning rate of the classifier (default: {FAST_LR} on standardised features; with --finetune SimCLR's "
                              "0.05 x global batch / 256)", above=0)
    fraction: float = option("fraction of the train labels to use (0.01 and 0.1 in the papers)", 0.01, above=0, at_most=1)
    split_file: str | None = option("SimCLR-style split: image file names (or class/name paths) one per line, "
                                    "or indices for the built-in datasets (default: a seeded class-balanced subset)")
    finetune: bool = option("fine-tune the whole network on the subset through the engine with SimCLR's recipe "
                            "(default: a Linear layer on frozen features, which is not the fine-tuning protocol)", False)
    backbone_lr: float | None = option("learning rate of the backbone with --finetune (default: --lr, one rate for all as SimCLR)", above=0)


def simclr_finetune(fraction: float, global_batch: int) -> dict[str, float | int]:
    """SimCLR's fine-tuning values for a label ``fraction`` and a global batch: lr 0.05 x B/256, 60 epochs at 1%, 30 at 10%."""
    return {"lr": 0.05 * global_batch / 256, "epochs": 60 if fraction < 0.1 else 30, "momentum": 0.9, "weight_decay": 0.0}


def resolve_finetune(config: SemiConfig, fraction: float) -> tuple[SemiConfig, list[str]]:
    """``config`` with SimCLR's values where the flags left them open, and the settings in which it departs from SimCLR's recipe."""
    if config.milestones is not None:
        raise SeedError("--milestones sets the linear probe's step schedule; --finetune decays the lr by a cosine (SimCLR's recipe)")
    recipe = simclr_finetune(fraction, config.batch_size * config.devices * config.num_nodes)
    lr = config.lr if config.lr is not None else recipe["lr"]
    config = dataclasses.replace(config, lr=lr, epochs=config.epochs if config.epochs is not None else recipe["epochs"],
                                 backbone_lr=config.backbone_lr if config.backbone_lr is not None else lr)
    differs = [name for name, value in recipe.items() if not math.isclose(getattr(config, name), value, abs_tol=1e-12)]
    return config, differs + (["backbone_lr"] if config.backbone_lr != config.lr else [])


def balanced_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted indices of round(fraction x n_c) images of every class c (half rounds up; at least 1), drawn with ``seed``."""
    if not 0 < fraction <= 1:
        raise SeedError(f"--fraction must be in (0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        count = max(1, math.floor(fraction * len(members) + 0.5))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def read_split_file(path: str | Path, dataset: Dataset) -> Tensor:
    """Indices of the images named in ``path``.

    For an ImageFolder, a line is a file name matched on its basename
    (SimCLR's ``n01440764_10026.JPEG``) or a ``class/name`` path; for the
    built-in datasets it is an index. Blank lines and ``#`` comments are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise SeedError(f"--split-file {path} does not exist")
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise SeedError(f"--split-file {path} names no images")
    samples = getattr(dataset, "samples", None)
    if samples is None:
        try:
            indices = [int(line) for line in lines]
        except ValueError:
            raise SeedError(f"--split-file {path}: {dataset.__class__.__name__} images are named by index, one integer per line") from None
        bad = [i for i in indices if not 0 <= i < len(dataset)]
        if bad:
            raise SeedError(f"--split-file {path}: index {bad[0]} is outside the {len(dataset)} train images")
        return torch.tensor(sorted(set(indices)), dtype=torch.long)
    by_path = {_relative(file, dataset.root): i for i, (file, _) in enumerate(samples)}
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, (file, _) in enumerate(samples):
        by_name[os.path.basename(file)].append(i)
    indices, missing = set(), []
    for line in lines:
        if "/" in line:
            found = [by_path[line]] if line in by_path else []
        else:
            found = by_name.get(line, [])
            if len(found) > 1:
                raise SeedError(f"--split-file {path}: '{line}' names {len(found)} train images in different classes; write it as class/{line}")
        if not found:
            missing.append(line)
        indices.update(found)
    if missing:
        raise SeedError(f"--split-file {path}: {len(missing)} of {len(lines)} names are not in the train split (first: {missing[0]}); "
                        "check --data")
    return torch.tensor(sorted(indices), dtype=torch.long)


def write_split_file(path: Path, dataset: Dataset, indices: Tensor) -> None:
    """The subset, readable back by :func:`read_split_file`: class/name paths for an ImageFolder, else indices."""
    samples = getattr(dataset, "samples", None)
    names = [_relative(samples[i][0], dataset.root) for i in indices.tolist()] if samples is not None else [str(i) for i in indices.tolist()]
    path.write_text("\n".join(names) + "\n")


def evaluate(config: SemiConfig) -> dict | None:
    """The protocol: choose the subset, train on it, measure val top-1/top-5, write ``results.json`` and ``split.txt``."""
    started = time.perf_counter()
    checkpoint = open_checkpoint(config)
    run_dir = eval_folder(config, "semi", checkpoint)
    train_set, val_set = open_split(config, "train"), open_split(config, "val")
    check_classes(train_set, val_set, config.data)
    labels = torch.as_tensor(list(train_set.targets))
    indices = read_split_file(config.split_file, train_set) if config.split_file else balanced_subset(labels, config.fraction, config.seed)
    fraction = len(indices) / len(train_set)
    num_classes = len(train_set.classes)
    if config.finetune:
        config, differs = resolve_finetune(config, fraction)
        recipe = SIMCLR_FINETUNE if not differs else f"own fine-tuning recipe: {SIMCLR_FINETUNE}, except {', '.join(differs)}"
        pl.seed_everything(config.seed, workers=True, verbose=False)
        augmented = dataset_for(config, "train", train_transform(config.image_size, min_scale=0.08))  # RandomResizedCrop at every size
        module = LinearClassifier(checkpoint.backbone, num_classes, config.lr, config.momentum, config.weight_decay, [],
                                  finetune=True, backbone_lr=config.backbone_lr, nesterov=True, cosine=True)
        trainer = train_classifier(module, Subset(augmented, indices.tolist()), val_set, config, run_dir)
        if not trainer.is_global_zero:
            return None
        val = extract(module.backbone, val_set, config.batch_size, default_workers(config), eval_device(config), desc="val features (fine-tuned)")
        head, mode, milestones = module.head, f"fine-tune (backbone lr {config.backbone_lr}, engine)", []
        extra = {"recipe": recipe, "differs_from_simclr": differs, "nesterov": True, "schedule": "cosine, per step, no warm-up",
                 "backbone_lr": config.backbone_lr}
    else:
        config = dataclasses.replace(config, epochs=config.epochs if config.epochs is not None else 100)
        lr, milestones = config.lr if config.lr is not None else FAST_LR, parse_milestones(config.milestones, config.epochs)
        config = dataclasses.replace(config, lr=lr)
        train = cached_features(checkpoint, config, "train", train_set, indices)
        val = cached_features(checkpoint, config, "val", val_set)
        head = fit_linear(train, num_classes, config.epochs, config.batch_size, lr, config.momentum, config.weight_decay,
                          milestones, config.seed, eval_device(config), config.max_steps)
        mode, extra = "linear on frozen features", {"recipe": LINEAR_NOTE}
    metrics = evaluate_head(head, val)
    settings = probe_settings(config, mode, config.lr, milestones, len(indices), len(val_set), num_classes)
    settings.update({"fraction": round(fraction, 6), "requested_fraction": None if config.split_file else config.fraction,
                     "split_file": config.split_file, "labelled_images": len(indices), "train_split_images": len(train_set), **extra})
    run_dir.mkdir(parents=True, exist_ok=True)
    write_split_file(run_dir / SPLIT, train_set, indices)
    save_head(head, checkpoint, num_classes, run_dir)
    results = write_results(run_dir, "semi", metrics, "top1", config, checkpoint, settings, time.perf_counter() - started)
    report(f"semi-supervised ({len(indices)} labelled images, {100 * settings['fraction']:.3g}%)", config, metrics, settings, run_dir)
    print(f"recipe: {settings['recipe']}")
    print(f"labelled subset: {run_dir / SPLIT} (reuse it with --split-file)")
    return results


def main(argv: list[str] | None) -> None:
    description = "Semi-supervised evaluation on 1%/10% of the labels: a Linear layer on frozen features, or --finetune the whole network."
    evaluate(load_config(SemiConfig, argv, "seed-eval semi", description))
