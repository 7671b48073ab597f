"""The callbacks and logger of the one training engine (:func:`seed.engine.fit`).

``last.ckpt`` written atomically with where the next batch is, random streams reseeded
per step, a non-finite loss stopped before its step, unreadable files reported,
``metrics.csv`` kept across a resume, and images/s on the progress bar
(docs/RELIABILITY.md says what each one guarantees).
"""

import csv
import math
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from seed.checkpoints import load_file
from seed.data import SKIPPED
from seed.errors import SeedError
from seed.sampling import EpochSampler, mix, seed_all

LAST = "last.ckpt"


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


def guard_cpu_bf16_convolutions(module: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that stop a CPU bf16 forward in which a trained dense strided convolution gets 1x1 maps (a ResNet at 16px or less).

    There torch's oneDNN bf16 weight gradient is wrong: the taps that only see padding get uninitialised memory, finite
    garbage or nan (torch 2.14; docs/RELIABILITY.md). Depthwise and stride-1 convolutions compute it right.
    """
    def check(name: str, conv: torch.nn.Conv2d, inputs: tuple[torch.Tensor, ...]) -> None:
        maps = inputs[0]
        bf16 = maps.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        if maps.device.type == "cpu" and bf16 and torch.is_grad_enabled() and conv.weight.requires_grad and maps.shape[-2:] == (1, 1):
            raise SeedError(f"bf16 on the CPU: {name}, a stride-{conv.stride[0]} convolution, gets 1x1 maps at this --image-size, where "
                            "oneDNN's bf16 weight gradient is wrong; use --precision 32-true or a larger --image-size")

    return [conv.register_forward_pre_hook(lambda layer, inputs, name=name: check(name, layer, inputs))
            for name, conv in module.named_modules()
            if isinstance(conv, torch.nn.Conv2d) and conv.groups == 1 and max(conv.stride) > 1 and max(conv.kernel_size) > 1]


class CpuBf16Guard(Callback):
    """Under bf16, watches the first training step of each fit for 1x1 maps into strided convolutions
    (:func:`guard_cpu_bf16_convolutions`), before its backward pass; later steps have the same shapes, so the hooks go."""

    def __init__(self) -> None:
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if str(trainer.precision).startswith("bf16"):
            self.handles = guard_cpu_bf16_convolutions(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


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
    written back, so the file holds the whole run. Lightning logs a step's row
    just after a mid-epoch checkpoint of that step: a kill in between loses
    the row, and ``missing_steps`` names it.
    """

    def __init__(self, run_dir: Path, resumed_at: int | None) -> None:
        super().__init__(run_dir, name="logs", version="")
        path = Path(self.log_dir) / "metrics.csv"
        self._kept: list[dict[str, str]] = []
        self.missing_steps: list[int] = []
        if resumed_at is not None and path.is_file():
            with open(path, newline="") as handle:
                self._kept = [row for row in csv.DictReader(handle) if row.get("step") and int(float(row["step"])) < resumed_at]
            logged = {int(float(row["step"])) for row in self._kept}
            self.missing_steps = [step for step in range(resumed_at) if step not in logged]

    def gap_note(self) -> str:
        """One line naming the steps that have no row."""
        missing = self.missing_steps
        steps = ", ".join(map(str, missing)) if len(missing) <= 3 else f"{missing[0]} and {len(missing) - 1} more up to {missing[-1]}"
        return f"note: {Path(self.log_dir) / 'metrics.csv'} has no row for step {steps} (the run was stopped between a checkpoint and its log line)"

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
        views = isinstance(batch[0], (list, tuple)) and batch[0][0].dim() == 4  # else a tensor, or a list of images of any size (detection)
        images = batch[0][0] if views else batch[0]
        now = time.perf_counter()
        elapsed, self._last = max(now - self._last, 1e-9), now
        pl_module.log("img_s", len(images) * trainer.world_size / elapsed, prog_bar=True, on_step=True, on_epoch=False)
        pl_module.log("lr", trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, on_step=True, on_epoch=False)
