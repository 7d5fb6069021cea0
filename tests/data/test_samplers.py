"""ClassBalancedBatchSampler: P classes × M samples a batch, in a DataLoader, and its errors."""

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from bgf_pyg.data import ClassBalancedBatchSampler, DigitsDemo


def batches(sampler):
    return [list(batch) for batch in sampler]


def test_class_balanced_sampler():
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 7 + [3] * 5 + [4] * 6)
    sampler = ClassBalancedBatchSampler(labels, classes_per_batch=3, samples_per_class=4, seed=1)
    assert len(sampler) == 30 // 12
    first = batches(sampler)
    for batch in first:
        counts = Counter(labels[batch].tolist())
        assert len(batch) == 12 and len(counts) == 3 and set(counts.values()) == {4}
    assert batches(sampler) == first
    sampler.set_epoch(1)
    assert batches(sampler) != first
    sampler.set_epoch(0)
    assert batches(sampler) == first
    other = ClassBalancedBatchSampler(labels, 3, 4, num_batches=50, seed=2)
    assert len(batches(other)) == 50


def test_sampler_in_dataloader():
    dataset = DigitsDemo("train")
    sampler = ClassBalancedBatchSampler(dataset.labels, 5, 2, num_batches=3)
    images, labels = next(iter(DataLoader(dataset, batch_sampler=sampler)))
    assert images.shape == (10, 1, 28, 56)
    assert labels.unique(return_counts=True)[1].tolist() == [2] * 5


def test_sampler_errors():
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="classes_per_batch"):
        ClassBalancedBatchSampler(labels, 3, 2)
    with pytest.raises(ValueError, match="samples_per_class"):
        ClassBalancedBatchSampler(labels, 2, 0)
