"""The backbones, by name: what each is, and building one with an embedding head.

Every backbone is an :class:`EmbeddingNet`: a ``trunk`` that maps images to pooled features and a
``head`` Linear(``feature_dim``, ``embedding_dim``); the embedding is ``head(trunk(images))``, at
training and test time alike. The method wrappers (:mod:`bgf_pyg.models.methods`) use the parts
separately (BGFormer refines the features ``trunk(images)`` before the head); a graph module
narrower than the trunk projects on its own side (``docs/design.rst`` §17).

Each trunk's code is in a module of its own (:mod:`~bgf_pyg.models.resnet`,
:mod:`~bgf_pyg.models.smallcnn`, :mod:`~bgf_pyg.models.vit`,
:mod:`~bgf_pyg.models.efficientnet`). Add a backbone with its trunk function and one
registration (``BACKBONES.register("mine", BackboneEntry(my_trunk, options={...}))``): it is
then a choice of ``backbone`` everywhere (the configuration, ``bgf-train --backbone``, its
help), the options it declares (``pretrained``, its pooling, ``trainable_stages``) apply with
it and nowhere else, and the experiment builds it, normalises its inputs, checks its extra and
trains its tail from its entry. Weights are only ever read from a local file (no download).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..checks import naming
from ..data.transforms import HALF_MEAN_STD, IMAGENET_MEAN, IMAGENET_STD
from ..domains import positive_int
from ..registry import Registry
from .efficientnet import efficientnet_trunk, import_efficientnet
from .resnet import resnet_trunk
from .smallcnn import smallcnn_trunk
from .tail import efficientnet_tail_depth, vit_tail_depth
from .vit import import_timm, vit_trunk

#: Input (mean, std) of a weight family.
Normalization = tuple[tuple[float, ...], tuple[float, ...]]
IMAGENET: Normalization = (IMAGENET_MEAN, IMAGENET_STD)


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


@dataclass(frozen=True)
class BackboneEntry:
    """What a backbone is.

    Args:
        trunk: builds its trunk: ``trunk(name, **keywords)`` → (a module mapping (B, C, H, W)
            images to (B, width) pooled features, width), the ``keywords`` read per
            ``options``.
        options: the parameters of :func:`build_backbone` it reads → ``trunk``'s keywords:
            ``pretrained`` (it loads a weights file), its pooling (``pooling``: a ResNet's
            avg / max; ``vit_pooling``: a ViT's cls / cls+mean), ``trainable_stages``,
            ``image_size``, ``in_channels`` (the dataset's channels). The configuration's
            ``pretrained``, ``pooling``, ``vit_pooling`` and ``trainable_stages`` apply with it
            only when it reads them.
        normalization: the input (mean, std) of its weights' family (default: ImageNet's).
        packaged_weights: without a ``pretrained`` file it starts from the weights of an
            installed package, not from random ones.
        extra: raises an :class:`~bgf_pyg.checks.InputError` naming the pip extra it needs when
            that is not installed (``None``: none needed).
        tail: ``tail(name)`` → (the largest ``train_tail``, what a cut counts: ``"MBConv
            stages"``, ``"blocks"``) of a trunk :func:`~bgf_pyg.models.tail.tail_trunk` cuts
            (``None``: it has no tail to train).
    """

    trunk: Callable[..., tuple[nn.Module, int]]
    options: Mapping[str, str] = field(default_factory=dict)
    normalization: Normalization = IMAGENET
    packaged_weights: bool = False
    extra: Callable[[], object] | None = None
    tail: Callable[[str], tuple[int, str]] | None = None

    @property
    def trains_tail(self) -> bool:
        """Whether ``train_tail`` applies: it has a tail to train."""
        return self.tail is not None


def _vit(normalization: Normalization = IMAGENET) -> BackboneEntry:
    """A timm ViT (:mod:`~bgf_pyg.models.vit`: any of its weights files, its two features, its
    blocks a tail) of a weight family normalised by ``normalization``."""
    return BackboneEntry(
        vit_trunk, {"pretrained": "pretrained", "image_size": "image_size",
                    "vit_pooling": "pooling"},
        normalization, extra=import_timm, tail=vit_tail_depth)


_RESNET = BackboneEntry(resnet_trunk, {"pretrained": "pretrained", "pooling": "pooling"})

#: Every backbone; ``resnet50`` is the default.
BACKBONES: Registry[BackboneEntry] = Registry("backbone")
BACKBONES.register("resnet50", _RESNET, default=True)
BACKBONES.register("resnet18", _RESNET)
BACKBONES.register("smallcnn", BackboneEntry(smallcnn_trunk, {"in_channels": "in_channels"}))
#: The ImageNet-21k ViTs were trained on [-1, 1] inputs (the authors' ``mean_std`` for ``vit*``
#: models), DINO's and DINOv2's on ImageNet's mean and std.
BACKBONES.register("vit_small_in21k", _vit(HALF_MEAN_STD))
BACKBONES.register("vit_small_dino", _vit())
BACKBONES.register("vit_base_in21k", _vit(HALF_MEAN_STD))
BACKBONES.register("vit_base_dino", _vit())
BACKBONES.register("vit_small_dinov2", _vit())
BACKBONES.register("vit_base_dinov2", _vit())
BACKBONES.register("efficientnet_lite0", BackboneEntry(
    efficientnet_trunk, {"pretrained": "pretrained", "trainable_stages": "trainable_stages"},
    packaged_weights=True, extra=import_efficientnet, tail=efficientnet_tail_depth))


def backbone_normalization(name: str) -> Normalization:
    """Input (mean, std) of backbone ``name``'s weight family (its entry's): ImageNet's
    (ResNets, DINO ViTs, EfficientNet-Lite0), or 0.5 for the ImageNet-21k ViTs."""
    return BACKBONES[name].normalization


def tail_depth(name: str) -> tuple[int, str]:
    """The largest ``train_tail`` of backbone ``name`` and what it counts (its entry's)."""
    entry = BACKBONES[name]
    if entry.tail is None:
        raise ValueError(f"backbone must be one of {', '.join(BACKBONES.names(trains_tail=True))}"
                         f", got {name!r}")
    return entry.tail(name)


#: Parameters of :func:`build_backbone` refused, at a value other than their default, by a
#: backbone that does not read them (``pooling`` is not: a method's default pooling is a
#: ResNet's, and other backbones ignore it).
REFUSED_UNREAD = {"trainable_stages": None, "vit_pooling": "cls"}


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
    """The registered backbone ``name`` (:data:`BACKBONES`) with a Linear embedding head.

    Args:
        name: backbone name.
        embedding_dim: width of the embedding head.
        pretrained: local path of a weights file: a torchvision ImageNet state dict (ResNets),
            a timm / DINO checkpoint (ViTs; DINOv2: :data:`~bgf_pyg.models.dinov2.LAYOUTS`) or
            an EfficientNet-Lite0 state dict; ``None`` means random initialisation
            (``bgf-train`` logs it), except for ``efficientnet_lite0``, whose ImageNet weights
            come from the installed weights package. A backbone that reads no file refuses one.
        pooling: ResNet global ``"avg"`` or ``"max"`` pooling (the intra-batch original: max);
            ignored by the other backbones (``smallcnn`` pools avg + max to a small grid, a
            ViT reads ``vit_pooling``).
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
    entry = BACKBONES[name]
    arguments = {"pretrained": pretrained, "pooling": pooling, "in_channels": in_channels,
                 "image_size": image_size, "trainable_stages": trainable_stages,
                 "vit_pooling": vit_pooling}
    if pretrained is not None and "pretrained" not in entry.options:
        raise naming(ValueError(f"{name} has no ImageNet weights to load from pretrained=PATH; "
                                "use a ResNet or train from scratch"), "pretrained")
    for parameter, default in REFUSED_UNREAD.items():
        if arguments[parameter] != default and parameter not in entry.options:
            readers = ", ".join(BACKBONES.declaring(parameter))
            raise ValueError(f"{parameter} applies to {readers}, not to {name!r}")
    trunk, feature_dim = entry.trunk(name, **{keyword: arguments[parameter]
                                              for parameter, keyword in entry.options.items()})
    return EmbeddingNet(trunk, feature_dim, embedding_dim)
