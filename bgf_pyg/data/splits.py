"""The validation split: a fixed, seeded subset of the *training* classes held out
(``docs/design.rst`` §12).

The originals choose their best epoch on the test classes. Here the checkpoint (and the
hyperparameters) are chosen on classes taken from the training split, so the test classes are
seen once, at the end. The held-out classes are drawn from the sorted original class ids with a
seeded permutation, so the split depends only on the set of classes and the seed, never on the
order of the dataset's items.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from bgf_pyg.checks import InputError, naming
from bgf_pyg.data.base import LabelledDataset, reindex

#: Fewest classes a retrieval split (validation or training) may keep.
MIN_CLASSES = 2


def val_class_count(val_classes: float, num_classes: int) -> int:
    """How many of ``num_classes`` training classes ``val_classes`` holds out: ``0`` none, a
    fraction in (0, 1) of them (rounded), or an integer count. Raises an ``InputError`` naming
    ``val_classes`` when fewer than 2 validation or 2 training classes would remain."""
    if isinstance(val_classes, bool) or val_classes < 0:
        raise naming(InputError(f"val_classes must be 0, a fraction in (0, 1) or a class count, "
                                f"got {val_classes!r}"), "val_classes")
    if val_classes == 0:
        return 0
    if isinstance(val_classes, float) and val_classes < 1:
        count = round(val_classes * num_classes)
    elif float(val_classes).is_integer():
        count = int(val_classes)
    else:
        raise naming(InputError(f"val_classes must be 0, a fraction in (0, 1) or a class count, "
                                f"got {val_classes!r}"), "val_classes")
    if count < MIN_CLASSES or num_classes - count < MIN_CLASSES:
        raise naming(InputError(
            f"val_classes={val_classes} holds out {count} of the {num_classes} training classes; "
            f"the validation and the training split each need at least {MIN_CLASSES}"),
            "val_classes")
    return count


def choose_val_classes(
    class_ids: Sequence[Hashable], val_classes: float, seed: int = 0
) -> list[Hashable]:
    """The original class ids held out for validation, sorted: a seeded random subset of the
    distinct ``class_ids`` of the size :func:`val_class_count` gives."""
    classes = sorted(set(class_ids))
    count = val_class_count(val_classes, len(classes))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(classes), generator=generator)[:count]
    return sorted(classes[i] for i in order.tolist())


class ClassSubset(LabelledDataset):
    """The items of ``dataset`` whose class is (or, with ``exclude``, is not) in ``classes``;
    labels re-indexed to ``0..C-1``, own ``transform`` (the training and validation parts of one
    dataset need different ones; ``dataset``'s own transform is not applied)."""

    def __init__(
        self,
        dataset: LabelledDataset,
        classes: Sequence[Hashable],
        *,
        exclude: bool = False,
        transform: Callable | None = None,
    ) -> None:
        chosen = set(classes)
        self.dataset = dataset
        self.indices = [i for i, c in enumerate(dataset.class_ids) if (c in chosen) != exclude]
        if not self.indices:
            raise naming(InputError(f"val_classes: the {'training' if exclude else 'validation'} "
                                    f"part of {dataset!r} is empty"), "val_classes")
        self.class_ids = [dataset.class_ids[i] for i in self.indices]
        self.labels = torch.tensor(reindex(self.class_ids), dtype=torch.long)
        self.transform = transform

    def load(self, index: int) -> Any:
        return self.dataset.load(self.indices[index])


def split_validation(
    dataset: LabelledDataset,
    val_classes: float,
    seed: int = 0,
    *,
    train_transform: Callable | None = None,
    val_transform: Callable | None = None,
) -> tuple[LabelledDataset, LabelledDataset, list[Hashable]]:
    """``(train, val, val_class_ids)``: ``dataset`` (a training split) without and with the
    held-out classes of :func:`choose_val_classes`; ``val_classes`` must not be 0."""
    held_out = choose_val_classes(dataset.class_ids, val_classes, seed)
    if not held_out:
        raise naming(InputError("val_classes=0 asks for no validation split"), "val_classes")
    train = ClassSubset(dataset, held_out, exclude=True, transform=train_transform)
    val = ClassSubset(dataset, held_out, transform=val_transform)
    return train, val, held_out
