"""Class-balanced P×M batch sampler (the sampler of BGFormer and intra-batch training).

Unlike pytorch-metric-learning's ``MPerClassSampler`` (global numpy RNG), the batches here are a
pure function of ``(seed, epoch)``, so a resumed run sees the batches it would have seen.
Plain random batches (ProxyGML) need no sampler: ``DataLoader(dataset, shuffle=True)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from bgf_pyg.checks import check_labels, check_positive_int


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``classes_per_batch`` (P) distinct classes × ``samples_per_class`` (M) samples.

    Each batch draws P distinct classes uniformly, then M samples of each: without replacement, or
    with replacement for classes with fewer than M samples. Pass it as a ``DataLoader``'s
    ``batch_sampler``.

    Args:
        labels: (N,) integer class of every sample (e.g. ``dataset.labels``).
        classes_per_batch: P, at most the number of classes.
        samples_per_class: M ≥ 1.
        num_batches: batches per epoch (default: ``N // (P·M)``, at least 1, about one pass).
        seed: with the epoch (:meth:`set_epoch`), fixes every batch.
    """

    def __init__(
        self,
        labels: Tensor | Sequence[int],
        classes_per_batch: int,
        samples_per_class: int,
        num_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        labels = torch.as_tensor(labels)
        check_labels(labels, labels.numel(), "labels")
        self.classes_per_batch = check_positive_int(classes_per_batch, "classes_per_batch")
        self.samples_per_class = check_positive_int(samples_per_class, "samples_per_class")
        classes, inverse = labels.unique(return_inverse=True)
        if classes_per_batch > classes.numel():
            raise ValueError(
                f"classes_per_batch must be <= the number of classes ({classes.numel()}), "
                f"got {classes_per_batch}"
            )
        order = inverse.argsort(stable=True)
        self.class_members = list(order.split(torch.bincount(inverse).tolist()))
        batch_size = classes_per_batch * samples_per_class
        self.num_batches = (
            max(1, labels.numel() // batch_size)
            if num_batches is None
            else check_positive_int(num_batches, "num_batches")
        )
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        state = np.random.SeedSequence((self.seed, self.epoch)).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        m = self.samples_per_class
        for _ in range(self.num_batches):
            classes = torch.randperm(len(self.class_members), generator=generator)
            batch = []
            for c in classes[: self.classes_per_batch].tolist():
                members = self.class_members[c]
                if members.numel() >= m:
                    pick = torch.randperm(members.numel(), generator=generator)[:m]
                else:
                    pick = torch.randint(members.numel(), (m,), generator=generator)
                batch.extend(members[pick].tolist())
            yield batch
