"""Backbones with embedding heads and their registry (:data:`BACKBONES`), the method wrappers and
theirs (:data:`METHODS`)."""

from .backbones import (
    BACKBONES,
    BackboneEntry,
    EmbeddingNet,
    backbone_normalization,
    build_backbone,
)
from .methods import BGFormerMethod, IntraBatchMethod, Method, PlainMethod, ProxyGMLMethod
from .optim import OPTIMIZERS, build_optimizer
from .registry import METHODS, MethodEntry, build_method
from .resnet import load_imagenet_weights
from .smallcnn import SmallCNN

__all__ = [
    "BACKBONES",
    "METHODS",
    "OPTIMIZERS",
    "BGFormerMethod",
    "BackboneEntry",
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
