"""Datasets (CUB-200-2011, Cars196, SOP, In-Shop, the emoji sets, the embedded two-digit demo),
the class-balanced sampler, a loader with its own augmentation stream, the standard transforms
and a frozen backbone's cached features."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from bgf_pyg.data.base import IMAGE_CHECKS, ImageListDataset, check_image_headers
from bgf_pyg.data.cars import Cars196
from bgf_pyg.data.cub import CUB200
from bgf_pyg.data.demo import DigitsDemo, load_digits_demo
from bgf_pyg.data.emoji import Emoji
from bgf_pyg.data.features import FeatureDataset, cached_features
from bgf_pyg.data.inshop import InShop
from bgf_pyg.data.loader import AugmentedLoader
from bgf_pyg.data.samplers import ClassBalancedBatchSampler, DistributedClassBalancedBatchSampler
from bgf_pyg.data.sop import StanfordOnlineProducts
from bgf_pyg.data.transforms import (
    TransformOptions,
    build_transform,
    demo_train_transform,
    eval_transform,
    train_transform,
)

DATASETS = {
    "cub": CUB200,
    "cars": Cars196,
    "sop": StanfordOnlineProducts,
    "inshop": InShop,
    "emoji": Emoji,
}


def build_dataset(
    name: str, root: str | Path | None, split: str, transform: Callable | None = None
) -> Dataset:
    """The dataset ``name`` (``cub``, ``cars``, ``sop``, ``inshop``, ``emoji`` or ``demo``) of
    one split; ``root`` is ignored for ``demo``."""
    if name == "demo":
        return DigitsDemo(split, transform=transform)
    if name not in DATASETS:
        raise ValueError(f"name must be one of {(*DATASETS, 'demo')}, got {name!r}")
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder, got None")
    return DATASETS[name](root, split, transform)


__all__ = [
    "AugmentedLoader",
    "DATASETS",
    "IMAGE_CHECKS",
    "CUB200",
    "Cars196",
    "ClassBalancedBatchSampler",
    "DistributedClassBalancedBatchSampler",
    "DigitsDemo",
    "Emoji",
    "FeatureDataset",
    "ImageListDataset",
    "InShop",
    "StanfordOnlineProducts",
    "TransformOptions",
    "build_dataset",
    "build_transform",
    "cached_features",
    "check_image_headers",
    "demo_train_transform",
    "eval_transform",
    "load_digits_demo",
    "train_transform",
]
