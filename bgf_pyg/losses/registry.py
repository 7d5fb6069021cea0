"""The metric losses of ``plain`` and ``bgformer``, by name: what each needs and how it is built.

Add one with one registration (``LOSSES.register("mine", LossEntry(MyLoss, ...))``): it is then a
choice of ``loss`` everywhere (the configuration, ``bgf-train --loss``, its help), and the
options it declares apply with it and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pytorch_metric_learning import losses as pml_losses
from torch import nn

from ..registry import Registry
from .pce import PairwiseCrossEntropyLoss


@dataclass(frozen=True)
class LossEntry:
    """What a metric loss is.

    Args:
        factory: builds the loss module: ``factory(num_classes, embedding_dim, **options)``
            with ``proxies``, ``factory(samples_per_class, **options)`` with ``balanced``,
            ``factory(**options)`` otherwise.
        options: the configuration's options this loss reads → ``factory``'s keywords (e.g.
            ``{"hyp_c": "c"}``); they apply with this loss only.
        proxies: proxy-based: needs the number of classes, and its proxies train at
            ``proxy_lr``.
        balanced: needs P×M class-balanced batches and their M (``samples_per_class``).
        pairs: pairs samples of a class, so a batch needs at least 2 samples per class.
        two_classes: refuses a batch of one class (a pair loss of pytorch-metric-learning would
            silently return 0 on it).
    """

    factory: Callable[..., nn.Module]
    options: Mapping[str, str] = field(default_factory=dict)
    proxies: bool = False
    balanced: bool = False
    pairs: bool = False
    two_classes: bool = False


#: Every metric loss; ``multi_similarity`` is the default.
LOSSES: Registry[LossEntry] = Registry("loss")
LOSSES.register("multi_similarity", LossEntry(pml_losses.MultiSimilarityLoss, pairs=True,
                                              two_classes=True), default=True)
LOSSES.register("contrastive", LossEntry(pml_losses.ContrastiveLoss, pairs=True, two_classes=True))
LOSSES.register("triplet", LossEntry(pml_losses.TripletMarginLoss, pairs=True, two_classes=True))
LOSSES.register("proxy_anchor", LossEntry(pml_losses.ProxyAnchorLoss, proxies=True))
LOSSES.register("normalized_softmax", LossEntry(pml_losses.NormalizedSoftmaxLoss, proxies=True))
#: Hyp-ViT's pairwise cross-entropy (BGFormer's authors' loss): needs P×m class-balanced batches.
LOSSES.register("pce", LossEntry(
    PairwiseCrossEntropyLoss, options={"pce_space": "space", "hyp_c": "c", "clip_r": "clip_r",
                                       "temperature": "temperature"},
    balanced=True, pairs=True))


def build_metric_loss(
    name: str,
    num_classes: int | None,
    embedding_dim: int,
    samples_per_class: int | None = None,
    **options,
) -> nn.Module:
    """The registered loss ``name`` (:data:`LOSSES`): a proxy-based one needs ``num_classes``,
    a class-balanced one ``samples_per_class``; ``options`` are its factory's keywords (one it
    does not declare is a ``ValueError``, never dropped)."""
    entry = LOSSES[name]
    unknown = sorted(set(options) - set(entry.options.values()))
    if unknown:
        raise ValueError(f"loss {name!r} takes no option(s) {', '.join(unknown)}; its options: "
                         f"{', '.join(entry.options.values()) or 'none'}")
    if entry.balanced:
        if samples_per_class is None:
            raise ValueError(f"the {name!r} loss needs class-balanced batches: give "
                             "samples_per_class")
        return entry.factory(samples_per_class, **options)
    if entry.proxies:
        if num_classes is None:
            raise ValueError(f"loss {name!r} is proxy-based and needs num_classes")
        return entry.factory(num_classes, embedding_dim, **options)
    return entry.factory(**options)


def refuses_one_class(loss_fn: nn.Module) -> bool:
    """Whether ``loss_fn`` is a registered loss that needs two classes in a batch."""
    return any(isinstance(loss_fn, entry.factory) for _, entry in LOSSES.items()
               if entry.two_classes and isinstance(entry.factory, type))
