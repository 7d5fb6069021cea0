"""A ``DataLoader`` whose sample loading draws from a random stream of its own.

Transforms such as torchvision's random crops and affine maps draw from torch's global generator.
Loaded in the main process (``num_workers=0``) they would share that stream with everything else
that draws from it (weight initialisation, dropout), so adding a module to a model would change
the augmentation of every later batch. :class:`AugmentedLoader` swaps in its own generator while
it loads a batch and swaps it back out afterwards. Worker processes are seeded from the loader's
``generator`` by PyTorch itself, so their draws are separate already.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader


class AugmentedLoader(DataLoader):
    r"""A ``DataLoader`` that loads every batch with torch's global CPU generator set to
    ``augmentation``'s state (which then moves on by what the batch drew).

    Args:
        \*args, \*\*kwargs: as ``DataLoader``; give it a ``generator`` too, or each epoch's
            iterator draws its seed from the global generator (PyTorch's rule).
        augmentation (torch.Generator): the stream of the dataset's random transforms; its
            state is part of a run's training state (a resumed run continues it).
    """

    def __init__(self, *args: Any, augmentation: torch.Generator, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.augmentation = augmentation

    def __iter__(self) -> Iterator:
        return _drawing_from(super().__iter__(), self.augmentation)


def _drawing_from(batches: Iterator, generator: torch.Generator) -> Iterator:
    """The items of ``batches``, each fetched with the global generator drawing ``generator``'s
    stream; the global generator's own state is untouched."""
    while True:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(generator.get_state())
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                generator.set_state(torch.get_rng_state())
        yield batch
