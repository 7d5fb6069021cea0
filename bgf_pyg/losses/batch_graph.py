"""BatchGraphLoss: add the batch graph and BGFormer to any metric loss, in the style of
pytorch-metric-learning (PML).

BGFormer training (Wang et al., "Rethinking Batch Sample Relationships for Data Representation: A
Batch-Graph Transformer based Approach", arXiv 2211.10622, TMM 2023; loss form from the first
author's released training code, see ``docs/design.rst`` §7): trunk features f, a batch
graph on ``f.detach()``, refined tokens g = BGFormer(f, graph), and
α·L(head(f), y) + (1 − α)·L(head(g), y) with the *same* head.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from torch import Tensor, nn

from .. import defaults
from ..checks import check_features, check_labels
from ..domains import positive_int, probability
from ..graph import assemble_batch_graph, label_edges


class BatchGraphLoss(BaseMetricLossFunction):
    r"""Wrap a metric loss so that it also trains a BGFormer on the batch graph:

    .. math::
        \mathcal{L} = \alpha\, L(h(\mathbf{f}), \mathbf{y})
        + (1 - \alpha)\, L(h(\mathrm{BGFormer}(\mathbf{f}, \mathcal{G})), \mathbf{y})

    where :math:`\mathbf{f}` are the backbone's features, :math:`h` the embedding head shared by
    both terms, and :math:`\mathcal{G}` = :func:`~bgf_pyg.build_batch_graph` of the detached
    features (``k`` visual neighbours, same-label semantic edges). A ``bgformer`` whose
    ``visual_graph`` attribute is ``"attention_topk"`` (:class:`~bgf_pyg.nn.BGFormer` with its
    authors' dynamic top-K visual branch) chooses its visual neighbours itself: no kNN graph is
    built, it is called with ``visual_edge_index=None`` and the semantic edges, and ``k`` is not
    read (its K is the BGFormer's ``k``). A ``bgformer`` whose ``uses_semantic_edges`` is
    :obj:`False` (λ = 1: no semantic branch) gets no semantic edges, and none are built. At test
    time the model is ``head(trunk(x))`` alone: the wrapper is training-only.

    ``loss`` is any module called as ``loss(embeddings, labels)``: a PML loss with its own
    reducer and distance (pair- or proxy-based), :class:`~bgf_pyg.losses.ProxyGMLLoss`, or a PCE
    loss. The wrapper owns ``loss`` and ``bgformer``, so ``criterion.parameters()`` holds exactly
    what training adds to the model (BGFormer's weights and the loss's proxies, if any)::

        criterion = BatchGraphLoss(losses.MultiSimilarityLoss(), BGFormer(512), k=30, alpha=0.01)
        optimizer = torch.optim.AdamW([*model.parameters(), *criterion.parameters()])
        loss = criterion(model.trunk(images), labels, head=model.head)

    For separate learning rates, ``criterion.bgformer.parameters()`` are the graph blocks and
    ``criterion.loss.parameters()`` the proxies.

    **Reducer and distance.** The wrapper measures and reduces nothing itself: each term is
    ``loss``'s own scalar (a PML loss: its distance, e.g. cosine similarity for
    ``MultiSimilarityLoss``, and its reducer, by default the mean over the pairs, triplets or
    anchors of the batch it is given), and the result is their α-weighted sum.
    ``criterion.distance`` is ``loss``'s distance (``None`` for a loss without one); PML's
    reducer that the base class holds is not applied (the sum is already reduced).

    **Data parallel.** A BatchGraphLoss is a PML ``BaseMetricLossFunction`` called as PML calls
    a loss, ``criterion(embeddings, labels)``, so pytorch-metric-learning's
    ``DistributedLossWrapper(criterion)`` takes it, with ``head=None`` (BGFormer refines the
    embeddings; the wrapper passes no head). The batch graph must be the *global* batch's, which
    is what the wrapper's default ``efficient=False`` hands the loss (every rank's embeddings,
    its own with gradient); ``efficient=True`` passes the gathered batch as ``ref_emb``, which is
    refused. The wrapped loss is ``world_size`` × the loss of one process on the whole batch,
    so after DistributedDataParallel's averaging the model's gradients are that process's; the
    criterion's own parameters (BGFormer, proxies) get ``world_size`` × theirs (every rank's
    loss already covers the whole batch). The exact equivalent, with a head too, gathers the
    batch with gradients itself (:func:`bgf_pyg.distributed.gather_batch`, as ``bgf-train``
    does): ``criterion(*gather_batch(features, labels), head=model.head)`` is the one-process
    loss on every rank, and every gradient is the one-process gradient (``docs/design.rst``
    §13).

    The head is an argument of the call, not of the constructor, because it belongs to the model
    (it makes the test-time embedding): held by the wrapper too, it would be listed twice among
    the parameters and saved twice in checkpoints.

    Args:
        loss (nn.Module): The metric loss ``L``.
        bgformer (nn.Module): Called as ``bgformer(f, visual_edge_index, semantic_edge_index)``,
            e.g. :class:`~bgf_pyg.nn.BGFormer` of the feature width.
        k (int, optional): Visual neighbours of each sample in the kNN batch graph (clamped to
            the batch size − 1; unused with ``"attention_topk"``). (default: :obj:`30`, the
            authors' runs)
        alpha (float, optional): Weight :math:`\alpha` of the loss on the backbone features.
            (default: :obj:`0.01`, the authors' CUB and In-Shop value)
        miner (callable, optional): A PML miner; like PML's own wrappers it takes the miner at
            construction and mines each term on its own embeddings (hard pairs of
            :math:`h(\mathbf{f})` and :math:`h(\mathbf{g})` differ), passing the indices to
            ``loss(embeddings, labels, indices_tuple=...)``. Needs a loss whose ``forward``
            takes ``indices_tuple``: a PML loss, or PML's wrappers ``CrossBatchMemory`` and
            ``MultipleLosses``. (default: :obj:`None`)
        detach_graph_input (bool, optional): Feed BGFormer :math:`\mathbf{f}` detached: the
            refined term then trains BGFormer and the head only, and the backbone learns from
            :math:`\alpha\, L(h(\mathbf{f}), \mathbf{y})` alone. The paper trains end to end
            (:obj:`False`); with a label-informed semantic branch the refined term's gradient can
            work against the backbone's own loss (see the README's demo section).
            (default: :obj:`False`)

    **Shapes:** features (B, C), labels (B,), ``head``: (B, C) → (B, E) → scalar loss.
    """

    def __init__(
        self,
        loss: nn.Module,
        bgformer: nn.Module,
        k: int = defaults.K,
        alpha: float = defaults.ALPHA,
        miner: Callable | None = None,
        detach_graph_input: bool = False,
    ) -> None:
        super().__init__()
        for value, name in ((loss, "loss"), (bgformer, "bgformer")):
            if not isinstance(value, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(value).__name__}")
        if miner is not None and not _takes_indices_tuple(loss):
            raise TypeError(
                "miner needs a pytorch-metric-learning loss (one whose forward takes "
                f"indices_tuple), got loss {type(loss).__name__}"
            )
        self.bgformer = bgformer
        self.loss = loss
        self.distance = getattr(loss, "distance", None)
        self.miner = miner
        self.k = positive_int.check(k, "k")
        self.alpha = probability.check(alpha, "alpha")
        self.detach_graph_input = bool(detach_graph_input)

    def forward(
        self,
        features: Tensor,
        labels: Tensor,
        indices_tuple: tuple | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        head: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """α·L(head(features)) + (1 − α)·L(head(BGFormer(features, batch graph))).

        ``head=None`` is the identity (BGFormer then refines the embeddings themselves). The
        arguments between are PML's and must stay ``None``: the two terms are mined on their own
        embeddings (``miner``), and the batch graph needs the whole batch as ``features``, not
        queries against a reference set (``ref_emb``, ``ref_labels``).
        """
        _check_pml_arguments(indices_tuple, ref_emb, ref_labels)
        width = getattr(self.bgformer, "channels", None)
        check_features(features, "features", width=width, min_rows=1,
                       purpose="for a metric loss")
        check_labels(labels, features.size(0), "labels")
        head = head if head is not None else nn.Identity()
        # The head runs first, so a head that does not fit the features fails before BGFormer.
        emb_f = _apply_head(head, features)
        # λ = 1: no semantic branch reads semantic edges, so none are built
        semantic_labels = labels if getattr(self.bgformer, "uses_semantic_edges", True) else None
        if getattr(self.bgformer, "visual_graph", "knn") == "knn":
            graph = assemble_batch_graph(features.detach(), semantic_labels, self.k)  # checked
            visual_edge_index = graph.visual_edge_index
            semantic_edge_index = graph.semantic_edge_index
        else:  # the BGFormer picks its visual neighbours from its attention scores
            visual_edge_index = None
            semantic_edge_index = None if semantic_labels is None else label_edges(labels)
        graph_input = features.detach() if self.detach_graph_input else features
        g = self.bgformer(graph_input, visual_edge_index, semantic_edge_index)
        emb_g = _apply_head(head, g)
        return (self.alpha * self._metric_loss(emb_f, labels)
                + (1.0 - self.alpha) * self._metric_loss(emb_g, labels))

    def _metric_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self.miner is None:
            return self.loss(embeddings, labels)
        return self.loss(embeddings, labels, indices_tuple=self.miner(embeddings, labels))

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.loss.__class__.__name__}, "
                f"{self.bgformer!r}, k={self.k}, alpha={self.alpha}"
                f"{', detach_graph_input=True' if self.detach_graph_input else ''})")


def _check_pml_arguments(indices_tuple, ref_emb, ref_labels) -> None:
    """PML's ``indices_tuple``, ``ref_emb`` and ``ref_labels`` have no meaning for the wrapper."""
    if indices_tuple is not None:
        raise ValueError("indices_tuple is not taken: each term is mined on its own embeddings; "
                         "pass the miner as BatchGraphLoss(..., miner=miner)")
    for value, name in ((ref_emb, "ref_emb"), (ref_labels, "ref_labels")):
        if value is not None:
            raise ValueError(
                f"{name} is not taken: the batch graph is built on the whole batch, so it must "
                "be the features (under DistributedLossWrapper: efficient=False, its default)")


def _takes_indices_tuple(loss: nn.Module) -> bool:
    """Whether ``loss.forward`` has an ``indices_tuple`` parameter (PML's losses and wrappers)."""
    try:
        parameters = inspect.signature(loss.forward).parameters
    except (TypeError, ValueError):  # a builtin or C forward without a signature
        return False
    parameter = parameters.get("indices_tuple")
    return parameter is not None and parameter.kind != inspect.Parameter.POSITIONAL_ONLY


def _apply_head(head: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``head(x)``, with a shape mismatch reported as an error naming ``head``."""
    try:
        out = head(x)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:  # torch reports a width mismatch as a RuntimeError
        raise ValueError(
            f"head could not be applied to features of shape {tuple(x.shape)} (is it a head "
            f"taking {x.size(1)} input features on {x.device}?): {err}"
        ) from err
    if not isinstance(out, Tensor) or out.dim() != 2 or out.size(0) != x.size(0):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"head must map (N, C) features to (N, E) embeddings, got {shape}")
    return out
