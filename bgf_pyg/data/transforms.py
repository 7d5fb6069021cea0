"""Standard deep-metric-learning image transforms (ImageNet normalisation by default).

Train: ``RandomResizedCrop(size)`` + horizontal flip; evaluation: ``Resize(size·256/224)`` +
``CenterCrop(size)``; the protocol of the intra-batch and ProxyGML code and Musgrave et al. 2020
(they use 227, the ImageNet-style 224 is the default here). :class:`TransformOptions` holds what
the originals change: crop scale, interpolation, test resize, random erasing, normalisation. The
demo set's images are already tensors at their final size, so its transforms never resize.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchvision import transforms as T

from bgf_pyg.domains import positive_int, probability

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Inputs in [-1, 1]: the normalisation of the ImageNet-21k ViTs (Hyp-ViT / DyBGR ``mean_std``).
HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
#: Test-time resize is the crop size scaled by the ImageNet ratio 256 / 224.
RESIZE_RATIO = 256 / 224


INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR,
                  "bicubic": T.InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class TransformOptions:
    """What the originals' image pipelines differ in (the presets set these).

    Attributes:
        size: side of the (random or centre) crop.
        crop_scale: area range of ``RandomResizedCrop`` (torchvision's (0.08, 1); BGFormer's
            authors (0.2, 1)).
        interpolation: ``"bilinear"`` or ``"bicubic"`` (BGFormer's authors), for crop and resize.
        test_resize: test-time shorter side before the centre crop (``None``: size·256/224).
        random_erasing: probability of ``RandomErasing`` after normalisation (intra-batch: 0.5).
        mean, std: normalisation of the backbone's weight family.
    """

    size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    interpolation: str = "bilinear"
    test_resize: int | None = None
    random_erasing: float = 0.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        positive_int.check(self.size, "size")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")
        if self.test_resize is not None:
            positive_int.check(self.test_resize, "test_resize")
        probability.check(self.random_erasing, "random_erasing")


def train_transform(size: int = 224, options: TransformOptions | None = None) -> T.Compose:
    """RandomResizedCrop(size) → RandomHorizontalFlip → ToTensor → Normalize (→ RandomErasing);
    ``options`` sets scale, interpolation, normalisation and erasing (the side is ``size``)."""
    o = options or TransformOptions()
    steps = [
        T.RandomResizedCrop(size, scale=o.crop_scale,
                            interpolation=INTERPOLATIONS[o.interpolation]),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(o.mean, o.std),
    ]
    if o.random_erasing > 0:
        steps.append(T.RandomErasing(p=o.random_erasing))
    return T.Compose(steps)


def eval_transform(size: int = 224, options: TransformOptions | None = None) -> T.Compose:
    """Resize(test_resize, default round(size·256/224)) → CenterCrop(size) → ToTensor →
    Normalize."""
    o = options or TransformOptions()
    resize = o.test_resize if o.test_resize is not None else round(size * RESIZE_RATIO)
    return T.Compose([
        T.Resize(resize, interpolation=INTERPOLATIONS[o.interpolation]),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(o.mean, o.std),
    ])


def demo_train_transform(
    degrees: float = 30.0, translate: float = 0.1, scale: float = 0.15
) -> T.RandomAffine:
    """A random affine jitter of the demo's (1, 28, 56) tensors (no resize): rotation ±``degrees``,
    shift ±``translate`` of the side, scale 1 ± ``scale``; of the same kind as (and somewhat weaker
    than) the demo's own distortion, so that training learns the invariance the test set needs."""
    return T.RandomAffine(degrees, translate=(translate, translate), scale=(1 - scale, 1 + scale))
