"""DINOv2 ViT-S/14 and ViT-B/14 (Oquab et al., 2023): the backbone names, and the one conversion of
their weights' layouts to the names of timm's ``VisionTransformer`` (built in
:func:`bgf_pyg.models.vit.dinov2_trunk`).

A DINOv2 state dict comes in three layouts, each read from a local file (``docs/dinov2.rst``):

- **timm** (``vit_small_patch14_dinov2``): ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.N.attn.qkv``, ``blocks.N.ls1.gamma``, ``norm``;
- **Meta** (``facebookresearch/dinov2``'s hub checkpoints): timm's names plus ``mask_token``
  (the masked-image-modelling token, unused for features);
- **Hugging Face** (``Dinov2Model``, any prefix such as ``dinov2.`` or ``backbone.``):
  ``embeddings.*``, ``encoder.layer.N.attention.attention.{query,key,value}``,
  ``layer_scale1.lambda1``, ``layernorm``; its separate query, key and value projections are
  concatenated into timm's ``qkv``.

The model is built for the run's image side: the weights' position grid (37 × 37 for the 518-px
checkpoints) is resampled once to that side's grid as Hugging Face's Dinov2 resamples it (bicubic
to the target size, no antialiasing; Meta's code differs by a 0.1 offset in its scale factor),
so the features at a side that is a multiple of 14 equal Hugging Face's. With timm's
``dynamic_img_size`` any other side works too, timm resampling the grid at each forward (with
antialiasing: slightly different features); with ``dynamic_img_pad`` a side that is not a
multiple of 14 is zero-padded on the right and bottom to one (Hugging Face drops the remainder).
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from ..checks import InputError

#: Backbone name → timm architecture.
DINOV2_BACKBONES = {
    "vit_small_dinov2": "vit_small_patch14_dinov2",
    "vit_base_dinov2": "vit_base_patch14_dinov2",
}
#: Side of a DINOv2 patch, in pixels.
PATCH_SIZE = 14
#: The position grid timm gives a DINOv2 model without weights (518 px).
DEFAULT_GRID = 37
#: The layouts a weights file may have, as an error message lists them.
LAYOUTS = ("timm (vit_*_patch14_dinov2), Meta (facebookresearch/dinov2: cls_token, mask_token, "
           "blocks.N.ls1.gamma) or Hugging Face Dinov2 (embeddings.*, encoder.layer.N.*)")

#: The key that marks the Hugging Face layout; what precedes it is the model's prefix.
HF_MARKER = "embeddings.patch_embeddings.projection.weight"
#: Hugging Face Dinov2 names (after the prefix) → timm's.
HF_RENAMES = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)
HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\."
                    r"(weight|bias)")
#: Tokens of the pretraining objective that a feature extractor does not use.
UNUSED = ("mask_token", "embeddings.mask_token")


def dinov2_layout(state: dict[str, Tensor]) -> str | None:
    """``"hf"``, ``"meta"`` or ``"timm"``: the layout of the DINOv2 ``state``; ``None`` when it
    has none of them (another architecture's state dict)."""
    if any(key.endswith(HF_MARKER) for key in state):
        return "hf"
    if "cls_token" in state and "patch_embed.proj.weight" in state:
        return "meta" if "mask_token" in state else "timm"
    return None


def to_timm_names(state: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """``state`` (any layout of :data:`LAYOUTS`) with timm's names and without the unused
    tokens; ``None`` when it is none of them. Keys it does not know keep their names, so
    loading reports them."""
    layout = dinov2_layout(state)
    if layout is None:
        return None
    if layout != "hf":
        return {key: value for key, value in state.items() if key not in UNUSED}
    prefix = next(key for key in state if key.endswith(HF_MARKER))[:-len(HF_MARKER)]
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue  # a head beside the encoder (a classifier, a decoder)
        key = key[len(prefix):]
        if key in UNUSED:
            continue
        match = HF_QKV.fullmatch(key)
        if match:
            block, part, kind = match.groups()
            qkv.setdefault((block, kind), {})[part] = value
            continue
        out[_rename(key)] = value
    for (block, kind), parts in qkv.items():
        name = f"blocks.{block}.attn.qkv.{kind}"
        if set(parts) != {"query", "key", "value"}:
            out[name + ".incomplete"] = next(iter(parts.values()))  # reported as unexpected
            continue
        out[name] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def _rename(key: str) -> str:
    for pattern, replacement in HF_RENAMES:
        renamed, count = re.subn(f"^{pattern}$", replacement, key)
        if count:
            return renamed
    return key


def position_grid(state: dict[str, Tensor], path: str) -> int:
    """Side of the square patch grid of ``state``'s position embeddings (one CLS position, then
    the patches); an ``InputError`` naming ``path`` when they are not of that shape."""
    pos = state.get("pos_embed")
    if not isinstance(pos, Tensor) or pos.dim() != 3 or pos.shape[:2] < (1, 2):
        shape = None if not isinstance(pos, Tensor) else tuple(pos.shape)
        raise InputError(f"{path}: the DINOv2 position embeddings must have shape "
                         f"(1, 1 + grid², width), got {shape}")
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise InputError(f"{path}: the DINOv2 position embeddings hold {pos.shape[1] - 1} "
                         "patch positions, not a square grid")
    return side

