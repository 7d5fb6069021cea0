"""torchvision ResNet-50 and ResNet-18 trunks: the network up to its global pooling (average or
maximum), the classifier left out.

ImageNet weights are only read from a local file (no download): pass the path of a torchvision
ResNet state dict (e.g. ``resnet50-19c8e357.pth``). Its ``fc.*`` entries are skipped, as in the
intra-batch original (``net/load_trained_net.py``).
"""

from __future__ import annotations

import logging
import os

from torch import nn
from torchvision.models import resnet18, resnet50

from .weights import load_matching_state, read_state_dict

log = logging.getLogger(__name__)

#: Backbone name → torchvision constructor.
RESNETS = {"resnet50": resnet50, "resnet18": resnet18}
#: The global poolings of a ResNet's last map (``pooling``).
POOLINGS = ("avg", "max")


def global_pool(pooling: str) -> nn.Module:
    """The global ``pooling`` (:data:`POOLINGS`) of a (B, C, H, W) map to (B, C, 1, 1)."""
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


def resnet_trunk(name: str, pretrained: str | None = None,
                 pooling: str = "avg") -> tuple[nn.Module, int]:
    """The trunk of ResNet ``name`` (:data:`RESNETS`), its weights read from the local file
    ``pretrained`` (``None``: random), pooling its last map with ``pooling``; and its width
    (ResNet-50: 2048, ResNet-18: 512)."""
    model = RESNETS[name](weights=None)
    if pretrained is not None:
        load_imagenet_weights(model, pretrained)
        log.info("%s: loaded ImageNet weights from %s", name, pretrained)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    model.avgpool = global_pool(pooling)  # torchvision flattens after this layer
    return model, feature_dim
