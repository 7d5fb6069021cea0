"""The datasets, by name: how each is opened, how it is split for evaluation, and the defaults
it changes.

Add one with its dataset class and one registration
(``DATASETS.register("mine", DatasetEntry(MyDataset))``): it is then a choice of ``dataset``
everywhere (the configuration, ``bgf-train --dataset``, its help), and the experiment opens its
splits, transforms its images and applies its defaults from its entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..registry import Registry
from .cars import Cars196
from .cub import CUB200
from .demo import DigitsDemo
from .emoji import EMOJI_SIZE, Emoji
from .inshop import InShop
from .sop import StanfordOnlineProducts
from .transforms import TransformOptions, demo_train_transform, eval_transform, train_transform


@dataclass(frozen=True)
class DatasetEntry:
    """What a dataset is.

    Args:
        cls: the dataset class: ``cls(root, split, transform)`` for a folder of images,
            ``cls(split, transform=transform)`` for an embedded one (``images=False``). Its
            ``LAYOUT`` and ``SPLIT`` strings are its ``--help``.
        evaluation: the splits evaluated: ``("test",)``, or ``("query", "gallery")`` for a
            query set searched against a gallery.
        images: read from image files under a ``data_root`` (the image options, the image
            checks and the feature cache apply); else embedded tensors, used as they are.
        channels: channels of its images.
        defaults: the options it changes, given the ``image_size`` asked for (``None``: none).
        demo: the embedded demo: each method's ``demo_defaults`` apply over its defaults.
    """

    cls: type[Dataset]
    evaluation: tuple[str, ...] = ("test",)
    images: bool = True
    channels: int = 3
    defaults: Callable[[int | None], Mapping[str, Any]] = field(default=lambda size: {})
    demo: bool = False

    def open(self, root: str | Path | None, split: str,
             transform: Callable | None = None) -> Dataset:
        """Its ``split``, ``transform`` applied to each sample."""
        if not self.images:
            return self.cls(split, transform=transform)
        if root is None:
            raise ValueError(f"dataset {self.cls.__name__} needs a root folder, got None")
        return self.cls(root, split, transform)

    def transform(self, train: bool, options: TransformOptions | None = None) -> Callable | None:
        """The training or test transform: the standard image pipelines, or for embedded
        tensors a random affine jitter in training and nothing at test time."""
        if not self.images:
            return demo_train_transform() if train else None
        options = options or TransformOptions()
        return (train_transform if train else eval_transform)(options.size, options)


def _emoji_defaults(size: int | None) -> dict[str, Any]:
    """The emoji are rendered at ``EMOJI_SIZE`` px: the crop side is that (or the size asked
    for) and the test-time resize the crop's (the test images are whole emoji, uncropped)."""
    return {"image_size": size or EMOJI_SIZE, "test_resize": size or EMOJI_SIZE}


#: The demo configuration: the defaults of the demo set (so ``bgf-train`` with no options and
#: ``examples/cub.py`` without ``--data-root`` run the same thing): 30 epochs of 20
#: class-balanced 8×6 batches (960 images of the 40 training numbers left by the validation
#: split) with the demo's augmentation, AdamW at 1e-3, a 64-d embedding. Each method's own demo
#: settings (its entry's ``demo_defaults``) were chosen on the validation classes with
#: ``bgf-sweep`` (seed 0, validation R@1 of the selected checkpoint; docs/results.rst):
#: plain keeps these (multi-similarity at 1e-3 beat PCE and 3e-4); BGFormer: λ = 1 turns the
#: semantic (label) branch off (with λ = 0.5 or 0.75 validation R@1 fell to 0.51–0.78 against
#: 0.94–0.96 without it), α = 0.9 (0.958 against 0.942 at 0.5 and 0.80 at 0.1), k = 10 (tied
#: with 20), multi-similarity (PCE 0.71–0.85); intra-batch: one MPN layer (0.946 against 0.938
#: for two); ProxyGML: 4 proxies per class (0.979 against 0.962 for the original's 12).
DEMO_DEFAULTS: dict[str, Any] = {
    "backbone": "smallcnn", "embedding_dim": 64, "epochs": 30, "eval_every": 10, "lr": 1e-3,
    "classes_per_batch": 8, "samples_per_class": 6, "batch_size": 48, "k": 10,
    "proxies_per_class": 12, "proxygml_r": 0.5,
}

#: Every dataset; ``demo`` (embedded, no download) is the default.
DATASETS: Registry[DatasetEntry] = Registry("dataset")
DATASETS.register("cub", DatasetEntry(CUB200))
DATASETS.register("cars", DatasetEntry(Cars196))
DATASETS.register("sop", DatasetEntry(StanfordOnlineProducts))
DATASETS.register("inshop", DatasetEntry(InShop, evaluation=("query", "gallery")))
DATASETS.register("emoji", DatasetEntry(Emoji, defaults=_emoji_defaults))
DATASETS.register("demo", DatasetEntry(DigitsDemo, images=False, channels=1,
                                       defaults=lambda size: DEMO_DEFAULTS, demo=True),
                  default=True)


def build_dataset(
    name: str, root: str | Path | None, split: str, transform: Callable | None = None
) -> Dataset:
    """The split ``split`` of the registered dataset ``name`` (:data:`DATASETS`); ``root`` is
    ignored for an embedded one."""
    if name not in DATASETS:
        raise ValueError(f"name must be one of {tuple(DATASETS)}, got {name!r}")
    return DATASETS[name].open(root, split, transform)


def build_transform(
    dataset: str, train: bool, options: TransformOptions | None = None
) -> Callable | None:
    """The training or test transform of the registered ``dataset`` (see
    :meth:`DatasetEntry.transform`)."""
    return DATASETS[dataset].transform(train, options)
