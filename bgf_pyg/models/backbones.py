"""Backbones with an embedding head: torchvision ResNet-50/18, timm ViTs, EfficientNet-Lite0 with
its packaged ImageNet weights, and a small CNN for the demo set.

Every backbone is an :class:`EmbeddingNet`: a ``trunk`` that maps images to pooled features and a
``head`` Linear(``feature_dim``, ``embedding_dim``); the embedding is ``head(trunk(images))``, at
training and test time alike. The method wrappers (:mod:`bgf_pyg.models.methods`) use the parts
separately (BGFormer refines the features ``trunk(images)`` before the head); a graph module
narrower than the trunk projects on its own side (``docs/design.rst`` §17).

ImageNet weights are only read from a local file (no download): pass the path of a torchvision
ResNet state dict (e.g. ``resnet50-19c8e357.pth``). Its ``fc.*`` entries are skipped, as in the
intra-batch original (``net/load_trained_net.py``).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50

from ..checks import naming
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..domains import positive_int
from .efficientnet import EFFICIENTNET_BACKBONES, efficientnet_trunk
from .vit import VIT_BACKBONES, vit_trunk
from .weights import load_matching_state, read_state_dict

log = logging.getLogger(__name__)

BACKBONES = ("resnet50", "resnet18", "smallcnn", *VIT_BACKBONES, *EFFICIENTNET_BACKBONES)
POOLINGS = ("avg", "max")
#: Small CNN: channel widths of its conv blocks (a 2×2 max-pool follows all but the last) and
#: side of the grid its last map is pooled to (average and max, concatenated) before the head.
SMALLCNN_WIDTHS = (32, 64, 64)
SMALLCNN_GRID = 2


class EmbeddingNet(nn.Module):
    """``trunk`` (images → pooled features) and a linear embedding ``head``.

    Args:
        trunk: module mapping (B, C, H, W) images to (B, ``trunk_dim``) features.
        trunk_dim: width of the trunk's output.
        embedding_dim: width of the embedding.

    Attributes:
        feature_dim: width of :meth:`features` (``trunk_dim``).

    A checkpoint of an older version whose network had a projection ``proj`` between trunk and
    head (``graph_dim``, which now projects on the graph module's side) is refused when loaded,
    naming the option: its test-time network is not this one.

    **Shapes:** images (B, C, H, W) → embedding (B, ``embedding_dim``), un-normalised.
    """

    def __init__(self, trunk: nn.Module, trunk_dim: int, embedding_dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.trunk_dim = self.feature_dim = positive_int.check(trunk_dim, "trunk_dim")
        self.embedding_dim = positive_int.check(embedding_dim, "embedding_dim")
        self.head = nn.Linear(trunk_dim, embedding_dim)
        self.register_load_state_dict_pre_hook(_refuse_trunk_projection)

    def features(self, images: Tensor) -> Tensor:
        """Pooled trunk features (B, ``feature_dim``): what the head and a graph module see."""
        return self.trunk(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({type(self.trunk).__name__}, {self.trunk_dim}, "
                f"{self.embedding_dim})")


def _refuse_trunk_projection(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: a state dict with ``proj.*`` (a projection between trunk and
    head) is of an older network, ``head(proj(trunk(x)))``, which this one cannot reproduce."""
    if any(key.startswith(prefix + "proj.") for key in state_dict):
        raise ValueError(
            f"the weights hold {prefix}proj, a projection between trunk and head that older "
            "versions added with graph_dim; graph_dim now projects on the graph module's side "
            "only (the test-time network is head(trunk(x))), so these weights do not fit: "
            "evaluate them with the version that trained them, or train again"
        )


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks (2×2 max-pool between them), then average and max pooling of the last
    map to a grid of ``SMALLCNN_GRID`` × ``SMALLCNN_GRID`` cells, concatenated: for the demo
    set's 28×56 two-digit images (the grid gives each digit a column of two cells).

    Three 3×3 blocks (receptive field 18 pixels) see whole strokes and their junctions; the
    coarse grid keeps roughly where they lie (digits are told apart by it) while tolerating the
    demo's random shifts and rotations. Measured on the former one-digit 28×28 demo (σ = 0.3, one
    seed, BGFormer, 30 epochs): R@1 0.70 with the 2×2 grid against 0.65 with global (1×1)
    pooling; the former trunk (one 16-channel block flattened at 4×4, 5 epochs) stayed at the
    level of raw pixels.

    **Shapes:** (B, ``in_channels``, H, W) → (B, 2 · 64 · SMALLCNN_GRID² = 512).
    """

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width_in = in_channels
        for i, width in enumerate(SMALLCNN_WIDTHS):
            layers += [nn.Conv2d(width_in, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i < len(SMALLCNN_WIDTHS) - 1:
                layers.append(nn.MaxPool2d(2))
            width_in = width
        self.body = nn.Sequential(*layers)
        self.avg_pool = nn.AdaptiveAvgPool2d(SMALLCNN_GRID)
        self.max_pool = nn.AdaptiveMaxPool2d(SMALLCNN_GRID)
        self.out_channels = 2 * width_in * SMALLCNN_GRID**2

    def forward(self, images: Tensor) -> Tensor:
        x = self.body(images)
        return torch.cat([self.avg_pool(x).flatten(1), self.max_pool(x).flatten(1)], dim=1)


def _global_pool(pooling: str) -> nn.Module:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return nn.AdaptiveMaxPool2d(1) if pooling == "max" else nn.AdaptiveAvgPool2d(1)


def load_imagenet_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a torchvision ImageNet state dict from ``path`` into ``model`` (its ``fc.*`` skipped).

    Raises ``FileNotFoundError`` for a missing file and ``InputError`` (naming ``path``) for a
    file that is not a readable state dict of this architecture.
    """
    path, state = read_state_dict(path)
    load_matching_state(model, state, path, "the backbone", skip_prefix="fc.")


def _resnet_trunk(name: str, pretrained: str | None, pooling: str) -> tuple[nn.Module, int]:
    model = (resnet50 if name == "resnet50" else resnet18)(weights=None)
    if pretrained is not None:
        load_imagenet_weights(model, pretrained)
        log.info("%s: loaded ImageNet weights from %s", name, pretrained)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    model.avgpool = _global_pool(pooling)  # torchvision flattens after this layer
    return model, feature_dim


def backbone_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input (mean, std) of backbone ``name``'s weight family: ImageNet's (ResNets, DINO ViTs,
    EfficientNet-Lite0), or 0.5 for the ImageNet-21k ViTs."""
    if name in VIT_BACKBONES:
        return VIT_BACKBONES[name][1]
    return IMAGENET_MEAN, IMAGENET_STD


def build_backbone(
    name: str,
    embedding_dim: int,
    pretrained: str | None = None,
    pooling: str = "avg",
    in_channels: int = 1,
    *,
    image_size: int = 224,
    trainable_stages: int | None = None,
    vit_pooling: str = "cls",
) -> EmbeddingNet:
    """Build ``resnet50`` | ``resnet18`` | ``smallcnn`` | a ViT of :data:`VIT_BACKBONES` (needs
    ``timm``; the DINOv2 ones read timm, Meta and Hugging Face weights) | ``efficientnet_lite0``
    (needs the ``pretrained`` extra) with a Linear embedding head.

    Args:
        name: backbone name.
        embedding_dim: width of the embedding head.
        pretrained: local path of a torchvision ImageNet state dict (ResNets), of a timm / DINO
            checkpoint (ViTs; DINOv2: :data:`~bgf_pyg.models.dinov2.LAYOUTS`) or of an
            EfficientNet-Lite0 state dict; ``None`` means random
            initialisation (``bgf-train`` logs it), except for ``efficientnet_lite0``, whose
            ImageNet weights come from the installed weights package.
        pooling: ResNet global ``"avg"`` or ``"max"`` pooling (the intra-batch original: max);
            ``smallcnn`` pools avg + max to a small grid instead, a ViT reads ``vit_pooling``.
        in_channels: input channels of ``smallcnn`` (the others take RGB).
        image_size: input side of a ViT (its position embeddings are sized for it; a DINOv2
            ViT takes other sides too).
        trainable_stages: ``efficientnet_lite0`` only: train its last N stages, freeze the
            others (:meth:`~bgf_pyg.models.efficientnet.EfficientNetLite0Trunk.freeze_stages`);
            ``None`` trains all.
        vit_pooling: a ViT's feature: ``"cls"`` (its CLS token) or ``"cls+mean"`` (with the
            mean patch token, concatenated: twice the width).
    """
    positive_int.check(embedding_dim, "embedding_dim")
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if trainable_stages is not None and name not in EFFICIENTNET_BACKBONES:
        raise ValueError(f"trainable_stages applies to {', '.join(EFFICIENTNET_BACKBONES)}, "
                         f"not to {name!r}")
    if vit_pooling != "cls" and name not in VIT_BACKBONES:
        raise ValueError(f"vit_pooling applies to the ViT backbones, not to {name!r}")
    if name in EFFICIENTNET_BACKBONES:
        trunk, feature_dim = efficientnet_trunk(name, pretrained, trainable_stages)
    elif name in VIT_BACKBONES:
        trunk, feature_dim = vit_trunk(name, pretrained,
                                       positive_int.check(image_size, "image_size"), vit_pooling)
    elif name == "smallcnn":
        if pretrained is not None:
            raise naming(ValueError("smallcnn has no ImageNet weights to load from "
                                    "pretrained=PATH; use a ResNet or train from scratch"),
                         "pretrained")
        trunk: nn.Module = SmallCNN(positive_int.check(in_channels, "in_channels"))
        feature_dim = trunk.out_channels
    else:
        trunk, feature_dim = _resnet_trunk(name, pretrained, pooling)
    return EmbeddingNet(trunk, feature_dim, embedding_dim)
