"""Corrupted training data for robustness studies: flipped labels and injected outlier images.

BGFormer's abstract claims that sparse graph attention is "robust to noisy samples";
``benchmarks/robustness.py`` measures it with this wrapper (``bgf-train --label-noise``,
``--outliers``). Only the training split is corrupted; validation and test stay clean.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from PIL import Image

from bgf_pyg.data.base import LabelledDataset
from bgf_pyg.domains import probability


def flip_labels(labels: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A copy of ``labels`` (values ``0..C-1``) in which a random ``fraction`` of the entries
    (rounded) carry another class, drawn uniformly among the ``C − 1`` others."""
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    count = round(fraction * labels.numel())
    if count and num_classes < 2:
        raise ValueError("flipping labels needs at least 2 classes")
    flipped = labels.clone()
    chosen = torch.randperm(labels.numel(), generator=generator)[:count]
    # a shift of 1..C-1 classes, modulo C, never lands on the true class
    shift = torch.randint(1, max(num_classes, 2), (count,), generator=generator)
    flipped[chosen] = (labels[chosen] + shift) % num_classes
    return flipped


def noise_like(sample: Any, generator: torch.Generator) -> Any:
    """A uniform-noise image of the same kind and size as ``sample`` (a tensor in [0, 1], or a
    PIL image of the same mode)."""
    if isinstance(sample, Image.Image):
        shape = (sample.height, sample.width, len(sample.getbands()))
        pixels = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8).numpy()
        return Image.fromarray(np.squeeze(pixels, -1) if shape[-1] == 1 else pixels, sample.mode)
    if isinstance(sample, torch.Tensor):
        return torch.rand(sample.shape, generator=generator, dtype=sample.dtype)
    raise TypeError(f"outliers need tensor or PIL image samples, got {type(sample).__name__}")


class CorruptedTraining(LabelledDataset):
    """``dataset`` with a ``label_noise`` fraction of its labels flipped to another class and
    ``outliers`` × ``len(dataset)`` uniform-noise images appended, each with a random label.

    Everything is drawn once from ``seed``. ``labels`` (what samplers read) are the corrupted
    ones; ``clean_labels`` keeps the true labels of the original items. Items go through
    ``dataset``'s transform, outliers included.

    Args:
        dataset: The training split (a :class:`LabelledDataset`).
        label_noise: Fraction in [0, 1] of the items whose label is flipped.
        outliers: Outlier images to add, as a fraction in [0, 1] of ``len(dataset)``.
        seed: Seeds the flips, the outliers' labels and their pixels.
    """

    def __init__(self, dataset: LabelledDataset, label_noise: float = 0.0, outliers: float = 0.0,
                 seed: int = 0) -> None:
        probability.check(label_noise, "label_noise")
        probability.check(outliers, "outliers")
        self.dataset = dataset
        self.transform = dataset.transform
        generator = torch.Generator().manual_seed(seed)
        self.clean_labels = dataset.labels
        noisy = flip_labels(dataset.labels, label_noise, generator)
        num_outliers = round(outliers * len(dataset))
        num_classes = int(dataset.labels.max()) + 1
        outlier_labels = torch.randint(num_classes, (num_outliers,), generator=generator)
        self.labels = torch.cat([noisy, outlier_labels])
        self.outlier_seeds = torch.randint(2**62, (num_outliers,), generator=generator).tolist()
        id_of = dict(zip(dataset.labels.tolist(), dataset.class_ids, strict=True))
        self.class_ids = [id_of[label] for label in self.labels.tolist()]

    @property
    def num_outliers(self) -> int:
        return len(self.outlier_seeds)

    @functools.cached_property
    def _outlier_template(self) -> Any:
        """The first item, whose kind and size every outlier copies (read once per process, not
        once per outlier: for an image dataset each read opens a file)."""
        return self.dataset.load(0)

    def load(self, index: int) -> Any:
        size = len(self.dataset)
        if index < size:
            return self.dataset.load(index)
        generator = torch.Generator().manual_seed(self.outlier_seeds[index - size])
        return noise_like(self._outlier_template, generator)
