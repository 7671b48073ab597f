"""The training sampler: equal DDP shares of one seeded permutation per epoch, and repeated augmentation under DDP."""

import torch
from torch.utils.data import Dataset

import seed.sampling
from seed.sampling import EpochSampler, SeededSamples


def _keys(monkeypatch, size: int, world: int, repeats: int, epoch: int = 0) -> list[list[tuple[int, ...]]]:
    """Every process's keys of ``epoch``, the process group faked rank by rank."""
    shares = []
    for rank in range(world):
        monkeypatch.setattr(seed.sampling, "_world", lambda rank=rank: (rank, world))
        sampler = EpochSampler(size, seed=0, batch_size=4, repeats=repeats)
        sampler.set_epoch(epoch)
        shares.append(list(sampler))
    return shares


def test_without_repeats_the_ranks_split_one_permutation_padded_to_equal_shares(monkeypatch):
    shares = _keys(monkeypatch, size=10, world=4, repeats=1)
    assert [len(share) for share in shares] == [3, 3, 3, 3] and all(len(key) == 2 for share in shares for key in share)
    seen = [index for share in shares for index, _ in share]
    assert set(seen) == set(range(10)) and len(seen) == 12  # two images padded in, as DistributedSampler does
    assert _keys(monkeypatch, size=10, world=4, repeats=3, epoch=0) != shares  # repeats change the order under DDP


def test_repeated_augmentation_sends_each_images_copies_to_other_ranks_under_their_own_augmentations(monkeypatch):
    """3 copies on 4 processes: an epoch keeps its length (3 keys a rank for 12 images), each image it shows comes on 3
    ranks, copies 0, 1, 2. Seen to fail when the copies were consecutive on one rank (pairs[rank * n:(rank + 1) * n])."""
    shares = _keys(monkeypatch, size=12, world=4, repeats=3)
    assert [len(share) for share in shares] == [3, 3, 3, 3]
    ranks_of: dict[int, set[int]] = {}
    copies_of: dict[int, set[int]] = {}
    for rank, share in enumerate(shares):
        for key in share:
            index, _, copy = key if len(key) == 3 else (*key, 0)
            ranks_of.setdefault(index, set()).add(rank)
            copies_of.setdefault(index, set()).add(copy)
    assert len(ranks_of) == 4 and all(len(ranks) == 3 for ranks in ranks_of.values())  # 12 keys: 4 images x 3 copies
    assert all(copies == {0, 1, 2} for copies in copies_of.values())


def test_on_one_process_repeats_do_nothing(monkeypatch):
    assert _keys(monkeypatch, size=10, world=1, repeats=3) == _keys(monkeypatch, size=10, world=1, repeats=1)


class _Noise(Dataset):
    """An 'augmentation' that is a random draw: what a key's seed gives."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3)


def test_each_copy_draws_its_own_augmentation_and_copy_0_is_the_plain_key():
    samples = SeededSamples(_Noise(), seed=0)
    assert torch.equal(samples[2, 5], samples[2, 5]) and torch.equal(samples[2, 5, 0], samples[2, 5])
    assert not torch.equal(samples[2, 5, 1], samples[2, 5]) and not torch.equal(samples[2, 5, 1], samples[2, 5, 2])
