"""Class-balanced P×M batch samplers (the sampler of BGFormer and intra-batch training), for
one process and for ``torch.distributed`` ranks.

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

from bgf_pyg import distributed
from bgf_pyg.checks import check_labels, naming
from bgf_pyg.domains import positive_int


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
        self.classes_per_batch = positive_int.check(classes_per_batch, "classes_per_batch")
        self.samples_per_class = positive_int.check(samples_per_class, "samples_per_class")
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
            else positive_int.check(num_batches, "num_batches")
        )
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose batches the next iteration yields, from its ``start_batch``-th
        batch on (a run resumed in the middle of an epoch)."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must lie in [0, {self.num_batches}], got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        state = np.random.SeedSequence((self.seed, self.epoch)).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        m = self.samples_per_class
        for step in range(self.num_batches):
            classes = torch.randperm(len(self.class_members), generator=generator)
            batch = []
            for c in classes[: self.classes_per_batch].tolist():
                members = self.class_members[c]
                if members.numel() >= m:
                    pick = torch.randperm(members.numel(), generator=generator)[:m]
                else:
                    pick = torch.randint(members.numel(), (m,), generator=generator)
                batch.extend(members[pick].tolist())
            if step >= self.start_batch:  # skipped batches still draw, so the rest match
                yield batch


class DistributedClassBalancedBatchSampler(ClassBalancedBatchSampler):
    """One rank's share of a global batch of ``world_size``·P classes × M samples.

    Every step draws W·P distinct classes as :class:`ClassBalancedBatchSampler` would with
    ``classes_per_batch = W·P``, and rank r takes the r-th block of P classes × M samples: the
    ranks' classes are disjoint within a step, every rank yields the same number of batches, and
    the rank-ordered concatenation of the ranks' batches (what
    :func:`bgf_pyg.distributed.gather_batch` builds) *is* the single-process batch of W·P classes.
    Batches depend on ``(seed, epoch)`` only; ``set_epoch(epoch, start_batch)`` resumes mid-epoch.

    Args:
        labels: (N,) integer class of every sample.
        classes_per_batch: P, classes of each rank's batch; W·P must not exceed the classes.
        samples_per_class: M ≥ 1.
        num_batches: steps per epoch (default: ``N // (W·P·M)``, at least 1: about one pass of
            the data over all ranks together).
        seed: shared by all ranks.
        rank, world_size: default: this process's in the current process group.
    """

    def __init__(
        self,
        labels: Tensor | Sequence[int],
        classes_per_batch: int,
        samples_per_class: int,
        num_batches: int | None = None,
        seed: int = 0,
        *,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        world_size = distributed.get_world_size() if world_size is None else world_size
        rank = distributed.get_rank() if rank is None else rank
        positive_int.check(world_size, "world_size")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        p = positive_int.check(classes_per_batch, "classes_per_batch")
        num_classes = torch.as_tensor(labels).unique().numel()
        if p * world_size > num_classes:
            raise naming(ValueError(
                f"classes_per_batch × world size = {p} × {world_size} = {p * world_size} exceeds "
                f"the {num_classes} training classes: each rank draws its own {p} classes per "
                f"step; use classes_per_batch <= {num_classes // world_size} or fewer processes"
            ), "classes_per_batch")
        super().__init__(labels, p * world_size, samples_per_class, num_batches, seed)
        self.rank, self.world_size, self.local_classes = rank, world_size, p

    def __iter__(self) -> Iterator[list[int]]:
        size = self.local_classes * self.samples_per_class
        for batch in super().__iter__():
            yield batch[self.rank * size: (self.rank + 1) * size]
