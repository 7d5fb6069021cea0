"""The embedded demo set: two-digit numbers built from scikit-learn's handwritten digits.

No download: ``sklearn.datasets.load_digits`` ships 1,797 real 8×8 digits. Ten digit classes are
too few for deep metric learning (a validation split would leave three training classes), so the
demo follows the multi-digit MNIST benchmarks of few-shot learning: a class is an ordered pair of
digits (the number ``10 · a + b``, 100 classes), an image is a drawing of ``a`` beside a drawing of
``b`` (1 × 28 × 56). As in the real DML protocol the test classes are unseen: a seeded half of the
100 numbers trains, the other half tests. Every drawing belongs to one number (each digit's
drawings are dealt into disjoint groups, about 9 per number and side), so no test or validation
image reuses a drawing seen in training. What transfers is what DML must learn: features of the
parts (the digits), recombined into unseen classes.

Each digit is upsampled to 28×28 and distorted once, seeded: a random affine map (rotation ±30°,
scale 0.8–1.2, shift ±10 % of its side) and Gaussian noise (σ = 0.3 on [0, 1] pixels) on the whole
image. See ``docs/design.rst`` §14.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from bgf_pyg.data.base import LabelledDataset, check_split, reindex

DEMO_SIZE = 28  # the side of one digit; an image is DEMO_SIZE × 2·DEMO_SIZE
NUM_DIGITS = 10
NUM_CLASSES = NUM_DIGITS**2  # the numbers 00–99
NUM_TRAIN_CLASSES = 50
IMAGES_PER_CLASS = 24
MAX_ROTATION_DEGREES = 30.0
SCALE_RANGE = (0.8, 1.2)
MAX_SHIFT = 0.10  # fraction of a digit's side
NOISE_STD = 0.3
DISTORTION_STREAM = 1 << 32  # the distortion's generator is seeded with seed + this


def _random_affine(n: int, generator: torch.Generator) -> Tensor:
    """(n, 2, 3) ``affine_grid`` matrices (output → input coordinates) of random
    rotate-scale-shift maps."""

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    angle = uniform(-1.0, 1.0).mul(math.radians(MAX_ROTATION_DEGREES))
    scale = uniform(*SCALE_RANGE)
    shift = uniform(-2 * MAX_SHIFT, 2 * MAX_SHIFT, 2)  # normalised coordinates span 2 per side
    cos, sin = angle.cos() / scale, angle.sin() / scale
    inverse = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    return torch.cat([inverse, -(inverse @ shift.unsqueeze(-1))], dim=-1)


def _distort(digits: Tensor, generator: torch.Generator) -> Tensor:
    """Each (1, 28, 28) digit of ``digits`` through its own random affine map."""
    grid = F.affine_grid(_random_affine(len(digits), generator), list(digits.shape),
                         align_corners=False)
    return F.grid_sample(digits, grid, align_corners=False)


def demo_classes(seed: int = 0) -> tuple[list[int], list[int]]:
    """The numbers (class ids 0–99) of the ``(train, test)`` splits: a seeded half each."""
    order = torch.randperm(NUM_CLASSES, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:NUM_TRAIN_CLASSES]), sorted(order[NUM_TRAIN_CLASSES:])


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 drawings as (N, 1, 8, 8) floats in [0, 1] and their (N,) digits
    (read once per process: both splits and :func:`demo_drawings` use them; never modified)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    drawings = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / digits.images.max()
    return drawings, torch.tensor(digits.target, dtype=torch.long)


def demo_drawings(split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
    """Which drawings make each image of ``split``.

    Every drawing belongs to one number: each digit's drawings are dealt, seeded, into 2·10
    disjoint groups, one for each number that has the digit on the left (``10·d + b``: group
    ``b``) and one for each that has it on the right (``10·a + d``: group ``10 + a``); each image
    of a number picks one drawing of each of its two groups.

    Returns:
        ``(numbers, drawings)``: the (N,) number of each image, grouped by number in increasing
        order, and the (N, 2) indices (into scikit-learn's digits) of its left and right drawing.
    """
    check_split(split)
    _, digit_of = _sklearn_digits()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(digit_of), generator=generator)
    groups = [order[digit_of[order] == d].tensor_split(2 * NUM_DIGITS) for d in range(NUM_DIGITS)]
    train_classes, test_classes = demo_classes(seed)
    numbers = torch.tensor(train_classes if split == "train" else test_classes)
    picks = []
    for number in numbers.tolist():
        left, right = divmod(number, NUM_DIGITS)
        sides = (groups[left][right], groups[right][NUM_DIGITS + left])
        picks.append(torch.stack([group[torch.randint(len(group), (IMAGES_PER_CLASS,),
                                                      generator=generator)] for group in sides],
                                 dim=1))
    return numbers.repeat_interleave(IMAGES_PER_CLASS), torch.cat(picks)


def load_digits_demo(split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
    """The two-digit images of one split.

    Args:
        split: ``"train"`` or ``"test"`` (50 numbers each, 24 images per number).
        seed: seeds the class split, the dealing of drawings (:func:`demo_drawings`) and the
            distortion.

    Returns:
        ``(images, numbers)``: (1200, 1, 28, 56) float images and the (1200,) number (class id,
        ``10 · left digit + right digit``) of each, grouped by number in increasing order.
    """
    numbers, picks = demo_drawings(split, seed)
    drawings, _ = _sklearn_digits()
    drawings = F.interpolate(drawings, size=DEMO_SIZE, mode="bilinear", align_corners=False)
    generator = torch.Generator().manual_seed(seed + DISTORTION_STREAM)
    images = torch.cat([_distort(drawings[side], generator) for side in picks.unbind(1)], dim=-1)
    images = images + NOISE_STD * torch.randn(images.shape, generator=generator)
    return images, numbers


class DigitsDemo(LabelledDataset):
    """The demo set as a ``Dataset`` of ``(image (1, 28, 56) float tensor, label int)``.

    Args:
        split: ``"train"`` or ``"test"`` (50 two-digit numbers each, unseen by the other).
        seed: seeds the set's construction (see :func:`load_digits_demo`).
        transform: applied to each image tensor.

    ``labels`` are re-indexed to ``0..49`` per split (as every dataset here); ``class_ids`` holds
    the numbers.
    """

    LAYOUT = ("embedded (two-digit numbers drawn from scikit-learn's digits, distorted once, "
              "seeded; no download, no --data-root)")
    SPLIT = (f"a seeded half of the {NUM_CLASSES} numbers train, the other half test; every "
             "drawing belongs to one number")

    def __init__(self, split: str = "train", seed: int = 0, transform: Callable | None = None):
        self.images, numbers = load_digits_demo(split, seed)
        self.class_ids = numbers.tolist()
        self.labels = torch.tensor(reindex(self.class_ids), dtype=torch.long)
        self.transform = transform

    def load(self, index: int) -> Tensor:
        return self.images[index]
