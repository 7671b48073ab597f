"""SEED without the teacher in the loop (``seed-distill --teacher-cache``), beyond the paper.

With the cache each image is shown under one of ``--cache-views`` N fixed augmented views
(:class:`seed.sampling.FixedCrops`, the mechanism of MEAL V2's logits cache): epoch e shows
view e mod N, its random draws seeded by (seed, image, view). The teacher embeds a view the
first time it is shown and never again, so the epochs after the first N run no teacher.

The embeddings are kept in fp16 in a memory-mapped file beside the run
(``<run>/teacher_cache/``): not in ``last.ckpt``, and not in a module buffer, which DDP would
broadcast every step. Every embedding the loss reads comes back from that file, a fresh one
included, so a step reads the same fp16 values whether its teacher ran now or before a restart:
a killed run resumes with the cache it had (the rows written after its last checkpoint are read
back, not recomputed). ``key.json`` holds what the rows depend on (the teacher file's SHA-256,
the data, the view recipe, N); a run of another key empties the cache. Under DDP each rank
writes the rows of its own batches (its shard of each epoch) into the one file, so the run
folder must be on storage that every rank sees, as resuming already requires.

Size on disk: images x N x embedding dim x 2 bytes, plus a byte per (image, view): ImageNet
(1.28 M images) with N = 10 and SEED's 128-d embeddings takes 3.3 GB.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import Tensor

from seed.errors import SeedError

KEY, EMBEDDINGS, FILLED = "key.json", "embeddings.npy", "filled.npy"


class TeacherCache:
    """The teacher's fp16 embedding of every (image, view), memory-mapped from ``folder``."""

    def __init__(self, folder: Path, key: dict[str, Any], images: int, views: int, dim: int) -> None:
        self.folder = Path(folder)
        self.shape = (images, views, dim)
        self.key = {**key, "images": images, "views": views, "dim": dim}
        self.embeddings: np.ndarray | None = None
        self.filled: np.ndarray | None = None

    def prepare(self) -> int:
        """On one process, before training: keep the files of this key, else start empty ones. Returns the rows filled."""
        key_file = self.folder / KEY
        if key_file.is_file() and json.loads(key_file.read_text()) == self.key and (self.folder / FILLED).is_file():
            return int(np.load(self.folder / FILLED, mmap_mode="r").sum())
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file.unlink(missing_ok=True)  # interrupted below, the next run starts over instead of trusting half-made files
        open_memmap(self.folder / EMBEDDINGS, mode="w+", dtype=np.float16, shape=self.shape).flush()
        open_memmap(self.folder / FILLED, mode="w+", dtype=np.bool_, shape=self.shape[:2]).flush()
        key_file.write_text(json.dumps(self.key, indent=1))
        return 0

    def open(self) -> None:
        """Map the files :meth:`prepare` made (every process, after it)."""
        try:
            self.embeddings = open_memmap(self.folder / EMBEDDINGS, mode="r+")
            self.filled = open_memmap(self.folder / FILLED, mode="r+")
        except (OSError, ValueError) as error:
            raise SeedError(f"teacher cache {self.folder} cannot be opened ({error}); delete that folder and run again") from None
        if self.embeddings.shape != self.shape or self.filled.shape != self.shape[:2]:
            raise SeedError(f"teacher cache {self.folder} holds {self.embeddings.shape}, not {self.shape}; delete that folder and run again")

    def hits(self, index: Tensor, view: Tensor) -> Tensor:
        """Whether each (image, view) is cached, on the CPU."""
        return torch.from_numpy(self.filled[index.cpu().numpy(), view.cpu().numpy()])

    def read(self, index: Tensor, view: Tensor) -> Tensor:
        """The cached embeddings as float32 (N, D), on the CPU."""
        return torch.from_numpy(self.embeddings[index.cpu().numpy(), view.cpu().numpy()]).float()

    def write(self, index: Tensor, view: Tensor, embeddings: Tensor) -> None:
        """Store rows, then mark them filled: a process killed in between leaves them unfilled, never half-written."""
        rows = index.cpu().numpy(), view.cpu().numpy()
        self.embeddings[rows] = embeddings.detach().cpu().to(torch.float16).numpy()
        self.filled[rows] = True

    def flush(self) -> None:
        """Write the mapped pages to disk (a killed process loses nothing without it; a crashed machine would)."""
        for array in (self.embeddings, self.filled):
            if array is not None:
                array.flush()
