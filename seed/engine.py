"""The one training engine: every stage trains through :func:`fit`.

It builds a Lightning ``Trainer`` from the config (CPU or GPUs, DDP across
processes and nodes, mixed precision, checkpoints, loggers, progress bar), and
resumes from the run folder's ``last.ckpt`` when there is one. Its callbacks
are in ``seed.callbacks``, its data loaders in ``seed.loaders``.

A resumed run continues exactly where the checkpoint left it, also mid-epoch
(docs/RELIABILITY.md): the train loader's order and augmentations are
functions of ``(seed, epoch, index)`` (``seed.sampling``), the checkpoint
records how many batches of the epoch are done, and the random generators are
reseeded from ``(seed, step)`` before every step. A non-finite loss stops the
run before its optimiser step, so ``last.ckpt`` keeps the last good weights.
"""

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from seed.callbacks import LAST, CpuBf16Guard, FiniteLoss, LastCheckpoint, ResumedCSVLogger, SeedSteps, SkippedFiles, Throughput, checkpoint_step
from seed.config import CommonConfig, EngineConfig, save_config
from seed.data import SKIPPED, image_folders
from seed.errors import SeedError
from seed.precision import resolve_precision, use_channels_last
from seed.sampling import EpochSampler


def run_folder(config: CommonConfig, stage: str, name: str) -> Path:
    """The run folder: ``--output`` or ``runs/<stage>/<name>`` (same command, same folder, so it resumes)."""
    return Path(config.output or Path("runs") / stage / name)


def resume_path(config: EngineConfig, run_dir: Path) -> str | None:
    """The checkpoint to continue from, following ``--resume auto|never|PATH``."""
    if config.resume == "never":
        return None
    if config.resume == "auto":
        last = run_dir / LAST
        return str(last) if last.is_file() else None
    if not Path(config.resume).is_file():
        raise SeedError(f"--resume {config.resume}: no such checkpoint; use auto, never, or the path of a last.ckpt")
    return config.resume


def _quiet_lightning() -> None:
    """Keep Lightning's advice about workers and logging intervals out of the user's way."""
    for name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda", "lightning_fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode at the start of training.*")  # the frozen teacher
    warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")  # it is: LastCheckpoint tells the EpochSampler where to start
    warnings.filterwarnings("ignore", ".*Previous log files in this directory will be deleted.*")  # ResumedCSVLogger keeps them
    # Lightning builds a LeafSpec, which newer torch deprecates: nothing a user of ours can change
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def build_trainer(config: EngineConfig, run_dir: Path, callbacks: Sequence[Callback] = (), resumed_at: int | None = None) -> pl.Trainer:
    """The Trainer every stage uses, built from the engine's config fields; ``resumed_at``: the step of the checkpoint it resumes."""
    _quiet_lightning()
    multi = config.devices > 1 or config.num_nodes > 1
    every_epochs, val_every_steps = config.validation_every()
    validate = every_epochs > 0 or bool(val_every_steps)
    checkpoint = LastCheckpoint(run_dir, config.checkpoint_every, config.keep_checkpoints)
    return pl.Trainer(
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy="ddp" if multi else "auto",
        precision=resolve_precision(config),
        max_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        default_root_dir=run_dir,
        logger=[ResumedCSVLogger(run_dir, resumed_at), TensorBoardLogger(run_dir, name="logs", version="")],
        callbacks=[SeedSteps(config.seed), FiniteLoss(checkpoint), CpuBf16Guard(), SkippedFiles(run_dir), checkpoint, Throughput(),
                   TQDMProgressBar(refresh_rate=1),
                   *callbacks],
        deterministic=True if config.deterministic else None,  # None: leave torch's setting alone
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if validate else 0,
        check_val_every_n_epoch=None if val_every_steps else max(every_epochs, 1),
        val_check_interval=val_every_steps,
        log_every_n_steps=1,
        enable_model_summary=False,
    )


def fit(
    module: pl.LightningModule,
    train_loader: DataLoader,
    val_loaders: list[DataLoader] | None,
    config: EngineConfig,
    run_dir: Path,
) -> pl.Trainer:
    """Train ``module`` in ``run_dir``: resolved config, logs, ``last.ckpt``; resume when asked.

    The checkpoint to resume from is read (``weights_only``) before anything
    starts, so a damaged or unsafe file stops with one line.
    """
    ckpt = resume_path(config, run_dir)
    resumed_at = checkpoint_step(ckpt) if ckpt else None
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(config, run_dir, resumed_at=resumed_at)
    for callback in trainer.callbacks:
        if isinstance(callback, LastCheckpoint) and isinstance(train_loader.sampler, EpochSampler):
            callback.sampler = train_loader.sampler
    for loader in [train_loader, *(val_loaders or [])]:
        for folder in image_folders(loader.dataset):
            folder.skip_log = run_dir / SKIPPED
    if trainer.is_global_zero:
        save_config(config, run_dir / "config.yaml")
        if ckpt:
            print(f"resuming from {ckpt}")
            for logger in trainer.loggers:
                if isinstance(logger, ResumedCSVLogger) and logger.missing_steps:
                    print(logger.gap_note())
        if config.max_steps is not None and config.max_steps > config.epochs * len(train_loader):
            print(f"note: --epochs {config.epochs} is {config.epochs * len(train_loader)} steps, so the run ends before --max-steps {config.max_steps}; "
                  "raise --epochs to reach it")
    if use_channels_last(config):
        module.to(memory_format=torch.channels_last)  # 4-D weights NHWC; each convolution then runs NHWC whatever its input's layout
    trainer.fit(module, train_loader, val_loaders, ckpt_path=ckpt, weights_only=True)
    return trainer


def data_name(config: CommonConfig) -> str:
    """A short name of the dataset for run folders (``fashion-mnist``, ``imagenet`` for /data/imagenet)."""
    return Path(config.data).name or "data"
