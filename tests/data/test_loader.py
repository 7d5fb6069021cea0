"""bgf_pyg.data.loader: the augmentation of a loader draws from its own stream."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from bgf_pyg.data import AugmentedLoader, ClassBalancedBatchSampler


class Jittered(Dataset):
    """Items whose noise is drawn from torch's global generator, as torchvision's transforms."""

    def __init__(self) -> None:
        self.labels = torch.arange(3).repeat_interleave(4)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return torch.full((2,), float(index)) + torch.rand(2), self.labels[index]


def loader(seed: int) -> AugmentedLoader:
    data = Jittered()
    return AugmentedLoader(data, batch_sampler=ClassBalancedBatchSampler(data.labels, 2, 2),
                           generator=torch.Generator().manual_seed(1),
                           augmentation=torch.Generator().manual_seed(seed))


def epoch(batches: AugmentedLoader) -> torch.Tensor:
    return torch.cat([images for images, _ in batches])


def test_batches_do_not_depend_on_the_global_generator_nor_move_it():
    torch.manual_seed(0)
    first = epoch(loader(5))
    torch.manual_seed(99)  # what the model drew before (initialisation, dropout) is irrelevant
    before = torch.get_rng_state()
    second = epoch(loader(5))
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), before)  # loading drew nothing from it


def test_the_stream_moves_on_from_epoch_to_epoch_and_with_its_seed():
    batches = loader(5)
    first, second = epoch(batches), epoch(batches)
    assert not torch.equal(first, second)  # the next epoch is augmented afresh
    expected = torch.Generator().manual_seed(5)  # the same draws, in order, from the seed
    noise = torch.stack([torch.rand(2, generator=expected) for _ in range(first.size(0))])
    torch.testing.assert_close(first - first.floor(), noise, rtol=0, atol=1e-5)
    assert not torch.equal(epoch(loader(6)), epoch(loader(5)))
