"""The one training engine: every stage trains through :func:`fit`.

It builds a Lightning ``Trainer`` from the config (CPU or GPUs, DDP across
processes and nodes, mixed precision, checkpoints, loggers, progress bar), and
resumes from the run folder's ``last.ckpt`` when there is one.

A resumed run continues exactly where the checkpoint left it, also mid-epoch
(docs/RELIABILITY.md): the train loader's order and augmentations are
functions of ``(seed, epoch, index)`` (``seed.sampling``), the checkpoint
records how many batches of the epoch are done, and the random generators are
reseeded from ``(seed, step)`` before every step. A non-finite loss stops the
run before its optimiser step, so ``last.ckpt`` keeps the last good weights.
"""

import csv
import logging
import math
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
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from torch.utils.data import DataLoader, Dataset, Subset

from seed.checkpoints import load_file
from seed.config import CommonConfig, TrainConfig, save_config
from seed.data import SKIPPED, check_classes, image_folders
from seed.errors import SeedError
from seed.sampling import EpochSampler, KeyedDataset, SeededSamples, mix, seed_all

LAST = "last.ckpt"


def default_workers(config: CommonConfig) -> int:
    """Loader processes: the flag, else one per core up to 8."""
    if config.num_workers is not None:
        return config.num_workers
    return min(8, os.cpu_count() or 1)


def make_loader(dataset: Dataset, config: CommonConfig, shuffle: bool, drop_last: bool = False, batch_size: int | None = None) -> DataLoader:
    """A DataLoader with the run's workers.

    ``shuffle=True`` (training): keys from :class:`~seed.sampling.EpochSampler` (its own share under DDP, resumable
    mid-epoch) into a :class:`~seed.sampling.KeyedDataset`, each image augmented under its own seed. Otherwise
    (evaluation) in order; Lightning adds a DistributedSampler under DDP.
    """
    workers = default_workers(config)
    batch_size = batch_size or config.batch_size
    sampler = None
    if shuffle:
        dataset = dataset if isinstance(dataset, KeyedDataset) else SeededSamples(dataset, config.seed)
        sampler = EpochSampler(len(dataset), config.seed, batch_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
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


def _finite(module: pl.LightningModule) -> bool:
    """Whether every floating-point weight and buffer is finite."""
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


def checkpoint_step(path: str) -> int:
    """The step of a training checkpoint to resume from, read safely (``weights_only``): a damaged, unsafe or
    foreign file stops here with one line, before anything starts."""
    content = load_file(path)
    if not isinstance(content, dict) or not {"global_step", "loops", "state_dict", "optimizer_states"} <= content.keys():
        raise SeedError(f"{path} holds no training state to resume (a last.ckpt holds it); pass it as weights instead, or --resume never")
    return int(content["global_step"])


class LastCheckpoint(Callback):
    """Writes ``last.ckpt`` every N steps, at each epoch end and at ``--max-steps``.

    Each write goes to a temporary file that is flushed to disk and renamed into
    place, so a crash or a full disk mid-save keeps the previous checkpoint. The
    callback's state is where the next batch is, ``(epoch, batches of it done)``;
    on resume it tells the train loader's :class:`~seed.sampling.EpochSampler`
    (``sampler``, set by :func:`fit`) to start there.
    """

    def __init__(self, run_dir: Path, every_n_steps: int, keep_epochs: bool = False) -> None:
        self.path = run_dir / LAST
        self.every_n_steps = every_n_steps
        self.keep_epochs = keep_epochs
        self.sampler: EpochSampler | None = None
        self.saved_step: int | None = None
        self._position = {"epoch": 0, "batches": 0}

    def state_dict(self) -> dict[str, int]:
        return dict(self._position)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if self.sampler is not None:
            self.sampler.resume_from(state_dict["epoch"], state_dict["batches"])

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.ckpt_path and Path(trainer.ckpt_path).resolve() == self.path.resolve():
            self.saved_step = checkpoint.get("global_step")  # our last.ckpt holds that step already

    def save(self, trainer: pl.Trainer, epoch: int, batches: int) -> None:
        step = trainer.global_step
        if step == self.saved_step:
            return
        if not _finite(trainer.lightning_module):
            raise SeedError(f"weights became non-finite at step {step} (lower --lr?); {self.last_good()}")
        self._position = {"epoch": epoch, "batches": batches}
        for logger in trainer.loggers:
            logger.save()  # the logs reach disk with the checkpoint: a resumed run's metrics.csv has no gap
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # the full training state, not only weights
            if trainer.is_global_zero:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, self.path)
        except OSError as error:
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)
            raise SeedError(f"could not write {self.path} at step {step} ({error.strerror or error}); {self.last_good()}") from None
        trainer.strategy.barrier("last-checkpoint")
        self.saved_step = step

    def last_good(self) -> str:
        """Where the run can go on from, for error messages."""
        if self.saved_step is not None:
            return f"last good checkpoint: {self.path} (step {self.saved_step})"
        if self.path.is_file():
            return f"last good checkpoint: {self.path}"
        return "no checkpoint was written before it"

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.is_last_batch:
            return  # the epoch-end save records this state as the start of the next epoch
        due = self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0
        if due or trainer.global_step == trainer.max_steps:
            self.save(trainer, trainer.current_epoch, progress.current.processed)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # not a stop at --max-steps, saved above
            epoch = trainer.fit_loop.epoch_progress.current.processed
            self.save(trainer, epoch, 0)
            if self.keep_epochs and trainer.is_global_zero:  # a hard link: no copy, and last.ckpt is replaced, never rewritten
                kept = self.path.parent / "checkpoints" / f"epoch-{epoch:03d}.ckpt"
                kept.parent.mkdir(exist_ok=True)
                kept.unlink(missing_ok=True)
                os.link(self.path, kept)


class SeedSteps(Callback):
    """Reseeds the random generators before every training step from ``(seed, step, rank)``.

    Whatever drew random numbers between two steps (a validation, a loader
    starting, a restart), step k sees the same random stream in every run of
    the same seed: MoCo's batch shuffle, CutMix, dropout.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        seed = mix(self.seed, trainer.global_step, trainer.global_rank)
        seed_all(seed)
        torch.cuda.manual_seed_all(seed)


class FiniteLoss(Callback):
    """Stops the run when the loss is nan or infinite, before its backward pass and optimiser step.

    The weights stay those of the last finished step, and ``last.ckpt`` those of
    the last checkpoint. (Under fp16 mixed precision, overflowing *gradients*
    are the GradScaler's business: it skips the step and lowers the scale.)
    """

    def __init__(self, checkpoint: LastCheckpoint) -> None:
        self.checkpoint = checkpoint

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            value = float(loss.detach().float().sum())
            what = f"became {value}" if not math.isfinite(value) else "became non-finite on another process"
            raise SeedError(f"loss {what} at step {trainer.global_step + 1}; {self.checkpoint.last_good()}")


class SkippedFiles(Callback):
    """Says once, when it changes, how many unreadable images the loaders stepped over (listed in ``skipped.txt``)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / SKIPPED
        self.reported = 0

    def report(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero or not self.path.is_file():
            return
        lines = sorted(set(self.path.read_text().splitlines()))
        self.path.write_text("".join(f"{line}\n" for line in lines))
        if len(lines) > self.reported:
            self.reported = len(lines)
            print(f"skipped {len(lines)} unreadable file{'s' if len(lines) > 1 else ''}, see {self.path}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report(trainer)


class ResumedCSVLogger(CSVLogger):
    """``logs/metrics.csv`` that, on resume, keeps the rows logged before the checkpoint's step.

    Lightning's CSV logger deletes an existing ``metrics.csv`` when it starts;
    the rows of the steps the resumed run will not redo are read first and
    written back, so the file holds the whole run.
    """

    def __init__(self, run_dir: Path, resumed_at: int | None) -> None:
        super().__init__(run_dir, name="logs", version="")
        path = Path(self.log_dir) / "metrics.csv"
        self._kept: list[dict[str, str]] = []
        if resumed_at is not None and path.is_file():
            with open(path, newline="") as handle:
                self._kept = [row for row in csv.DictReader(handle) if row.get("step") and int(float(row["step"])) < resumed_at]

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ExperimentWriter(log_dir=self.log_dir)  # this deletes metrics.csv
            if self._kept:
                self._experiment.metrics, self._kept = self._kept, []
                self._experiment.save()
        return self._experiment


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
    warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")  # it is: LastCheckpoint tells the EpochSampler where to start
    warnings.filterwarnings("ignore", ".*Previous log files in this directory will be deleted.*")  # ResumedCSVLogger keeps them


def build_trainer(config: TrainConfig, run_dir: Path, val_every_steps: int | None = None, callbacks: Sequence[Callback] = (),
                  resumed_at: int | None = None) -> pl.Trainer:
    """The Trainer every stage uses, built from the common config fields; ``resumed_at``: the step of the checkpoint it resumes."""
    _quiet_lightning()
    multi = config.devices > 1 or config.num_nodes > 1
    validate = config.knn_every > 0 or bool(val_every_steps)
    checkpoint = LastCheckpoint(run_dir, config.checkpoint_every, getattr(config, "keep_checkpoints", False))
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
        callbacks=[SeedSteps(config.seed), FiniteLoss(checkpoint), SkippedFiles(run_dir), checkpoint, Throughput(), TQDMProgressBar(refresh_rate=1),
                   *callbacks],
        deterministic=True if getattr(config, "deterministic", False) else None,  # None: leave torch's setting alone
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
    """Train ``module`` in ``run_dir``: resolved config, logs, ``last.ckpt``; resume when asked.

    The checkpoint to resume from is read (``weights_only``) before anything
    starts, so a damaged or unsafe file stops with one line.
    """
    ckpt = resume_path(config, run_dir)
    resumed_at = checkpoint_step(ckpt) if ckpt else None
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(config, run_dir, config.knn_every_steps, resumed_at=resumed_at)
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
        if config.max_steps is not None and config.max_steps > config.epochs * len(train_loader):
            print(f"note: --epochs {config.epochs} is {config.epochs * len(train_loader)} steps, so the run ends before --max-steps {config.max_steps}; "
                  "raise --epochs to reach it")
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
    """Seeded subsets of train (the kNN bank) and val (the queries) with the eval transform; the splits must share their classes."""
    from seed.data import dataset_for, eval_transform

    splits = [dataset_for(config, split, eval_transform(config.image_size)) for split in ("train", "val")]
    check_classes(*splits, config.data)
    loaders = []
    for dataset, size in zip(splits, (config.knn_bank_size, config.knn_query_size), strict=True):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed))
        subset = Subset(dataset, order[:size].tolist())
        loaders.append(make_loader(subset, config, shuffle=False, batch_size=max(config.batch_size, 256)))
    return loaders
