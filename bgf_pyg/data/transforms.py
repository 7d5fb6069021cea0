"""Standard deep-metric-learning image transforms (ImageNet normalisation).

Train: ``RandomResizedCrop(size)`` + horizontal flip; evaluation: ``Resize(size·256/224)`` +
``CenterCrop(size)``; the protocol of the intra-batch and ProxyGML code and Musgrave et al. 2020
(they use 227, the ImageNet-style 224 is the default here). The demo set's images are already
tensors at their final size, so its transforms never resize.
"""

from __future__ import annotations

from collections.abc import Callable

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Test-time resize is the crop size scaled by the ImageNet ratio 256 / 224.
RESIZE_RATIO = 256 / 224


def train_transform(size: int = 224) -> T.Compose:
    """RandomResizedCrop(size) → RandomHorizontalFlip → ToTensor → Normalize(ImageNet)."""
    return T.Compose([
        T.RandomResizedCrop(size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(size: int = 224) -> T.Compose:
    """Resize(round(size·256/224)) → CenterCrop(size) → ToTensor → Normalize(ImageNet)."""
    return T.Compose([
        T.Resize(round(size * RESIZE_RATIO)),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def demo_train_transform(
    degrees: float = 30.0, translate: float = 0.1, scale: float = 0.15
) -> T.RandomAffine:
    """A random affine jitter of the demo's (1, 28, 28) tensors (no resize): rotation ±``degrees``,
    shift ±``translate`` of the side, scale 1 ± ``scale``; of the same kind as (and somewhat weaker
    than) the demo's own distortion, so that training learns the invariance the test set needs."""
    return T.RandomAffine(degrees, translate=(translate, translate), scale=(1 - scale, 1 + scale))


def build_transform(dataset: str, train: bool, size: int = 224) -> Callable | None:
    """The transform for ``dataset`` (``"demo"`` or an image benchmark) in train or test mode;
    ``None`` for the demo's test split (its tensors are used as they are)."""
    if dataset == "demo":
        return demo_train_transform() if train else None
    return train_transform(size) if train else eval_transform(size)
