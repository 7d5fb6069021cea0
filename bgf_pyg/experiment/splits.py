"""The datasets of one experiment: training, evaluation and validation splits, as images, as a
frozen backbone's cached features, or as the cached outputs of a trunk's frozen prefix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms as T

from .. import distributed
from ..config import Config
from ..data import (
    DATASETS,
    ImageListDataset,
    TransformOptions,
    build_dataset,
    build_transform,
    check_image_headers,
)
from ..data.features import HorizontalFlip, cached_features, feature_dataset
from ..data.noise import CorruptedTraining
from ..data.splits import split_validation
from ..metrics import evaluate_retrieval
from ..models import backbone_normalization
from ..train import show_progress

#: Folder of the frozen backbone's feature cache inside ``data_root`` (unless ``feature_cache``).
FEATURE_CACHE_DIR = ".features"


@dataclass
class Splits:
    """The datasets of one run: training split, evaluation split(s), and the validation split
    of held-out training classes (``val_class_ids``: their original ids) when there is one."""

    train: Dataset
    test: Dataset
    gallery: Dataset | None = None
    val: Dataset | None = None
    val_class_ids: list | None = None


def transform_options(config: Config) -> TransformOptions:
    """The image pipeline ``config`` describes, normalised for the backbone's weight family."""
    mean, std = backbone_normalization(config.backbone)
    return TransformOptions(
        size=config.image_size, crop_scale=tuple(config.crop_scale),
        interpolation=config.interpolation, test_resize=config.test_resize,
        random_erasing=config.random_erasing, mean=mean, std=std,
    )


def load_splits(
    dataset: str,
    root: str | None,
    augment: bool = True,
    check_images: str = "off",
    options: TransformOptions | None = None,
    val_classes: float = 0,
    val_seed: int = 0,
    label_noise: float = 0.0,
    outliers: float = 0.0,
    corruption_seed: int = 0,
) -> Splits:
    """Training and evaluation splits (a query split against a gallery where the dataset's
    registry entry says so, In-Shop's), transformed as
    ``options`` says, and with ``val_classes`` the validation split taken from the training
    classes (:func:`~bgf_pyg.data.splits.split_validation`); with ``check_images`` every image
    is opened now (:func:`~bgf_pyg.data.check_image_headers`). ``label_noise`` and
    ``outliers`` corrupt what remains for training
    (:class:`~bgf_pyg.data.noise.CorruptedTraining`, seeded by ``corruption_seed``)."""
    train_tf = build_transform(dataset, train=augment, options=options)
    test_tf = build_transform(dataset, train=False, options=options)
    train = build_dataset(dataset, root, "train", train_tf)
    # the evaluated split(s): a test split, or a query split and its gallery
    splits = Splits(train, *(build_dataset(dataset, root, split, test_tf)
                             for split in DATASETS[dataset].evaluation))
    if val_classes:  # before the image checks: a bad val_classes is found at once
        splits.train, splits.val, splits.val_class_ids = split_validation(
            train, val_classes, val_seed, train_transform=train_tf, val_transform=test_tf)
    for split in (train, splits.test, splits.gallery):
        if isinstance(split, ImageListDataset):
            check_image_headers(split, check_images)
    if label_noise or outliers:
        splits.train = CorruptedTraining(splits.train, label_noise, outliers, corruption_seed)
    return splits


def config_splits(config: Config, augment: bool | None = None,
                  check_images: str | None = None) -> Splits:
    """:func:`load_splits` as ``config`` says (``augment`` and ``check_images`` may override
    it: a check of the classes needs neither)."""
    return load_splits(
        config.dataset, config.data_root,
        augment=not config.no_augment if augment is None else augment,
        check_images=config.check_images if check_images is None else check_images,
        options=transform_options(config), val_classes=config.val_classes,
        val_seed=config.val_seed, label_noise=config.label_noise, outliers=config.outliers,
        corruption_seed=config.seed)


def frozen_splits(
    config: Config, splits: Splits, trunk: nn.Module, device: torch.device,
    cut: int | None = None,
) -> Splits:
    """``splits`` as datasets of the frozen ``trunk``'s features
    (:class:`~bgf_pyg.data.features.FeatureDataset`), read from or written to the feature cache
    (:func:`~bgf_pyg.data.features.cached_features`); ``trunk`` may be the frozen prefix of a
    trunk cut at ``cut`` (``train_tail``: its outputs are cached under the same rules, the cut
    part of the key). Every split gets the features of the dataset's test-time transform; the
    training split also those of its mirror image (unless ``no_augment``), one of the two drawn
    at random for each item. Under torch.distributed rank 0 fills the cache and every rank
    reads it."""
    test_view = build_transform(config.dataset, train=False, options=transform_options(config))
    train_views = [test_view] if config.no_augment else [
        test_view, T.Compose([HorizontalFlip(), test_view])]
    cache_dir = Path(config.feature_cache or Path(config.data_root) / FEATURE_CACHE_DIR)
    progress = show_progress(False if config.no_progress else None)
    trunk.to(device)

    # The training and validation splits share one image list: read its features once.
    read: dict[tuple[int, int], torch.Tensor] = {}

    def features_of(images: ImageListDataset, transform) -> torch.Tensor:
        def compute() -> torch.Tensor:
            return cached_features(images, trunk, transform, cache_dir, name=config.backbone,
                                   cut=cut, device=device, progress=progress)

        key = (id(images), id(transform))
        if key not in read:
            if distributed.is_distributed():
                distributed.run_on_main(lambda: compute() is None)  # rank 0 writes the cache
            read[key] = compute()
        return read[key]

    def convert(dataset: Dataset | None, views: list, sample_views: bool = False):
        if dataset is None:
            return None
        return feature_dataset(dataset, features_of, views, sample_views=sample_views)

    return Splits(convert(splits.train, train_views, sample_views=len(train_views) > 1),
                  convert(splits.test, [test_view]), convert(splits.gallery, [test_view]),
                  convert(splits.val, [test_view]), splits.val_class_ids)


def raw_pixel_metrics(dataset: Dataset) -> dict[str, float]:
    """Retrieval metrics of the flattened images themselves (the demo table's baseline row)."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).flatten(1)
    return evaluate_retrieval(images, torch.as_tensor(dataset.labels))
