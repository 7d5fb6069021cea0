"""Datasets (CUB-200-2011, Cars196, SOP, In-Shop, the emoji sets, the embedded two-digit demo),
the class-balanced sampler, a loader with its own augmentation stream, the standard transforms,
a frozen backbone's cached features, and the registry of the datasets (:data:`DATASETS`)."""

from __future__ import annotations

from bgf_pyg.data.base import IMAGE_CHECKS, ImageListDataset, check_image_headers
from bgf_pyg.data.cars import Cars196
from bgf_pyg.data.cub import CUB200
from bgf_pyg.data.demo import DigitsDemo, load_digits_demo
from bgf_pyg.data.emoji import Emoji
from bgf_pyg.data.features import FeatureDataset, cached_features
from bgf_pyg.data.inshop import InShop
from bgf_pyg.data.loader import AugmentedLoader
from bgf_pyg.data.registry import (
    DATASETS,
    DEMO_DEFAULTS,
    DatasetEntry,
    build_dataset,
    build_transform,
)
from bgf_pyg.data.samplers import ClassBalancedBatchSampler, DistributedClassBalancedBatchSampler
from bgf_pyg.data.sop import StanfordOnlineProducts
from bgf_pyg.data.transforms import (
    TransformOptions,
    demo_train_transform,
    eval_transform,
    train_transform,
)

__all__ = [
    "AugmentedLoader",
    "DATASETS",
    "DEMO_DEFAULTS",
    "DatasetEntry",
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
