"""The one training engine: every stage trains through :func:`fit`.

It builds a Lightning ``Trainer`` from the config (CPU or GPUs, DDP across
processes and nodes, mixed precision, checkpoints, loggers, progress bar), and
resumes from the run folder's ``last.ckpt`` when there is one.
"""

import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, Dataset, Subset

from seed.config import CommonConfig, TrainConfig, save_config
from seed.errors import SeedError

LAST = "last.ckpt"


def default_workers(config: CommonConfig) -> int:
    """Loader processes: the flag, else one per core up to 8."""
    if config.num_workers is not None:
        return config.num_workers
    return min(8, os.cpu_count() or 1)


def make_loader(dataset: Dataset, config: CommonConfig, shuffle: bool, drop_last: bool = False, batch_size: int | None = None) -> DataLoader:
    """A DataLoader with the run's workers; Lightning adds the DistributedSampler under DDP."""
    workers = default_workers(config)
    return DataLoader(
        dataset,
        batch_size=batch_size or config.batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def resolve_precision(config: CommonConfig) -> str:
    """``auto``: bf16 autocast on GPUs that support it, fp16 on older ones, fp32 on CPU."""
    if config.precision != "auto":
        return config.precision
    if config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def run_folder(config: CommonConfig, stage: str, name: str) -> Path:
    """The run folder: ``--output`` or ``runs/<stage>/<name>`` (same command, same folder, so it resumes)."""
    return Path(config.output or Path("runs") / stage / name)


def resume_path(config: TrainConfig, run_dir: Path) -> str | None:
    """The checkpoint to continue from, following ``--resume auto|never|PATH``."""
    if config.resume == "never":
        return None
    if config.resume == "auto":
        last = run_dir / LAST
        return str(last) if last.is_file() else None
    if not Path(config.resume).is_file():
        raise SeedError(f"--resume {config.resume}: no such checkpoint; use auto, never, or the path of a last.ckpt")
    return config.resume


class LastCheckpoint(Callback):
    """Writes ``last.ckpt`` every N steps, at each epoch end and when training ends.

    Each write goes to a temporary file that is renamed into place, so a crash
    mid-save keeps the previous checkpoint.
    """

    def __init__(self, run_dir: Path, every_n_steps: int) -> None:
        self.path = run_dir / LAST
        self.every_n_steps = every_n_steps
        self._saved_at = -1

    def save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step == self._saved_at:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # the full training state, not only weights
        trainer.strategy.barrier("last-checkpoint")
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)


class Throughput(Callback):
    """Logs images/s (data loading included) and the learning rate to the progress bar and the loggers."""

    def __init__(self) -> None:
        self._last: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        images = batch[0][0] if isinstance(batch[0], (list, tuple)) else batch[0]
        now = time.perf_counter()
        elapsed, self._last = max(now - self._last, 1e-9), now
        pl_module.log("img_s", len(images) * trainer.world_size / elapsed, prog_bar=True, on_step=True, on_epoch=False)
        pl_module.log("lr", trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, on_step=True, on_epoch=False)


def _quiet_lightning() -> None:
    """Keep Lightning's advice about workers and logging intervals out of the user's way."""
    for name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda", "lightning_fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode at the start of training.*")  # the frozen teacher


def build_trainer(config: TrainConfig, run_dir: Path, val_every_steps: int | None = None, callbacks: Sequence[Callback] = ()) -> pl.Trainer:
    """The Trainer every stage uses, built from the common config fields."""
    _quiet_lightning()
    multi = config.devices > 1 or config.num_nodes > 1
    validate = config.knn_every > 0 or bool(val_every_steps)
    return pl.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy="ddp" if multi else "auto",
        precision=resolve_precision(config),
        max_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        default_root_dir=run_dir,
        logger=[CSVLogger(run_dir, name="logs", version=""), TensorBoardLogger(run_dir, name="logs", version="")],
        callbacks=[LastCheckpoint(run_dir, config.checkpoint_every), Throughput(), TQDMProgressBar(refresh_rate=1), *callbacks],
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if validate else 0,
        check_val_every_n_epoch=None if val_every_steps else max(config.knn_every, 1),
        val_check_interval=val_every_steps,
        log_every_n_steps=1,
        enable_model_summary=False,
    )


def fit(
    module: pl.LightningModule,
    train_loader: DataLoader,
    val_loaders: list[DataLoader] | None,
    config: TrainConfig,
    run_dir: Path,
) -> pl.Trainer:
    """Train ``module`` in ``run_dir``: resolved config, logs, ``last.ckpt``; resume when asked."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = resume_path(config, run_dir)
    trainer = build_trainer(config, run_dir, config.knn_every_steps)
    if trainer.is_global_zero:
        save_config(config, run_dir / "config.yaml")
        if ckpt:
            print(f"resuming from {ckpt}")
    trainer.fit(module, train_loader, val_loaders, ckpt_path=ckpt, weights_only=True)
    return trainer


def data_name(config: CommonConfig) -> str:
    """A short name of the dataset for run folders (``fashion-mnist``, ``imagenet`` for /data/imagenet)."""
    return Path(config.data).name or "data"


def check_batch(dataset_size: int, config: CommonConfig) -> None:
    """A batch larger than the dataset would train on nothing: say so before building models."""
    global_batch = config.batch_size * config.devices * config.num_nodes
    if config.batch_size < 1:
        raise SeedError(f"--batch-size must be at least 1, got {config.batch_size}")
    if global_batch > dataset_size:
        devices = config.devices * config.num_nodes
        raise SeedError(f"--batch-size {config.batch_size} x {devices} devices exceeds the {dataset_size} training images; lower --batch-size")


def monitor_loaders(config: TrainConfig) -> list[DataLoader]:
    """Seeded subsets of train (the kNN bank) and val (the queries) with the eval transform."""
    from seed.data import eval_transform, load_dataset

    loaders = []
    for split, size in (("train", config.knn_bank_size), ("val", config.knn_query_size)):
        dataset = load_dataset(config.data, split, config.data_root, config.download, eval_transform(config.image_size))
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed))
        subset = Subset(dataset, order[:size].tolist())
        loaders.append(make_loader(subset, config, shuffle=False, batch_size=max(config.batch_size, 256)))
    return loaders
