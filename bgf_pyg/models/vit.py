"""Vision Transformer trunks from ``timm`` (optional extra: ``pip install -e ".[timm]"``).

BGFormer's authors train ViTs through timm (``SissiW/DyBGR`` ``net/model.py``, built on Hyp-ViT's
``htdt/hyp_metric``): the CLS token of the last layer (after the final LayerNorm) is the feature,
the classifier head removed. Weights are only read from a local file, never downloaded: a timm /
DINO checkpoint or state dict (``.pth``, ``.bin``, ``.safetensors``; ``state_dict`` / ``model``
wrappers unwrapped by timm) or a Google ``.npz``; the position embeddings are resampled by timm when
the image size differs from the checkpoint's.

Each name fixes the architecture *and* the weight family, because the family decides the input
normalisation: ImageNet-21k ViTs were trained on [-1, 1] inputs (mean = std = 0.5, the authors'
``mean_std`` for ``vit*`` models), DINO on ImageNet's mean and std.
"""

from __future__ import annotations

import importlib
import logging
import os

from torch import nn

from ..checks import InputError
from ..data.transforms import HALF_MEAN_STD, IMAGENET_MEAN, IMAGENET_STD
from .weights import load_matching_state, weights_file

log = logging.getLogger(__name__)

#: Backbone name → (timm architecture, (mean, std) of its weight family).
VIT_BACKBONES: dict[str, tuple[str, tuple[tuple[float, ...], tuple[float, ...]]]] = {
    "vit_small_in21k": ("vit_small_patch16_224", HALF_MEAN_STD),
    "vit_small_dino": ("vit_small_patch16_224", (IMAGENET_MEAN, IMAGENET_STD)),
    "vit_base_in21k": ("vit_base_patch16_224", HALF_MEAN_STD),
    "vit_base_dino": ("vit_base_patch16_224", (IMAGENET_MEAN, IMAGENET_STD)),
}
TIMM_EXTRA = 'pip install -e ".[timm]"'  # as README: the source checkout's extra


def import_timm():
    """``timm``, or an ``InputError`` naming the extra that installs it."""
    try:
        return importlib.import_module("timm")
    except ImportError as err:
        raise InputError(f"ViT backbones need timm, which is not installed: {TIMM_EXTRA}") from err


def load_vit_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local timm/DINO checkpoint (or ``.npz``) into the timm ViT ``model``; its
    classifier (``head.*``) is skipped. Raises ``FileNotFoundError`` or ``InputError`` naming
    ``path``."""
    timm = import_timm()
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = weights_file(path)
    if path.endswith(".npz"):
        try:
            model.load_pretrained(path)
        except Exception as err:  # numpy and timm raise several types for a foreign file
            raise InputError(f"could not load ViT weights from {path}: {err}") from err
        return
    try:
        state = timm.models.load_state_dict(path)
        state = checkpoint_filter_fn(state, model)
    except Exception as err:  # a truncated or foreign file raises several types
        raise InputError(f"could not read ViT weights from {path}: {err}") from err
    load_matching_state(model, state, path, "the ViT backbone", skip_prefix="head.")


def vit_trunk(name: str, pretrained: str | None, image_size: int) -> tuple[nn.Module, int]:
    """The timm ViT of backbone ``name`` for square inputs of side ``image_size``, returning the
    CLS token; and its width (384 for ViT-S/16, 768 for ViT-B/16)."""
    timm = import_timm()
    arch = VIT_BACKBONES[name][0]
    # With a weights file timm's own initialisation would be overwritten at once: skip it.
    init = "skip" if pretrained is not None else ""
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=image_size,
                              weight_init=init)
    if pretrained is not None:
        load_vit_weights(model, pretrained)
        log.info("%s: loaded weights from %s", name, pretrained)
    return model, model.num_features
