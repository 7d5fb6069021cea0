"""The batch graph: a mini-batch of embeddings as a PyG graph with visual and semantic edges."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch_geometric.data import Data

from . import defaults
from .checks import check_edge_index, check_features, check_labels
from .domains import positive_int
from .knn import cosine_topk


class BatchGraph(Data):
    r"""A mini-batch as a graph with two edge sets (BGFormer, Wang et al., arXiv 2211.10622).

    Attributes:
        x (Tensor): node features (the batch's embeddings), shape (N, D).
        y (Tensor, optional): labels, shape (N,).
        visual_edge_index (Tensor): (2, E_vis) kNN edges j→i (row 0 = source j, row 1 = target i).
        visual_edge_weight (Tensor): (E_vis,) cosine similarity of each visual edge.
        semantic_edge_index (Tensor): (2, E_sem) edges j→i between samples with the same label.

    Every argument may be ``None``, as PyG's :class:`~torch_geometric.data.Batch` requires. Both
    edge sets are offset by the node count when graphs are batched (their names contain "index").
    ``num_edges`` of a plain :class:`Data` would only count one set, so use :attr:`num_visual_edges`
    and :attr:`num_semantic_edges`.
    """

    def __init__(
        self,
        x: Tensor | None = None,
        y: Tensor | None = None,
        visual_edge_index: Tensor | None = None,
        visual_edge_weight: Tensor | None = None,
        semantic_edge_index: Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            x=x,
            y=y,
            visual_edge_index=visual_edge_index,
            visual_edge_weight=visual_edge_weight,
            semantic_edge_index=semantic_edge_index,
            **kwargs,
        )

    @property
    def num_visual_edges(self) -> int:
        ei = self.get("visual_edge_index")
        return 0 if ei is None else ei.size(1)

    @property
    def num_semantic_edges(self) -> int:
        ei = self.get("semantic_edge_index")
        return 0 if ei is None else ei.size(1)

    def validate(self, raise_on_error: bool = True) -> bool:
        """Check shapes and index ranges of both edge sets (``Data.validate`` only knows
        ``edge_index``)."""
        try:
            num_nodes = self.num_nodes or 0
            for key in ("visual_edge_index", "semantic_edge_index"):
                if self.get(key) is not None:
                    check_edge_index(self[key], num_nodes, name=key)
            weight = self.get("visual_edge_weight")
            if weight is not None and weight.numel() != self.num_visual_edges:
                raise ValueError(
                    f"visual_edge_weight must have {self.num_visual_edges} entries (one per "
                    f"visual edge), got {weight.numel()}"
                )
        except (TypeError, ValueError):
            if raise_on_error:
                raise
            return False
        return True


def knn_edges(
    x: Tensor, k: int, *, loop: bool = False, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Cosine kNN edges: for every node i, edges j→i from its ``k`` most similar other nodes.

    ``k`` is clamped to N − 1 (the complete graph; no edge for N ≤ 1). With ``loop=True`` each
    node also gets i→i (weight 1) as its first in-edge. Edges are sorted by target, so every
    target's in-edges are contiguous and all in-degrees equal. Returns ``(edge_index (2, E),
    edge_weight (E,))``, the weights in ``x``'s dtype.
    """
    num_nodes = x.size(0)
    k = min(k, max(num_nodes - 1, 0))
    sim, source = cosine_topk(x, k=k, exclude_self=True, chunk_size=chunk_size)
    if loop:
        self_index = torch.arange(num_nodes, device=x.device).view(-1, 1)
        source = torch.cat([self_index, source], dim=1)
        sim = torch.cat([sim.new_ones(num_nodes, 1), sim], dim=1)
    degree = source.size(1)
    target = torch.arange(num_nodes, device=x.device).repeat_interleave(degree)
    return torch.stack([source.reshape(-1), target]), sim.reshape(-1).to(x.dtype)


def label_edges(y: Tensor, *, loop: bool = False) -> Tensor:
    """Edges j→i for every pair with ``y[j] == y[i]`` (j ≠ i unless ``loop``), sorted by target.

    Built group by group from a sort of the labels, so memory is O(#edges), never O(N²).
    """
    num_nodes = y.numel()
    device = y.device
    order = torch.argsort(y, stable=True)
    _, counts = torch.unique_consecutive(y[order], return_counts=True)
    group_start = torch.cumsum(counts, 0) - counts
    # For every sorted position: the start and size of its label group.
    start_of = group_start.repeat_interleave(counts)
    size_of = counts.repeat_interleave(counts)
    target_pos = torch.arange(num_nodes, device=device).repeat_interleave(size_of)
    first_pair = torch.cumsum(size_of, 0) - size_of
    offset = torch.arange(target_pos.numel(), device=device) - first_pair.repeat_interleave(size_of)
    source_pos = start_of.repeat_interleave(size_of) + offset
    source, target = order[source_pos], order[target_pos]
    if not loop:
        keep = source != target
        source, target = source[keep], target[keep]
    perm = torch.argsort(target * num_nodes + source)
    return torch.stack([source[perm], target[perm]])


def build_batch_graph(
    x: Tensor,
    y: Tensor | None = None,
    k: int = defaults.K,
    *,
    loop: bool = False,
    chunk_size: int | None = None,
) -> BatchGraph:
    r"""Turn a batch of embeddings into a :class:`BatchGraph`.

    Visual edges: for every node i, edges j→i from its ``k`` most cosine-similar other nodes, so
    every target has in-degree k (``visual_edge_weight`` holds the similarities). ``k`` ≥ N is not
    an error: it gives the complete graph, k = N − 1 (a single node has no visual edge, an empty
    batch gives an empty graph). Ties are broken towards the lower node index. Similarities are
    computed in float32 (float64 stays), so half-precision input gives the same graph; a zero row
    has cosine 0 to every node (see :mod:`bgf_pyg.knn`).
    Semantic edges: j→i for every j ≠ i with ``y[j] == y[i]``; empty when ``y`` is ``None``.
    ``loop=True`` adds i→i to both sets, so convolutions can run with ``add_self_loops=False``
    (which keeps ``torch.compile`` graphs unbroken).

    The kNN search runs in row chunks of ``chunk_size`` nodes (default: 64 Mi similarities at a
    time), so N = 10⁵ never needs an N×N matrix. The graph is built without gradient: it is the
    structure, not part of the model.
    """
    check_features(x, "x")
    positive_int.check(k, "k")
    if y is not None:
        check_labels(y, x.size(0), "y")
    return assemble_batch_graph(x, y, k, loop=loop, chunk_size=chunk_size)


def assemble_batch_graph(
    x: Tensor,
    y: Tensor | None,
    k: int,
    *,
    loop: bool = False,
    chunk_size: int | None = None,
) -> BatchGraph:
    """:func:`build_batch_graph` for inputs the caller has already checked (a training step's
    features and labels, checked once under the caller's own argument names)."""
    visual_edge_index, visual_edge_weight = knn_edges(
        x.detach(), k, loop=loop, chunk_size=chunk_size
    )
    if y is None:
        semantic_edge_index = torch.empty(2, 0, dtype=torch.long, device=x.device)
    else:
        semantic_edge_index = label_edges(y, loop=loop)
    return BatchGraph(
        x=x,
        y=y,
        visual_edge_index=visual_edge_index,
        visual_edge_weight=visual_edge_weight,
        semantic_edge_index=semantic_edge_index,
    )
