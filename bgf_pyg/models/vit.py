"""Vision Transformer trunks from ``timm`` (optional extra: ``pip install -e ".[timm]"``).

BGFormer's authors train ViTs through timm (``SissiW/DyBGR`` ``net/model.py``, built on Hyp-ViT's
``htdt/hyp_metric``): the CLS token of the last layer (after the final LayerNorm) is the feature,
the classifier head removed. Weights are only read from a local file, never downloaded: a timm /
DINO checkpoint or state dict (``.pth``, ``.bin``, ``.safetensors``; ``state_dict`` / ``model``
wrappers unwrapped by timm) or a Google ``.npz``; the position embeddings are resampled by timm when
the image size differs from the checkpoint's.

Each name fixes the architecture *and* the weight family, because the family decides the input
normalisation: ImageNet-21k ViTs were trained on [-1, 1] inputs (mean = std = 0.5, the authors'
``mean_std`` for ``vit*`` models), DINO and DINOv2 on ImageNet's mean and std. The DINOv2 ViTs
(:mod:`bgf_pyg.models.dinov2`) take any image size and read three layouts of weights.

The feature (``pooling``) is the CLS token after the final LayerNorm, or that token concatenated
with the mean of the patch tokens (``cls+mean``, twice the width: DINOv2's linear-evaluation
feature). Every trunk stays a plain timm ``VisionTransformer`` (``patch_embed``, ``_pos_embed``,
``blocks``, ``norm``, ``forward_head``): ``cls+mean`` sits in timm's pooling slot ``attn_pool``.
"""

from __future__ import annotations

import importlib
import logging
import math
import os

import torch
from torch import Tensor, nn

from ..checks import InputError, naming
from ..domains import positive_int
from .dinov2 import (
    DEFAULT_GRID,
    DINOV2_BACKBONES,
    LAYOUTS,
    PATCH_SIZE,
    position_grid,
    to_timm_names,
)
from .weights import load_matching_state, weights_file

log = logging.getLogger(__name__)

#: Backbone name → timm architecture (each name's weight family and normalisation: its entry in
#: :data:`~bgf_pyg.models.BACKBONES`).
VIT_ARCHITECTURES: dict[str, str] = {
    "vit_small_in21k": "vit_small_patch16_224",
    "vit_small_dino": "vit_small_patch16_224",
    "vit_base_in21k": "vit_base_patch16_224",
    "vit_base_dino": "vit_base_patch16_224",
    **DINOV2_BACKBONES,
}
#: The feature of a ViT: its CLS token, or the CLS token and the mean patch token concatenated.
VIT_POOLINGS = ("cls", "cls+mean")
TIMM_EXTRA = 'pip install -e ".[timm]"'  # as README: the source checkout's extra


def import_timm():
    """``timm``, or an ``InputError`` naming the extra that installs it."""
    try:
        return importlib.import_module("timm")
    except ImportError as err:
        raise InputError(f"ViT backbones need timm, which is not installed: {TIMM_EXTRA}") from err


def read_vit_state(path: str | os.PathLike) -> tuple[str, dict[str, Tensor]]:
    """``(path, state dict)`` of a local checkpoint as timm reads it (``.safetensors`` too;
    ``state_dict`` / ``model`` wrappers and ``module.`` prefixes removed). Raises
    ``FileNotFoundError`` or ``InputError`` naming ``path``."""
    timm = import_timm()
    path = weights_file(path)
    try:
        state = timm.models.load_state_dict(path)
    except Exception as err:  # a truncated or foreign file raises several types
        raise InputError(f"could not read ViT weights from {path}: {err}") from err
    if not isinstance(state, dict):
        raise InputError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return path, state


def load_vit_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local timm/DINO checkpoint (or ``.npz``) into the timm ViT ``model``; its
    classifier (``head.*``) is skipped. Raises ``FileNotFoundError`` or ``InputError`` naming
    ``path``."""
    import_timm()
    from timm.models.vision_transformer import checkpoint_filter_fn

    if os.fspath(path).endswith(".npz"):
        path = weights_file(path)
        try:
            model.load_pretrained(path)
        except Exception as err:  # numpy and timm raise several types for a foreign file
            raise InputError(f"could not load ViT weights from {path}: {err}") from err
        return
    path, state = read_vit_state(path)
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as err:  # a foreign state dict raises several types
        raise InputError(f"could not read ViT weights from {path}: {err}") from err
    load_matching_state(model, state, path, "the ViT backbone", skip_prefix="head.")


def dinov2_trunk(
    name: str, pretrained: str | os.PathLike | None, image_size: int | None = None,
    **architecture
) -> nn.Module:
    """The timm DINOv2 ViT of backbone ``name`` for inputs of side ``image_size``
    (:func:`dinov2_from_state`), its weights read from the local file ``pretrained`` (``None``:
    random weights). ``architecture``: timm keyword arguments that override the
    architecture's (``depth``, ``embed_dim``, ``num_heads``: small models for tests)."""
    if pretrained is None:
        grid = DEFAULT_GRID if image_size is None else patch_grid(image_size)
        return _create_dinov2(name, grid, init=True, **architecture)
    path, state = read_vit_state(pretrained)
    return dinov2_from_state(name, state, path, image_size, **architecture)


def dinov2_from_state(
    name: str, state: dict[str, Tensor], source: str, image_size: int | None = None,
    **architecture
) -> nn.Module:
    """The timm DINOv2 ViT of backbone ``name`` holding ``state`` (any layout of
    :data:`~bgf_pyg.models.dinov2.LAYOUTS`), its position grid resampled to that of
    ``image_size`` (``None``: kept) as Hugging Face's Dinov2 resamples it. A state of another
    architecture is an ``InputError`` naming ``source`` (its file) and the layouts."""
    converted = to_timm_names(state)
    if converted is None:
        raise InputError(f"{source} holds no DINOv2 weights: {name} expects a state dict in the "
                         f"{LAYOUTS} layout; its keys begin {list(state)[:3]}")
    grid = position_grid(converted, source)
    if image_size is not None and patch_grid(image_size) != grid:
        grid = patch_grid(image_size)
        converted["pos_embed"] = resample_positions(converted["pos_embed"], grid)
    # The weights overwrite timm's own initialisation at once: skip it.
    model = _create_dinov2(name, grid, init=False, **architecture)
    load_matching_state(model, converted, source,
                        f"{name} (a DINOv2 state dict in the {LAYOUTS} layout)",
                        skip_prefix="head.")
    return model


def patch_grid(image_size: int) -> int:
    """Patches along a side of ``image_size`` px: a partial patch is padded (timm's
    ``dynamic_img_pad``), so every side from 1 px works."""
    return math.ceil(image_size / PATCH_SIZE)


def _create_dinov2(name: str, grid: int, init: bool, **architecture) -> nn.Module:
    return import_timm().create_model(
        DINOV2_BACKBONES[name], pretrained=False, num_classes=0, dynamic_img_size=True,
        dynamic_img_pad=True, img_size=grid * PATCH_SIZE, weight_init="" if init else "skip",
        **architecture)


def resample_positions(pos_embed: Tensor, side: int) -> Tensor:
    """DINOv2 position embeddings (1, 1 + grid², D) resampled to a ``side`` × ``side`` grid as
    Hugging Face's Dinov2 does at other image sizes: bicubic without antialiasing (timm's own
    resampling, at each forward of another size, antialiases)."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos_embed, [side, side], num_prefix_tokens=1, antialias=False)


class ClsMeanPool(nn.Module):
    """The CLS token and the mean of the patch tokens, concatenated: DINOv2's linear-evaluation
    feature. Sits in a timm ViT's ``attn_pool`` slot (given every token).

    **Shapes:** tokens (B, prefix + patches, D) → (B, 2·D)."""

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, tokens: Tensor) -> Tensor:
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens:].mean(1)], dim=1)

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}"


def set_pooling(model: nn.Module, pooling: str) -> int:
    """Make the timm ViT ``model`` return the feature ``pooling`` (:data:`VIT_POOLINGS`) and
    return that feature's width."""
    if pooling not in VIT_POOLINGS:
        raise naming(ValueError(f"vit_pooling must be one of {', '.join(VIT_POOLINGS)}, got "
                                f"{pooling!r}"), "vit_pooling")
    if pooling == "cls":
        return model.num_features
    model.attn_pool = ClsMeanPool(model.num_prefix_tokens)
    model.pool_include_prefix = True
    return 2 * model.num_features


def vit_trunk(
    name: str, pretrained: str | None, image_size: int, pooling: str = "cls"
) -> tuple[nn.Module, int]:
    """The timm ViT of backbone ``name`` for square inputs of side ``image_size`` (a DINOv2 ViT
    takes other sides too), returning the feature ``pooling``; and that feature's width (CLS of
    ViT-S: 384, of ViT-B: 768; twice that with ``cls+mean``)."""
    timm = import_timm()
    positive_int.check(image_size, "image_size")
    if name in DINOV2_BACKBONES:
        model = dinov2_trunk(name, pretrained, image_size)
    else:
        # With a weights file timm's own initialisation would be overwritten at once: skip it.
        init = "skip" if pretrained is not None else ""
        model = timm.create_model(VIT_ARCHITECTURES[name], pretrained=False, num_classes=0,
                                  img_size=image_size, weight_init=init)
        if pretrained is not None:
            load_vit_weights(model, pretrained)
    if pretrained is not None:
        log.info("%s: loaded weights from %s", name, pretrained)
    return model, set_pooling(model, pooling)
