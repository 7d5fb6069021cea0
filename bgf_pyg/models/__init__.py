"""Backbones with embedding heads and the method wrappers (plain / bgformer / intra-batch /
proxygml)."""

from .backbones import (
    BACKBONES,
    EmbeddingNet,
    SmallCNN,
    backbone_normalization,
    build_backbone,
    load_imagenet_weights,
)
from .methods import (
    LOSSES,
    METHODS,
    BGFormerMethod,
    IntraBatchMethod,
    Method,
    PlainMethod,
    ProxyGMLMethod,
    build_method,
    build_metric_loss,
)
from .optim import OPTIMIZERS, build_optimizer

__all__ = [
    "BACKBONES",
    "LOSSES",
    "METHODS",
    "OPTIMIZERS",
    "BGFormerMethod",
    "EmbeddingNet",
    "IntraBatchMethod",
    "Method",
    "PlainMethod",
    "ProxyGMLMethod",
    "SmallCNN",
    "backbone_normalization",
    "build_backbone",
    "build_method",
    "build_metric_loss",
    "build_optimizer",
    "load_imagenet_weights",
]
