import pytest
import torch

from seed.queue import TeacherQueue


def _fifo_reference(size: int, batches: list[torch.Tensor], start: torch.Tensor) -> torch.Tensor:
    """A list-based FIFO: one row at a time."""
    rows, ptr = [r for r in start], 0
    for batch in batches:
        for row in batch:
            rows[ptr] = row
            ptr = (ptr + 1) % size
    return torch.stack(rows)


@pytest.mark.parametrize("size, batch", [(8, 3), (8, 4), (5, 7), (6, 1)])
def test_queue_is_an_exact_fifo_for_any_size_and_batch(size, batch):
    queue = TeacherQueue(size, 2)
    start = queue.bank.clone()
    assert torch.allclose(start.norm(dim=1), torch.ones(size))  # random unit vectors at start
    batches = [torch.arange(i * batch, (i + 1) * batch, dtype=torch.float).unsqueeze(1).repeat(1, 2) for i in range(5)]
    for b in batches:
        queue.enqueue(b)
    assert torch.equal(queue.bank, _fifo_reference(size, batches, start))
    assert int(queue.bank_ptr) == (5 * batch) % size


def test_newest_rows_survive():
    queue = TeacherQueue(4, 1)
    queue.enqueue(torch.arange(10.0).unsqueeze(1))
    assert sorted(queue.bank.flatten().tolist()) == [6.0, 7.0, 8.0, 9.0]
