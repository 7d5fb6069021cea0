"""A pretrained trunk cut in two: a frozen prefix, whose output is computed once per image and
cached, and a trainable tail that runs from that output every step (``train_tail``).

:func:`tail_trunk` cuts the trunk of a backbone into a :class:`TailTrunk`:

- EfficientNet-Lite0 (:class:`EfficientNetTail`) by MBConv stages: ``cut`` = the number of
  trailing MBConv stages that train (1 to :data:`EFFICIENTNET_TAIL_DEPTH`), with the 1×1 head
  convolution; the prefix is the stem and the stages before.
- a timm ``VisionTransformer`` (:class:`ViTTail`) by blocks: ``cut`` = the number of trailing
  blocks that train (1 to ``len(blocks)``), with the final norm and the pooling of the CLS token;
  the prefix is the patch embedding, the position embedding (and CLS / register tokens) and the
  blocks before.

The whole trunk stays one module (:attr:`TailTrunk.network`, its state dict under
``network.``), so ``network(images) == tail(prefix(images))`` and the test-time network is the
full backbone with the trained tail weights. The prefix's parameters never train and its
modules (BatchNorm, dropout, drop connect) stay in eval mode whatever ``train()`` says; the
tail's train as any module's.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ..checks import naming
from .efficientnet import NUM_STAGES, EfficientNetLite0Trunk
from .vit import VIT_ARCHITECTURES, import_timm

#: EfficientNet-Lite0's MBConv stages: the cuts of its tail (the stem and head are not cuts).
EFFICIENTNET_TAIL_DEPTH = NUM_STAGES - 2
#: What a cut counts: EfficientNet-Lite0's stages, a ViT's blocks.
EFFICIENTNET_UNIT, VIT_UNIT = "MBConv stages", "blocks"
#: The attributes of timm's ``VisionTransformer`` that :class:`ViTTail` uses.
VIT_ATTRIBUTES = ("patch_embed", "_pos_embed", "pos_drop", "patch_drop", "norm_pre", "blocks",
                  "norm", "forward_head", "cls_token", "pos_embed")


class Prefix(nn.Module):
    """The frozen prefix of a :class:`TailTrunk` as a module of its own, for the prefix cache:
    ``forward(images)`` is the tensor the tail reads, and its state dict holds the prefix's
    weights alone (what the cache's key hashes). Always in eval mode."""

    def __init__(self, trunk: TailTrunk) -> None:
        super().__init__()
        self.parts = nn.ModuleList(trunk.prefix_modules())
        self.tokens = nn.ParameterList(trunk.prefix_parameters())
        self.run = trunk.prefix  # a bound method: the trunk is not registered here
        super().train(False)

    def train(self, mode: bool = True) -> Prefix:
        return self  # never trains, even when the feature cache restores the mode it found

    def forward(self, images: Tensor) -> Tensor:
        return self.run(images)


class TailTrunk(nn.Module):
    """A trunk (images → pooled features) cut after its frozen prefix: :meth:`prefix` maps
    images to the tensor that is cached, ``forward`` maps that tensor through the tail to the
    pooled features. Subclasses say where the cut lies.

    Args:
        network: the whole trunk, pretrained.
        cut: the number of trailing stages or blocks that train (1 to :attr:`depth`).
    """

    #: What a cut counts, in words.
    unit: str

    def __init__(self, network: nn.Module, cut: int) -> None:
        super().__init__()
        self.network = network
        depth = self.depth
        if isinstance(cut, bool) or not isinstance(cut, int) or not 1 <= cut <= depth:
            raise naming(ValueError(f"train_tail must be an integer in [1, {depth}] (the "
                                    f"{self.unit} of {type(network).__name__}), got {cut!r}"),
                         "train_tail")
        self.cut = cut
        for module in self.prefix_modules():
            module.requires_grad_(False)
        for parameter in self.prefix_parameters():
            parameter.requires_grad_(False)
        self.train(self.training)

    @property
    def depth(self) -> int:
        """The largest cut: every stage or block trains."""
        raise NotImplementedError

    def prefix_modules(self) -> list[nn.Module]:
        """The modules of the frozen prefix."""
        raise NotImplementedError

    def prefix_parameters(self) -> list[nn.Parameter]:
        """Parameters of the prefix held by ``network`` itself, outside any module of
        :meth:`prefix_modules` (a ViT's CLS token and position embedding)."""
        return []

    def prefix(self, images: Tensor) -> Tensor:
        """The prefix's output for (B, 3, H, W) ``images``: what the tail reads."""
        raise NotImplementedError

    def prefix_module(self) -> Prefix:
        """The prefix as a module (for :func:`~bgf_pyg.data.features.cached_features`)."""
        return Prefix(self)

    def train(self, mode: bool = True) -> TailTrunk:
        super().train(mode)
        for module in self.prefix_modules():
            module.eval()
        return self


class EfficientNetTail(TailTrunk):
    """:class:`TailTrunk` of :class:`~bgf_pyg.models.efficientnet.EfficientNetLite0Trunk`: the
    last ``cut`` MBConv stages and the head convolution train, from the input of the first of
    them (at 96 px and ``cut=1``: 192 × 3 × 3 per image). Each block keeps the drop-connect
    rate it has in the whole network."""

    network: EfficientNetLite0Trunk
    unit = EFFICIENTNET_UNIT

    @property
    def depth(self) -> int:
        return EFFICIENTNET_TAIL_DEPTH

    @property
    def first_tail_block(self) -> int:
        """Index in ``net._blocks`` of the first block that trains."""
        mbconv = self.network.stages()[1:-1]
        return sum(len(stage) for stage in mbconv[:len(mbconv) - self.cut])

    def prefix_modules(self) -> list[nn.Module]:
        net = self.network.net
        return [net._conv_stem, net._bn0, *net._blocks[:self.first_tail_block]]

    def _blocks(self, x: Tensor, indices: range) -> Tensor:
        # as EfficientNet.extract_features: block i's drop-connect rate is rate · i / blocks
        net = self.network.net
        for i in indices:
            rate = net._global_params.drop_connect_rate
            x = net._blocks[i](x, drop_connect_rate=rate * (i / len(net._blocks)) if rate else rate)
        return x

    def prefix(self, images: Tensor) -> Tensor:
        net = self.network.net
        x = net._swish(net._bn0(net._conv_stem(images)))
        return self._blocks(x, range(self.first_tail_block))

    def forward(self, x: Tensor) -> Tensor:
        net = self.network.net
        x = self._blocks(x, range(self.first_tail_block, len(net._blocks)))
        return net._swish(net._bn1(net._conv_head(x))).mean(dim=(2, 3))


class ViTTail(TailTrunk):
    """:class:`TailTrunk` of a timm ``VisionTransformer`` (``num_classes=0``): its last ``cut``
    blocks, the final norm and the head's pooling (the CLS token) train, from the token sequence
    entering the first of them ((1 + patches) × width per image: 50 × 384 for ViT-S/14 at
    98 px)."""

    unit = VIT_UNIT

    @property
    def depth(self) -> int:
        return len(self.network.blocks)

    @property
    def first_tail_block(self) -> int:
        return self.depth - self.cut

    def prefix_modules(self) -> list[nn.Module]:
        vit = self.network
        return [vit.patch_embed, vit.pos_drop, vit.patch_drop, vit.norm_pre,
                *vit.blocks[:self.first_tail_block]]

    def prefix_parameters(self) -> list[nn.Parameter]:
        vit = self.network
        tokens = (vit.cls_token, getattr(vit, "reg_token", None), vit.pos_embed)
        return [p for p in tokens if p is not None]

    def prefix(self, images: Tensor) -> Tensor:
        vit = self.network
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for block in vit.blocks[:self.first_tail_block]:
            x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        vit = self.network
        for block in vit.blocks[self.first_tail_block:]:
            x = block(x)
        return vit.forward_head(vit.norm(x))


def tail_trunk(trunk: nn.Module, cut: int) -> TailTrunk:
    """``trunk`` cut so that its last ``cut`` EfficientNet-Lite0 MBConv stages or ViT blocks
    train (see :mod:`bgf_pyg.models.tail`); a ``ValueError`` naming ``train_tail`` for a trunk
    with neither, or a cut past its depth."""
    if isinstance(trunk, EfficientNetLite0Trunk):
        return EfficientNetTail(trunk, cut)
    if all(hasattr(trunk, name) for name in VIT_ATTRIBUTES):
        return ViTTail(trunk, cut)
    raise naming(ValueError(f"train_tail cuts a backbone into stages (efficientnet_lite0) or "
                            f"blocks (a timm VisionTransformer); {type(trunk).__name__} has "
                            "neither"), "train_tail")


def efficientnet_tail_depth(name: str) -> tuple[int, str]:
    """The largest ``train_tail`` of EfficientNet-Lite0 (backbone ``name``) and what it counts."""
    return EFFICIENTNET_TAIL_DEPTH, EFFICIENTNET_UNIT


@functools.cache
def vit_tail_depth(name: str) -> tuple[int, str]:
    """The largest ``train_tail`` of the ViT backbone ``name`` and what it counts: its timm
    architecture is built on the meta device to count its blocks (no memory, no weights)."""
    with torch.device("meta"):
        model = import_timm().create_model(VIT_ARCHITECTURES[name], num_classes=0)
    return len(model.blocks), VIT_UNIT
