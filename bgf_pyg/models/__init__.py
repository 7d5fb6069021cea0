"""Backbones with embedding heads, the method wrappers and their registry (:data:`METHODS`)."""

from .backbones import (
    BACKBONES,
    EmbeddingNet,
    SmallCNN,
    backbone_normalization,
    build_backbone,
    load_imagenet_weights,
)
from .methods import BGFormerMethod, IntraBatchMethod, Method, PlainMethod, ProxyGMLMethod
from .optim import OPTIMIZERS, build_optimizer
from .registry import METHODS, MethodEntry, build_method

__all__ = [
    "BACKBONES",
    "METHODS",
    "OPTIMIZERS",
    "BGFormerMethod",
    "EmbeddingNet",
    "IntraBatchMethod",
    "Method",
    "MethodEntry",
    "PlainMethod",
    "ProxyGMLMethod",
    "SmallCNN",
    "backbone_normalization",
    "build_backbone",
    "build_method",
    "build_optimizer",
    "load_imagenet_weights",
]
