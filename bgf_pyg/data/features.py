"""Features of a frozen backbone, computed once per image and view and cached on disk, and the
dataset that serves them (training the embedding head, the graph module and the loss on them).

:func:`cached_features` returns the (N, D) features of an :class:`ImageListDataset`'s images
under one deterministic transform. The cache file is named by a hash of its key and holds the key;
it is used only when the stored key equals the current one:

- the backbone: its name and a SHA-256 of its structure (``repr``: its layers and pooling, so
  ResNet ``max`` and ``avg`` pooling or a ViT's ``cls`` and ``cls+mean`` features differ) and of
  its state dict (every parameter and buffer: a change of weights file or of any weight is a new
  key),
- the transform's description (``repr``: resize, crop size, interpolation, normalisation, flip;
  a transform whose ``repr`` does not describe it, such as ``Lambda``, is refused),
- for the cached prefix of a trunk whose tail trains (``train_tail``), the cut,
- the images: a SHA-256 of every file's absolute path, size and modification time, in dataset
  order (another split, file list or order, or a changed image is a new key), and their count.
  The images' bytes are not read: a file replaced by one of the same size with its modification
  time set back (``cp -p``, ``rsync -t``, ``touch -r``) keeps the key; delete the cache folder
  after such a replacement (see the guide page "Limits and refusals", ``docs/limits.rst``).

The cached tensor of an image is a feature vector, or any tensor a trunk's prefix gives (a
feature map, a token sequence). Files are written atomically (a killed run leaves no
half-written cache); an unreadable file or one whose key differs is reported and computed again,
never used.

:class:`FeatureDataset` serves ``(feature, label)`` items; with several views per image (the
centre crop and its mirror image) a training item is one of its views drawn at random.
:func:`feature_dataset` builds one for a split, also when it is a class subset (validation
split) or carries flipped labels (:class:`~bgf_pyg.data.noise.CorruptedTraining`) of an image list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from ..checks import InputError
from ..domains import positive_int
from ..run_folder import save_checkpoint
from .base import ImageListDataset, LabelledDataset
from .noise import CorruptedTraining
from .splits import ClassSubset

log = logging.getLogger(__name__)

#: Version of the cache files' layout (part of the key).
CACHE_FORMAT = 1
#: Images per forward pass while extracting.
EXTRACT_BATCH_SIZE = 64


class HorizontalFlip:
    """Mirror a PIL image left to right. Deterministic: unlike ``RandomHorizontalFlip(p=1)`` it
    draws nothing from torch's random generator (whether a cache is read or computed must not
    change a seeded run)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return TF.hflip(image)

    def __repr__(self) -> str:
        return "HorizontalFlip()"


def module_fingerprint(module: nn.Module) -> str:
    """SHA-256 of ``module``'s structure (``repr``: its layers and their settings) and state dict
    (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256(repr(module).encode())
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {value.dtype} {tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def images_fingerprint(paths: Sequence[str | os.PathLike]) -> str:
    """SHA-256 of every file's absolute path, size and modification time, in order; a file
    deleted since the list was read is an ``InputError`` naming it."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as error:
            raise InputError(f"cannot read image {path}: {error.strerror} (was it deleted or "
                             "moved after the image list was read?)") from error
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def feature_key(
    dataset: ImageListDataset,
    backbone: nn.Module,
    transform: Callable,
    name: str,
    cut: int | None = None,
) -> dict:
    """What the features of ``dataset`` under ``transform`` depend on (see the module's
    docstring); ``cut``: the trunk's cut when ``backbone`` is its frozen prefix."""
    key = {"format": CACHE_FORMAT, "backbone": name, "weights": module_fingerprint(backbone),
           "transform": transform_description(transform), "count": len(dataset.paths),
           "images": images_fingerprint(dataset.paths)}
    return key if cut is None else {**key, "cut": cut}


def transform_description(transform: Callable) -> str:
    """``repr(transform)`` on one line, when it tells the transform apart from another: a
    ``Lambda`` (every one reads ``Lambda()``: another function would reuse its features) or an
    object without ``__repr__`` (its address: never reused) is an ``InputError``."""
    text = " ".join(repr(transform).split())
    if "Lambda()" in text or " object at 0x" in text:
        raise InputError(f"transform {text} cannot key the feature cache: its repr does not "
                         "describe what it does; give each of its parts a __repr__ that does "
                         "(torchvision's transforms have one; Lambda has not)")
    return text


def cache_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    """The cache file of ``key``: ``<cache_dir>/<backbone>-<hash of the key>.pt``
    (``<backbone>-tail<cut>-<hash>.pt`` for a prefix's outputs)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    name = key["backbone"] if "cut" not in key else f"{key['backbone']}-tail{key['cut']}"
    return Path(cache_dir) / f"{name}-{digest[:24]}.pt"


def read_cache(path: Path, key: dict) -> Tensor | None:
    """The features stored in ``path`` when it holds exactly ``key`` and a finite
    (``count``, ...) float tensor; else ``None`` (a file that is there but unusable is logged)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file raises several types
        log.warning("feature cache %s is unreadable (%s); computing it again", path, err)
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        log.warning("feature cache %s was made for other inputs; computing it again", path)
        return None
    features = state.get("features")
    if not (isinstance(features, Tensor) and features.dim() >= 2 and features.is_floating_point()
            and len(features) == key["count"] and bool(torch.isfinite(features).all())):
        log.warning("feature cache %s holds no valid features; computing it again", path)
        return None
    return features


@torch.no_grad()
def extract_features(
    dataset: ImageListDataset,
    backbone: nn.Module,
    transform: Callable,
    *,
    batch_size: int = EXTRACT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "features",
) -> Tensor:
    """``backbone(transform(image))`` of every image of ``dataset`` in order, in eval mode, as an
    (N, ...) float32 CPU tensor (the dataset's own transform is not used)."""
    positive_int.check(batch_size, "batch_size")
    was_training = backbone.training
    backbone.eval()
    chunks = []
    try:
        with tqdm(total=len(dataset), desc=desc, unit="image", disable=not progress,
                  leave=False) as bar:
            for start in range(0, len(dataset), batch_size):
                indices = range(start, min(start + batch_size, len(dataset)))
                images = torch.stack([transform(dataset.load(i)) for i in indices])
                chunks.append(backbone(images.to(device)).float().cpu())
                bar.update(len(indices))
    finally:
        backbone.train(was_training)
    features = torch.cat(chunks)
    if not bool(torch.isfinite(features).all()):
        raise InputError(f"the backbone's features of {dataset.source} contain NaN or inf")
    return features


def cached_features(
    dataset: ImageListDataset,
    backbone: nn.Module,
    transform: Callable,
    cache_dir: str | os.PathLike,
    *,
    name: str = "backbone",
    cut: int | None = None,
    batch_size: int = EXTRACT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Tensor:
    """The (N, ...) features ``backbone(transform(image))`` of ``dataset``'s images, read from
    ``cache_dir`` when they were computed before for the same key (see the module's docstring),
    else computed (progress bar with ``progress``) and written there atomically.

    Args:
        dataset: an :class:`ImageListDataset` (its ``paths`` and ``load``; its own transform is
            not used).
        backbone: maps (B, 3, H, W) images to (B, ...) features (pooled features, or the
            output of a trunk's frozen prefix); run in eval mode, no gradient.
        transform: a deterministic PIL image → tensor transform (e.g. ``eval_transform``).
        cache_dir: folder of the cache files (created when missing).
        name: the backbone's name, part of the key and of the file name.
        cut: with ``backbone`` the frozen prefix of a trunk (``train_tail``), its cut: part of
            the key (a cache of another cut is never read).
    """
    if not isinstance(dataset, ImageListDataset):
        raise TypeError(f"dataset must be an ImageListDataset, got {type(dataset).__name__}")
    key = feature_key(dataset, backbone, transform, name, cut)
    path = cache_path(cache_dir, key)
    what = f"{name} features" if cut is None else f"{name} prefix outputs (cut {cut})"
    features = read_cache(path, key)
    if features is not None:
        log.info("%s of %s: read from %s", what, dataset.source, path)
        return features
    features = extract_features(dataset, backbone, transform, batch_size=batch_size,
                                device=device, progress=progress, desc=what)
    save_checkpoint(path, {"key": key, "features": features})
    log.info("%s of %s: computed and cached in %s", what, dataset.source, path)
    return features


def image_list_of(dataset: LabelledDataset) -> tuple[ImageListDataset, list[int]]:
    """The image list under ``dataset`` and, for each of its items, the image's index there:
    ``dataset`` itself, a :class:`~bgf_pyg.data.splits.ClassSubset` of it, or a
    :class:`~bgf_pyg.data.noise.CorruptedTraining` of it without outliers."""
    if isinstance(dataset, ImageListDataset):
        return dataset, list(range(len(dataset)))
    if isinstance(dataset, ClassSubset):
        base, indices = image_list_of(dataset.dataset)
        return base, [indices[i] for i in dataset.indices]
    if isinstance(dataset, CorruptedTraining):
        if dataset.num_outliers:
            raise ValueError("outliers: noise images have no image file whose features could be "
                             "cached; corrupt the labels only")
        return image_list_of(dataset.dataset)
    raise TypeError(f"dataset must be a list of image files (an ImageListDataset, or a subset of "
                    f"one), got {type(dataset).__name__}")


def random_view(views: Tensor) -> Tensor:
    """One of the (V, ...) ``views`` of an item, drawn uniformly with torch's generator."""
    return views[int(torch.randint(len(views), ()))]


def first_view(views: Tensor) -> Tensor:
    """The first of the (V, ...) ``views`` of an item (the deterministic test-time view)."""
    return views[0]


class FeatureDataset(LabelledDataset):
    """Items ``(feature, label)``: precomputed features of a labelled dataset, with ``labels``
    and ``class_ids`` as every :class:`LabelledDataset` (so the class-balanced sampler works).

    Args:
        features: (V, N, ...) — V views of each of the N items, each a tensor of any shape
            (a feature vector, a cached prefix's feature map), or (N, D): one view.
        labels: (N,) labels in ``0..C-1``.
        class_ids: each item's original class id (default: the labels).
        sample_views: training: an item is one of its views drawn at random; else the first.
    """

    def __init__(
        self,
        features: Tensor,
        labels: Tensor | Sequence[int],
        class_ids: Sequence | None = None,
        *,
        sample_views: bool = False,
    ) -> None:
        if features.dim() == 2:
            features = features.unsqueeze(0)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if features.dim() < 3 or features.size(1) != labels.numel():
            raise ValueError(f"features must be (V, N, D), or (V, N, ...) for cached feature "
                             f"maps, with N = {labels.numel()} labels, got "
                             f"{tuple(features.shape)}")
        self.features = features
        self.labels = labels
        self.class_ids = list(labels.tolist() if class_ids is None else class_ids)
        self.transform = random_view if sample_views else first_view

    @property
    def num_views(self) -> int:
        return self.features.size(0)

    @property
    def feature_dim(self) -> int:
        """Width of each item's features (the channels of a cached feature map)."""
        return self.features.size(2)

    def load(self, index: int) -> Tensor:
        return self.features[:, index]


def feature_dataset(
    dataset: LabelledDataset,
    features_of: Callable[[ImageListDataset, Callable], Tensor],
    views: Sequence[Callable],
    *,
    sample_views: bool = False,
) -> FeatureDataset:
    """``dataset`` (an image list, a class subset of one, or one with flipped labels) as a
    :class:`FeatureDataset`: ``features_of(image_list, transform)`` gives the image list's
    (N, ...) features under each transform of ``views`` (e.g. :func:`cached_features`)."""
    base, indices = image_list_of(dataset)
    index = torch.tensor(indices, dtype=torch.long)
    features = torch.stack([features_of(base, view)[index] for view in views])
    return FeatureDataset(features, dataset.labels, dataset.class_ids, sample_views=sample_views)
