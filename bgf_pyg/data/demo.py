"""The embedded demo set: scikit-learn's handwritten digits, made hard enough to compare methods.

No download: ``sklearn.datasets.load_digits`` ships 1,797 real 8×8 digits. As in the real DML
protocol the test classes are unseen: digits 0–4 train, 5–9 test. Plain digits are too easy (raw
pixels reach R@1 ≈ 0.99 on the test classes), so every image is upsampled to 28×28 and distorted
once, seeded: a random affine map (rotation ±45°, scale 0.8–1.2, shift ±15 % of the side) and
Gaussian noise (σ = 0.5 on [0, 1] pixels); raw pixels then reach R@1 ≈ 0.54. See DESIGN §5.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from bgf_pyg.data.base import LabelledDataset, check_split, reindex

DEMO_SIZE = 28
DEMO_TRAIN_DIGITS = range(0, 5)
MAX_ROTATION_DEGREES = 45.0
SCALE_RANGE = (0.8, 1.2)
MAX_SHIFT = 0.15  # fraction of the image side
NOISE_STD = 0.5


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


def load_digits_demo(split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
    """The distorted digits of one split.

    Args:
        split: ``"train"`` (digits 0–4, 901 images) or ``"test"`` (digits 5–9, 896 images).
        seed: seeds the distortion (drawn once for all 1,797 images, then split).

    Returns:
        ``(images, digits)``: (N, 1, 28, 28) float images and the (N,) digit of each.
    """
    from sklearn.datasets import load_digits

    check_split(split)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / digits.images.max()
    classes = torch.tensor(digits.target, dtype=torch.long)
    images = F.interpolate(images, size=DEMO_SIZE, mode="bilinear", align_corners=False)
    generator = torch.Generator().manual_seed(seed)
    grid = F.affine_grid(_random_affine(len(images), generator), list(images.shape),
                         align_corners=False)
    images = F.grid_sample(images, grid, align_corners=False)
    images = images + NOISE_STD * torch.randn(images.shape, generator=generator)
    train = (classes >= DEMO_TRAIN_DIGITS.start) & (classes < DEMO_TRAIN_DIGITS.stop)
    keep = train if split == "train" else ~train
    return images[keep], classes[keep]


class DigitsDemo(LabelledDataset):
    """The demo set as a ``Dataset`` of ``(image (1, 28, 28) float tensor, label int)``.

    Args:
        split: ``"train"`` (digits 0–4) or ``"test"`` (digits 5–9).
        seed: seeds the distortion.
        transform: applied to each image tensor.

    ``labels`` are re-indexed to ``0..4`` per split (as every dataset here); ``class_ids`` holds
    the digits.
    """

    LAYOUT = "embedded (scikit-learn's digits, distorted once, seeded; no download, no --data-root)"
    SPLIT = (f"digits {DEMO_TRAIN_DIGITS.start}–{DEMO_TRAIN_DIGITS.stop - 1} train, "
             f"{DEMO_TRAIN_DIGITS.stop}–9 test")

    def __init__(self, split: str = "train", seed: int = 0, transform: Callable | None = None):
        self.images, digits = load_digits_demo(split, seed)
        self.class_ids = digits.tolist()
        self.labels = torch.tensor(reindex(self.class_ids), dtype=torch.long)
        self.transform = transform

    def load(self, index: int) -> Tensor:
        return self.images[index]
