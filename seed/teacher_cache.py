"""The teacher out of the loop (``seed-distill --teacher-cache``), beyond the papers: one cache for every distiller.

With the cache each image is shown under one of ``--cache-views`` N fixed augmented views
(:class:`seed.sampling.FixedCrops`): epoch e shows view e mod N, its random draws seeded by
(seed, image, view). The teacher's output for a view is computed the first time the view is shown
and never again, so the epochs after the first N run no teacher. SEED keeps the teacher's
embeddings whole; MEAL V2 and USI keep the ``--cache-top-k`` largest class probabilities and
spread the rest evenly over the other classes when they read a row back (as FKD does).

Rows are kept in fp16 in memory-mapped files beside the run (``<run>/teacher_cache/``): not in
``last.ckpt``, and not in a module buffer, which DDP would broadcast every step. Every row the loss
reads comes back from the files, a fresh one included, so a step reads the same values whether its
teacher ran now or before a restart: a killed run resumes with the cache it had (the rows written
after its last checkpoint are read back, not recomputed), and a run whose cache was deleted
recomputes the same rows. ``key.json`` holds what the rows depend on (the teacher files' SHA-256,
the data, the view recipe, N, k); a run of another key empties the cache. Under DDP each rank writes
the rows of its own batches into the one set of files and reads any rank's rows from them, so the
run folder must be on storage that every rank sees, as resuming already requires.

Size on disk: images x N x (width or k) x 2 bytes (+ as much again for the classes of a top-k
cache), plus a byte per (image, view): ImageNet (1.28 M images) with N = 10 and SEED's 128-d
embeddings takes 3.3 GB; with MEAL V2's top-10 of 1000 classes, 0.5 GB.
"""

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import Tensor
from torch.utils.data import Dataset

from seed.checkpoints import file_sha256
from seed.data import dataset_for
from seed.errors import SeedError
from seed.sampling import FixedCrops

KEY, VALUES, CLASSES, FILLED = "key.json", "values.npy", "classes.npy", "filled.npy"
#: The cache's folder in the run folder.
FOLDER = "teacher_cache"


class TeacherCache:
    """The teacher's output for every (image, view), fp16, memory-mapped from ``folder``: ``width`` values per row,
    or its ``top_k`` largest (probabilities) and their classes."""

    def __init__(self, folder: Path, key: dict[str, Any], images: int, views: int, width: int, top_k: int | None = None) -> None:
        self.folder = Path(folder)
        self.width, self.top_k = width, (min(top_k, width) if top_k else None)
        self.shape = (images, views, self.top_k or width)
        self.key = {**key, "images": images, "views": views, "width": width, "top_k": self.top_k}
        self.values: np.ndarray | None = None
        self.classes: np.ndarray | None = None
        self.filled: np.ndarray | None = None

    def _files(self) -> dict[str, Any]:
        """Each file and its dtype and shape."""
        files = {VALUES: (np.float16, self.shape), FILLED: (np.bool_, self.shape[:2])}
        if self.top_k:
            files[CLASSES] = (np.int16 if self.width <= 2**15 else np.int32, self.shape)
        return files

    def prepare(self) -> int:
        """On one process, before training: keep the files of this key, else start empty ones. Returns the rows filled."""
        key_file = self.folder / KEY
        if key_file.is_file() and json.loads(key_file.read_text()) == self.key and (self.folder / FILLED).is_file():
            return int(np.load(self.folder / FILLED, mmap_mode="r").sum())
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file.unlink(missing_ok=True)  # interrupted below, the next run starts over instead of trusting half-made files
        for name, (dtype, shape) in self._files().items():
            open_memmap(self.folder / name, mode="w+", dtype=dtype, shape=shape).flush()
        key_file.write_text(json.dumps(self.key, indent=1))
        return 0

    def open(self) -> None:
        """Map the files :meth:`prepare` made (every process, after it)."""
        try:
            mapped = {name: open_memmap(self.folder / name, mode="r+") for name in self._files()}
        except (OSError, ValueError) as error:
            raise SeedError(f"teacher cache {self.folder} cannot be opened ({error}); delete that folder and run again") from None
        for name, (_, shape) in self._files().items():
            if mapped[name].shape != shape:
                raise SeedError(f"teacher cache {self.folder}: {name} holds {mapped[name].shape}, not {shape}; delete that folder and run again")
        self.values, self.filled, self.classes = mapped[VALUES], mapped[FILLED], mapped.get(CLASSES)

    def hits(self, index: Tensor, view: Tensor) -> Tensor:
        """Whether each (image, view) is cached, on the CPU."""
        return torch.from_numpy(self.filled[index.cpu().numpy(), view.cpu().numpy()])

    def read(self, index: Tensor, view: Tensor) -> Tensor:
        """The cached rows as float32 (N, width), on the CPU; a top-k row spreads what its k values leave evenly over the other classes."""
        rows = index.cpu().numpy(), view.cpu().numpy()
        values = torch.from_numpy(self.values[rows]).float()
        if not self.top_k:
            return values
        rest = self.width - self.top_k
        fill = (1 - values.sum(1, keepdim=True)).clamp_min(0) / max(rest, 1)
        dense = fill.expand(len(values), self.width).clone() if rest else values.new_zeros(len(values), self.width)
        return dense.scatter_(1, torch.from_numpy(self.classes[rows]).long(), values)

    def write(self, index: Tensor, view: Tensor, outputs: Tensor) -> None:
        """Store rows, then mark them filled: a process killed in between leaves them unfilled, never half-written."""
        rows = index.cpu().numpy(), view.cpu().numpy()
        outputs = outputs.detach().float().cpu()
        if self.top_k:
            outputs, classes = outputs.topk(self.top_k, dim=1)
            self.classes[rows] = classes.numpy().astype(self.classes.dtype)
        self.values[rows] = outputs.to(torch.float16).numpy()
        self.filled[rows] = True

    def lookup(self, index: Tensor, view: Tensor, compute: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """The rows of these (image, view) pairs on ``index``'s device, read back from the cache after ``compute(misses)``
        (a boolean mask over the batch) has filled the missing ones; and the hit mask."""
        hit = self.hits(index, view)
        if not bool(hit.all()):
            miss = ~hit
            self.write(index.cpu()[miss], view.cpu()[miss], compute(miss.to(index.device)))
        return self.read(index, view).to(index.device), hit

    def flush(self) -> None:
        """Write the mapped pages to disk (a killed process loses nothing without it; a crashed machine would)."""
        for array in (self.values, self.classes, self.filled):
            if array is not None:
                array.flush()


def cache_for(config: Any, run_dir: Path, teachers: Sequence[tuple[str | None, str | None]], channels_last: bool, names: Sequence[str],
              images: int, width: int, top_k: int | None = None) -> "TeacherCache | None":
    """``--teacher-cache``'s cache beside the run (None without the flag), keyed by what its rows depend on: each teacher's
    name and file (its SHA-256; None for hub weights), its memory format, the data and views, and the method's ``names``."""
    if not config.teacher_cache:
        return None
    shared = ("data", "image_size", "crop_min_scale", "seed", "teacher_fold_bn", *names)
    key = {"teachers": [[arch, file_sha256(path) if path else None] for arch, path in teachers], "channels_last": channels_last,
           **{name: getattr(config, name) for name in shared}}
    return TeacherCache(run_dir / FOLDER, key, images, config.cache_views, width, top_k)


def train_views(config: Any, transform: Callable) -> Dataset:
    """The train split under ``transform``; with ``--teacher-cache``, under ``--cache-views`` fixed views of it."""
    if config.teacher_cache:
        return FixedCrops(dataset_for(config, "train"), transform, config.cache_views, config.seed)
    return dataset_for(config, "train", transform)


class CachedTeacher:
    """The cache's life in a LightningModule (a mixin; the module sets ``self.cache``, a :class:`TeacherCache` or None):
    rank 0 makes (or keeps) the files, every rank maps them, each epoch end writes them out."""

    cache: TeacherCache | None

    def on_fit_start(self) -> None:
        if self.cache is None:
            return
        if self.trainer.is_global_zero:
            filled = self.cache.prepare()
            images, views, _ = self.cache.shape
            print(f"teacher cache: {self.cache.folder}, {filled} of {images * views} rows cached ({images} images x {views} views)")
        self.trainer.strategy.barrier("teacher cache")
        self.cache.open()

    def on_train_epoch_end(self) -> None:
        if self.cache is not None:
            self.cache.flush()

    def cached(self, index: Tensor, view: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """The teacher's rows for this batch through the cache, its hit rate logged."""
        rows, hit = self.cache.lookup(index, view, compute)
        self.log("cache_hits", hit.float().mean(), prog_bar=True)
        return rows
