"""What one experiment trains with, built from its :class:`~bgf_pyg.config.Config`: the method,
its data loaders, its optimiser and schedule, and the checks of the options against the data."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .. import distributed
from ..checks import naming
from ..config import DEFAULT_CLASSES_PER_BATCH, Config
from ..data import (
    DATASETS,
    AugmentedLoader,
    ClassBalancedBatchSampler,
    DistributedClassBalancedBatchSampler,
)
from ..losses import LOSSES
from ..models import BACKBONES, METHODS, build_backbone, build_method, build_optimizer
from ..models.tail import tail_trunk
from ..train import random_stream, seed_worker, stream_seed
from .splits import Splits, frozen_splits

log = logging.getLogger("bgf_pyg")

EVAL_BATCH_SIZE = 128
#: Roles of the random streams (:func:`~bgf_pyg.train.stream_seed`) of a run's initial weights
#: and of its training augmentation.
BACKBONE_STREAM, METHOD_STREAM, AUGMENTATION_STREAM = "backbone", "method", "augmentation"


def method_hparams(config: Config) -> dict:
    """The keyword arguments of the method's class: its registry entry's options, read from
    ``config``."""
    return {keyword: getattr(config, option)
            for option, keyword in METHODS[config.method].options.items()}


def loss_options(config: Config) -> dict:
    """The keyword arguments of the metric loss: its registry entry's options, read from
    ``config`` (none for a method without a metric loss)."""
    if not METHODS[config.method].takes_loss:
        return {}
    return {keyword: getattr(config, option)
            for option, keyword in LOSSES[config.loss].options.items()}


def build_run_method(
    config: Config, splits: Splits, device: torch.device
) -> tuple[nn.Module, Splits]:
    """The (untrained) method ``config`` describes, and the splits it reads: with
    ``freeze_backbone`` the splits of the frozen trunk's cached features, the trunk itself then
    replaced by ``Identity`` (the head, graph module and loss train on those features); with
    ``train_tail`` the splits of the cached outputs of the trunk's frozen prefix, the trunk
    then a :class:`~bgf_pyg.models.tail.TailTrunk` that runs its tail from them.

    The backbone (trunk and head) initialises from the random stream :data:`BACKBONE_STREAM` of
    ``config.seed``, the method's own modules (its loss, then its graph module) from
    :data:`METHOD_STREAM`: a method that adds a graph module starts from the backbone and loss
    of the method without it, and leaves torch's global generator as it found it."""
    entry = METHODS[config.method]
    samples_per_class = config.samples_per_class if entry.balanced else None
    with random_stream(config.seed, BACKBONE_STREAM):
        backbone = build_backbone(config.backbone, config.embedding_dim, config.pretrained,
                                  pooling=config.pooling,
                                  in_channels=DATASETS[config.dataset].channels,
                                  image_size=config.image_size,
                                  trainable_stages=config.trainable_stages,
                                  vit_pooling=config.vit_pooling)
    if config.freeze_backbone:
        splits = frozen_splits(config, splits, backbone.trunk, device)
        backbone.trunk = nn.Identity()
    elif config.train_tail is not None:
        backbone.trunk = tail_trunk(backbone.trunk, config.train_tail)
        splits = frozen_splits(config, splits, backbone.trunk.prefix_module(), device,
                               cut=config.train_tail)
    with random_stream(config.seed, METHOD_STREAM):
        method = build_method(config.method, backbone, splits.train.num_classes,
                              loss=config.loss if entry.takes_loss else None,
                              samples_per_class=samples_per_class,
                              loss_options=loss_options(config), **method_hparams(config))
    return method, splits


def log_random_backbone(config: Config) -> None:
    """Say when a backbone trains from random weights (no weights file was given, and its
    entry has no packaged weights)."""
    if (not config.resume and config.pretrained is None
            and not BACKBONES[config.backbone].packaged_weights):
        log.info("%s backbone is randomly initialised (no pretrained weights file given)",
                 config.backbone)


def build_optimization(
    config: Config, method: nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimiser of ``method``'s parameter groups and the step schedule, if any."""
    optimizer = build_optimizer(method, config.lr, config.proxy_lr, config.weight_decay,
                                graph_lr=config.graph_lr, backbone_lr=config.backbone_lr,
                                name=config.optimizer, eps=config.adam_eps)
    scheduler = None
    if config.lr_milestones:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=config.lr_milestones, gamma=config.lr_gamma)
    return optimizer, scheduler


def check_against_data(config: Config, train: Dataset) -> None:
    """The sampling options against the training split's size and classes, before the model is
    built (``bgf-sweep`` runs it on every combination before its first run)."""
    balanced = METHODS[config.method].balanced
    if not balanced and config.batch_size > len(train):
        raise naming(ValueError(f"batch_size={config.batch_size} exceeds the {len(train)} "
                                "training images, so an epoch would have no batch"), "batch_size")
    if (balanced and config.classes_per_batch is not None
            and config.classes_per_batch > train.num_classes):
        raise naming(ValueError(f"classes_per_batch={config.classes_per_batch} exceeds the "
                                f"{train.num_classes} training classes"), "classes_per_batch")


def classes_per_batch(config: Config, num_classes: int) -> int:
    """P of each rank's P×M batch: ``classes_per_batch``, else the default P or as many as the
    ranks can draw disjointly."""
    if config.classes_per_batch is not None:
        return config.classes_per_batch
    return max(1, min(DEFAULT_CLASSES_PER_BATCH, num_classes // distributed.get_world_size()))


def check_batch_graph_k(config: Config, num_classes: int) -> None:
    """A method's kNN graph (BGFormer's ``k`` neighbours) comes from the other samples of the
    *global* batch (every rank's P×M batch together): refuse a k it cannot supply (a method
    without one, or BGFormer's top-K, where K >= the batch is full attention, has no limit)."""
    knn_k = METHODS[config.method].knn_k
    k = None if knn_k is None else knn_k(config)
    if k is None:
        return
    world, p = distributed.get_world_size(), classes_per_batch(config, num_classes)
    batch = world * p * config.samples_per_class
    if k >= batch:
        raise naming(ValueError(
            f"k={k} must be smaller than the global batch of {batch} samples "
            f"({world} process(es) × {p} classes × {config.samples_per_class} samples): each "
            "sample's neighbours are other samples"), "k")


def train_loader(config: Config, dataset: Dataset, generator: torch.Generator) -> DataLoader:
    """Class-balanced P×M batches (seeded by ``config.seed``), or random batches for a method
    that does not want them (ProxyGML, as the original); ``generator`` drives the shuffling
    and the workers' seeds, and the augmentation of batches loaded in the main process draws
    from this rank's stream :data:`AUGMENTATION_STREAM` (an
    :class:`~bgf_pyg.data.AugmentedLoader`)."""
    world, rank = distributed.get_world_size(), distributed.get_rank()
    augmentation = torch.Generator().manual_seed(
        stream_seed(config.seed, AUGMENTATION_STREAM, rank))
    common = {"num_workers": config.num_workers, "worker_init_fn": seed_worker,
              "generator": generator, "augmentation": augmentation}
    if not METHODS[config.method].balanced:
        if world == 1:
            return AugmentedLoader(dataset, batch_size=config.batch_size, shuffle=True,
                                   drop_last=True, **common)
        # Each rank a disjoint 1/W of a seeded permutation: batch_size rows per rank and step.
        shards = DistributedSampler(dataset, shuffle=True, seed=config.seed, drop_last=True)
        return AugmentedLoader(dataset, batch_size=config.batch_size, sampler=shards,
                               drop_last=True, **common)
    p = classes_per_batch(config, dataset.num_classes)
    sampler_type = (ClassBalancedBatchSampler if world == 1
                    else DistributedClassBalancedBatchSampler)
    sampler = sampler_type(dataset.labels, p, config.samples_per_class, seed=config.seed)
    return AugmentedLoader(dataset, batch_sampler=sampler, **common)


def eval_loader(config: Config, dataset: Dataset | None) -> DataLoader | None:
    """Batches of ``dataset`` for embedding (this rank's shard under torch.distributed)."""
    if dataset is None:
        return None
    return DataLoader(distributed.shard(dataset), batch_size=EVAL_BATCH_SIZE,
                      num_workers=config.num_workers)
