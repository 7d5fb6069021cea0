"""The training methods, by name: what each trains, which options are its own and how it is
built.

Add one with its class and one registration (``METHODS.register("mine", MethodEntry(...))``):
it is then a choice of ``method`` everywhere (the configuration, ``bgf-train --method``, its
help, ``examples/cub.py``), its options apply with it and nowhere else, and the experiment
builds it, samples its batches and sets its learning rates from its entry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..checks import naming
from ..losses import LOSSES, build_metric_loss
from ..registry import Registry
from .backbones import EmbeddingNet
from .methods import BGFormerMethod, IntraBatchMethod, Method, PlainMethod, ProxyGMLMethod


@dataclass(frozen=True)
class MethodEntry:
    """What a training method is.

    Args:
        cls: the :class:`~bgf_pyg.models.Method` subclass, built as
            ``cls(backbone, loss_fn, **options)`` with ``takes_loss``, else
            ``cls(backbone, num_classes, **options)``.
        options: the configuration's options this method reads → ``cls``'s keywords (e.g.
            ``{"graph_layers": "num_layers"}``); they apply with this method only.
        takes_loss: trains with a metric loss of :data:`~bgf_pyg.losses.LOSSES` (``loss`` and
            that loss's options apply).
        balanced: trains on P×M class-balanced batches (``classes_per_batch``,
            ``samples_per_class``); else on random batches of ``batch_size``.
        graph: has a graph module (its parameters train at ``graph_lr``).
        proxies: has proxies of its own (trained at ``proxy_lr``).
        positive_pairs: what of the method itself needs positive pairs, so at least 2 samples
            of a class in a batch (e.g. ``"BGFormer's semantic edges"``); ``None``: nothing.
        knn_k: the k of the kNN graph over the global batch the method builds, from a
            configuration (``None``: none), which the batch must exceed.
        defaults: its defaults of options shared with other methods (e.g. a ResNet pooling).
            Its options whose configuration default is ``None`` default to ``cls``'s own.
        demo_defaults: its settings on the embedded demo set, over the demo's.
    """

    cls: type[Method]
    options: Mapping[str, str] = field(default_factory=dict)
    takes_loss: bool = False
    balanced: bool = True
    graph: bool = False
    proxies: bool = False
    positive_pairs: str | None = None
    knn_k: Callable[[Any], int | None] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    demo_defaults: Mapping[str, Any] = field(default_factory=dict)

    def constructor_default(self, option: str) -> Any:
        """The default of ``cls``'s keyword for ``option`` (``inspect.Parameter.empty`` when
        it has none)."""
        return inspect.signature(self.cls).parameters[self.options[option]].default


def _bgformer_knn_k(config: Any) -> int | None:
    return None if config.visual_graph == "attention_topk" else config.k


#: Every training method; ``bgformer`` is the default.
METHODS: Registry[MethodEntry] = Registry("method")
METHODS.register("plain", MethodEntry(PlainMethod, takes_loss=True))
METHODS.register("bgformer", MethodEntry(
    BGFormerMethod,
    options={"k": "k", "alpha": "alpha", "lam": "lam", "semantic_branch": "semantic_branch",
             "visual_graph": "visual_graph", "detach_graph_input": "detach_graph_input",
             "graph_dim": "graph_dim", "graph_layers": "num_layers", "graph_heads": "heads"},
    takes_loss=True, graph=True, positive_pairs="BGFormer's semantic edges",
    knn_k=_bgformer_knn_k,
    demo_defaults={"lam": 1.0, "alpha": 0.9, "k": 10, "loss": LOSSES.default}),
    default=True)
METHODS.register("intra-batch", MethodEntry(
    IntraBatchMethod,
    options={"temperature": "temperature", "mpn_cat": "cat", "graph_layers": "num_layers",
             "graph_heads": "heads"},
    graph=True, defaults={"pooling": "max"}, demo_defaults={"graph_layers": 1}))
METHODS.register("proxygml", MethodEntry(
    ProxyGMLMethod,
    options={"proxies_per_class": "proxies_per_class", "proxygml_r": "r",
             "proxygml_lambda": "weight_lambda"},
    balanced=False, proxies=True, demo_defaults={"proxies_per_class": 4}))


def build_method(
    name: str,
    backbone: EmbeddingNet,
    num_classes: int | None = None,
    *,
    loss: str | None = None,
    samples_per_class: int | None = None,
    loss_options: Mapping | None = None,
    **hparams,
) -> Method:
    """The registered method ``name`` (:data:`METHODS`) around ``backbone``.

    Args:
        name: method name.
        backbone: the :class:`EmbeddingNet` to train.
        num_classes: training classes (needed by a method without a metric loss and by a
            proxy-based loss).
        loss: metric loss of a method that takes one (see :data:`~bgf_pyg.losses.LOSSES`;
            default: its default).
        samples_per_class: samples of each class in a batch (``None``: not class-balanced). A
            pair loss or a method's own pairs with 1 sample per class → ``ValueError``.
        loss_options: keyword arguments of the loss (``pce``'s ``temperature``, ``space``, ...).
        **hparams: keyword arguments of the method's class (e.g. ``k``, ``alpha``,
            ``temperature``, ``proxies_per_class``).
    """
    entry = METHODS[name]
    loss = LOSSES.default if loss is None else loss
    if not entry.takes_loss and num_classes is None:
        raise ValueError(f"method {name!r} needs num_classes")
    pairs = entry.positive_pairs or (f"the {loss!r} pair loss"
                                     if entry.takes_loss and LOSSES[loss].pairs else None)
    if samples_per_class == 1 and pairs is not None:
        proxy_based = (*LOSSES.names(proxies=True), *METHODS.names(proxies=True))
        raise naming(ValueError(
            f"samples_per_class=1 leaves no positive pairs for {pairs}; use >= 2 samples per "
            f"class or a proxy-based loss/method ({', '.join(proxy_based)})"
        ), "samples_per_class")
    if not entry.takes_loss:
        return entry.cls(backbone, num_classes, **hparams)
    loss_fn = build_metric_loss(loss, num_classes, backbone.embedding_dim, samples_per_class,
                                **(loss_options or {}))
    return entry.cls(backbone, loss_fn, **hparams)
