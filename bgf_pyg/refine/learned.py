"""The trained BGFormer at test time: its visual branch on the test set's kNN graph, then the head.

This is the refined term of training (:class:`~bgf_pyg.losses.BatchGraphLoss`) without labels:
the kNN graph of the backbone features (``k`` neighbours, no semantic edges, so
:class:`~bgf_pyg.nn.bgformer.DualSSA` runs its visual branch alone), BGFormer (between its
projections when the model was trained with ``graph_dim``: a
:class:`~bgf_pyg.nn.projection.ProjectedGraph`), the model's head, L2-normalised. On CPU the
attention runs as sparse-matrix products over the edges (its ``attention_path="auto"`` takes the
dense form only for small sets), never as an N × N matrix.

Only the cosine kNN visual graph is supported (a BGFormer whose ``visual_graph`` is another form
is refused). ``GraphNorm`` normalises over the whole set, so the refinement of an item depends on
the set it is refined in; an inductive query is normalised with the gallery's statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from ..checks import check_features
from ..domains import positive_int
from ..knn import normalize_rows
from ..models.methods import BGFormerMethod
from ..nn.bgformer import BGFormer
from ..nn.projection import ProjectedGraph
from .common import Neighbors, RefinedGallery, check_k, check_setting, first_neighbors


def _normalize_like(norm: nn.Module, x: Tensor, reference: Tensor) -> Tensor:
    """PyG ``GraphNorm`` of the rows ``x`` with the mean and variance of ``reference`` (the
    gallery's rows at the same point of the layer), so a query does not change them."""
    mean = reference.mean(dim=0, keepdim=True) * norm.mean_scale
    var = (reference - mean).pow(2).mean(dim=0, keepdim=True)
    return norm.weight * (x - mean) / (var + norm.eps).sqrt() + norm.bias


@contextlib.contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode (no dropout) inside the block, its own mode restored after."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


def _knn_edges(index: Tensor, offset: int = 0) -> Tensor:
    """(2, Q·k) edges j → i from (Q, k) source lists, targets numbered from ``offset``."""
    rows, k = index.shape
    target = torch.arange(offset, offset + rows, device=index.device).repeat_interleave(k)
    return torch.stack([index.reshape(-1), target])


def check_trained_bgformer(method: nn.Module) -> None:
    """Refuse a model the learned refinement cannot run on: it runs the BGFormer of a trained
    :class:`~bgf_pyg.models.BGFormerMethod`. A ``ValueError`` naming ``method`` otherwise."""
    if not isinstance(method, BGFormerMethod):
        raise ValueError(f"method must be a BGFormerMethod (the learned refinement needs a "
                         f"trained BGFormer), got {type(method).__name__}")


class BGFormerRefinement:
    """The learned refinement: ``normalise(head(BGFormer(f, kNN graph of f)))``.

    Args:
        bgformer (BGFormer or ProjectedGraph): The trained model (its ``visual_graph`` must be
            the kNN form), or a :class:`~bgf_pyg.nn.projection.ProjectedGraph` around one (a model
            trained with ``graph_dim``): the features are projected into it and out of it, and
            the kNN graph is the features' own, as in training.
        head (callable, optional): The embedding head applied after it (``None``: identity).
        k (int): Neighbours of each item in the graph (training used the method's ``k``).

    :meth:`from_method` takes all three from a trained
    :class:`~bgf_pyg.models.methods.BGFormerMethod`. Labels are never read.
    """

    name = "bgformer"

    def __init__(self, bgformer: BGFormer | ProjectedGraph,
                 head: Callable[[Tensor], Tensor] | None, k: int) -> None:
        projected = bgformer if isinstance(bgformer, ProjectedGraph) else None
        inner = projected.graph if projected is not None else bgformer
        if not isinstance(inner, BGFormer):
            raise TypeError(f"bgformer must be a BGFormer or a ProjectedGraph around one, got "
                            f"{type(bgformer).__name__}"
                            + (f" around {type(inner).__name__}" if projected else ""))
        visual_graph = getattr(inner, "visual_graph", "knn")
        if visual_graph != "knn":
            raise ValueError(f"bgformer has visual_graph={visual_graph!r}; the learned "
                             "refinement supports the cosine kNN visual graph ('knn') only")
        self.model = bgformer
        self.bgformer = inner
        self.project_in = projected.lin_in if projected is not None else nn.Identity()
        self.project_out = projected.lin_out if projected is not None else nn.Identity()
        self.channels = bgformer.channels
        self.head = head if head is not None else nn.Identity()
        self.k = positive_int.check(k, "k")

    @classmethod
    def from_method(cls, method: nn.Module, k: int | None = None) -> BGFormerRefinement:
        """The refinement of a trained ``BGFormerMethod`` (``k``: default the method's own)."""
        check_trained_bgformer(method)
        return cls(method.bgformer, method.backbone.head, method.visual_k if k is None else k)

    def _embed(self, x: Tensor) -> Tensor:
        emb = self.head(self.project_out(x))
        return normalize_rows(emb, dtype=emb.dtype)

    def refine(self, features: Tensor, *, neighbors: Neighbors | None = None,
               chunk_size: int | None = None) -> Tensor:
        """Refined (N, E) unit embeddings of the set whose backbone features are ``features``."""
        return self.refine_gallery(features, neighbors=neighbors,
                                   chunk_size=chunk_size).embeddings

    @torch.no_grad()
    def refine_gallery(self, features: Tensor, *, neighbors: Neighbors | None = None,
                       chunk_size: int | None = None) -> RefinedGallery:
        """:meth:`refine`, keeping each layer's input and mid-layer state (what its two
        ``GraphNorm`` saw) for :meth:`refine_queries`, after the features themselves (what a
        query searches). ``neighbors``: a self-excluded search of ``features`` at least ``k``
        deep, if already run."""
        check_features(features, "features", width=self.channels, min_rows=2,
                       purpose="to refine")
        check_k(self.k, features.size(0) - 1)
        _, index = first_neighbors(neighbors, features, None, self.k, chunk_size)
        states: list[Tensor] = [features]

        def record(_module: nn.Module, args: tuple) -> None:
            states.append(args[0])

        hooks = [norm.register_forward_pre_hook(record)
                 for layer in self.bgformer.layers for norm in (layer.norm1, layer.norm2)]
        try:
            with _evaluating(self.bgformer):
                refined = self.bgformer(self.project_in(features), _knn_edges(index))
        finally:
            for hook in hooks:
                hook.remove()
        return RefinedGallery(self._embed(refined), states, self.setting)

    @torch.no_grad()
    def refine_queries(self, features: Tensor, gallery: RefinedGallery, *,
                       neighbors: Neighbors | None = None,
                       chunk_size: int | None = None) -> Tensor:
        """Inductive form: each query (backbone features, Q × C) refined against ``gallery``
        (from :meth:`refine_gallery`), which stays unchanged: in every layer the query attends to
        itself and to its ``k`` nearest gallery items (by cosine of the features) in that layer's
        gallery states, and is normalised with the gallery's statistics. ``neighbors``: the
        (Q, ≥ k) query → gallery lists, if already searched."""
        gallery_features, *layer_states = gallery.states
        check_features(features, "features", width=gallery_features.size(1), min_rows=1,
                       purpose="to refine")
        num_gallery = gallery_features.size(0)
        check_k(self.k, num_gallery, "the gallery")
        if len(layer_states) != 2 * len(self.bgformer.layers):
            raise ValueError("gallery was not refined by this model (it holds "
                             f"{len(gallery.states)} states, the model needs "
                             f"{1 + 2 * len(self.bgformer.layers)})")
        check_setting(gallery, self.setting)
        _, index = first_neighbors(neighbors, features, gallery_features, self.k, chunk_size)
        edges = _knn_edges(index, offset=num_gallery)
        x = self.project_in(features)
        with _evaluating(self.bgformer):
            for layer, before, middle in zip(self.bgformer.layers, layer_states[::2],
                                             layer_states[1::2], strict=True):
                # Gallery rows first (their own GraphNorm), then the queries (the gallery's
                # statistics); the gallery rows' outputs are not used.
                h = torch.cat([layer.norm1(before), _normalize_like(layer.norm1, x, before)])
                x = x + layer.dropout(layer.attn(h, edges)[num_gallery:])
                x = x + layer.dropout(layer.ffn(_normalize_like(layer.norm2, x, middle)))
        return self._embed(x)

    @property
    def setting(self) -> tuple:
        """What a refined gallery's states depend on: the model (by identity) and k."""
        return (self.name, ("model", f"{type(self.model).__name__} at {id(self.model):#x}"),
                ("k", self.k))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.model!r}, k={self.k})"
