"""SEED's FIFO queue of teacher embeddings."""

import torch
from lightly.models import utils
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.utils import dist
from torch import Tensor

from seed.errors import SeedError


def check_queue_size(size: int, global_batch: int, method: str) -> None:
    """A queue smaller than the global batch would drop part of each batch's keys: one line before anything runs."""
    if size < global_batch:
        raise SeedError(f"--queue-size {size} is smaller than the global batch {global_batch}; use K >= batch ({method} uses 65536)")


class TeacherQueue(MemoryBankModule):
    """lightly's memory bank (random unit vectors at start, all-gather under DDP) as an exact FIFO.

    lightly drops the part of a batch that crosses the end of the bank and
    restarts at 0, so with K % batch != 0 the queue is not first-in-first-out;
    here a batch wraps around, and a batch larger than K keeps its newest K
    rows, exactly as if rows were enqueued one at a time.
    """

    def __init__(self, size: int, dim: int, gather_distributed: bool = True) -> None:
        super().__init__(size=(size, dim), gather_distributed=gather_distributed, feature_dim_first=False)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, batch: Tensor) -> None:
        if self.gather_distributed and dist.world_size() > 1:
            batch = utils.concat_all_gather(batch.contiguous())
        size, count, ptr = self.size[0], len(batch), int(self.bank_ptr)
        kept = batch[-size:].detach().to(self.bank.dtype)
        offsets = torch.arange(count - len(kept), count, device=self.bank.device)
        self.bank[(ptr + offsets) % size] = kept
        self.bank_ptr[0] = (ptr + count) % size

    def enqueue(self, batch: Tensor) -> None:
        """Append ``batch`` (N,D) after the newest rows, overwriting the oldest."""
        self._dequeue_and_enqueue(batch)
