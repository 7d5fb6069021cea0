r"""Dynamic top-K self-attention: the visual branch of BGFormer's authors.

Read from the first author's released SGFormer module (``SissiW/DyBGR``,
``net/__pycache__/SGFormer.cpython-39.pyc``, class ``Attention_VG``): the visual graph is not
fixed per batch but chosen per head and per layer from the attention scores themselves. Every
query keeps its K highest-scoring keys of the batch (itself a candidate), the softmax runs over
those K only, and every other key gets weight 0. Nothing is symmetrised.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn.dense.linear import Linear

from .. import defaults
from ..checks import check_features, check_labels
from ..domains import dropout_rate, positive_int
from ..knn import select_with_ties

#: Default number of attention scores (heads × query rows × keys) computed at once (16 Mi).
DEFAULT_CHUNK_ELEMENTS = 1 << 24


class TopKAttention(nn.Module):
    r"""Multi-head self-attention over all node pairs, sparsified to each query's K largest
    scores:

    .. math::
        s^h_{ij} = \frac{(\mathbf{W}^h_Q \mathbf{x}_i)^{\top} \mathbf{W}^h_K \mathbf{x}_j}
        {\sqrt{d}},
        \qquad
        \alpha^h_{ij} = \begin{cases}
        \dfrac{\exp s^h_{ij}}{\sum_{l \in \mathcal{N}^h_K(i)} \exp s^h_{il}}
        & j \in \mathcal{N}^h_K(i) \\ 0 & \text{otherwise} \end{cases},
        \qquad
        \mathbf{x}'_i = \Big\Vert_{h=1}^{H} \sum_j \alpha^h_{ij}\, \mathbf{W}^h_V \mathbf{x}_j

    where :math:`\mathcal{N}^h_K(i)` holds the K largest scores of row i of head h among the
    nodes of i's graph, i itself included (all of them when K ≥ the graph's size: full
    attention). Unlike :class:`~bgf_pyg.nn.BatchGraphConv` on a kNN graph, which is fixed for
    the batch and shared by heads and layers, the neighbourhood is recomputed from the layer's
    own projections in every call and differs between heads; it is directed (not symmetrised).
    No edge list is needed: the module only reads ``x`` (and ``batch``).

    Ties at the K-th score: the lower node index wins (as in :func:`~bgf_pyg.build_batch_graph`).
    Gradients flow through the kept scores; the choice of the K is piecewise constant.
    Attention dropout acts on :math:`\alpha`. A non-finite input row makes the output rows of
    its own graph non-finite, no others.

    Scores are computed for a chunk of query rows at a time, so outside autograd (test time,
    ``torch.no_grad``) memory peaks at O(chunk · N · H); in training autograd keeps each chunk's
    (H, chunk, N) attention matrix, O(N² H) per layer. With a ``batch`` vector each graph is
    attended to on its own (a loop over the graphs), so N is the graph's size.

    Args:
        in_channels (int): Size of each input sample.
        out_channels (int): Size of each head's output :math:`d`.
        heads (int, optional): Number of attention heads :math:`H`. (default: :obj:`1`)
        k (int, optional): Scores kept per query row and head, K. (default: :obj:`30`, the
            authors' runs)
        dropout (float, optional): Dropout probability of the attention weights.
            (default: :obj:`0.`)
        bias (bool, optional): Learn additive biases in the query/key/value projections (the
            authors' ``qkv_bias=True``). (default: :obj:`True`)
        chunk_size (int, optional): Query rows per chunk (default: as many as fit
            :data:`DEFAULT_CHUNK_ELEMENTS` scores).

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F_{in})`, batch vector
          :math:`(|\mathcal{V}|)` *(optional)*
        - **output:** node features :math:`(|\mathcal{V}|, H \cdot d)`
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int = 1,
        k: int = defaults.K,
        dropout: float = 0.0,
        bias: bool = True,
        chunk_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        positive_int.check(in_channels, "in_channels")
        positive_int.check(out_channels, "out_channels")
        positive_int.check(heads, "heads")
        positive_int.check(k, "k")
        dropout_rate.check(dropout, "dropout")
        if chunk_size is not None:
            positive_int.check(chunk_size, "chunk_size")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.heads = heads
        self.k = k
        self.dropout = dropout
        self.chunk_size = chunk_size
        width = heads * out_channels
        self.lin_query = Linear(in_channels, width, bias=bias)
        self.lin_key = Linear(in_channels, width, bias=bias)
        self.lin_value = Linear(in_channels, width, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.lin_query.reset_parameters()
        self.lin_key.reset_parameters()
        self.lin_value.reset_parameters()

    def forward(
        self, x: Tensor, batch: Optional[Tensor] = None, return_attention_weights: bool = False
    ) -> Union[Tensor, tuple[Tensor, tuple[Tensor, Tensor]]]:
        r"""Runs the forward pass of the module.

        Args:
            x (torch.Tensor): The node features.
            batch (torch.Tensor, optional): The graph of each node (a PyG ``Batch``'s ``batch``
                vector; any integer ids, in any order): attention stays within each graph.
                (default: :obj:`None`, one graph)
            return_attention_weights (bool, optional): Also return ``(edge_index, alpha)``: the
                kept weights ``alpha`` (E, H) and their edges ``edge_index`` (2, E, H), the edge
                j→i of ``alpha[e, h]`` being ``edge_index[:, e, h]``; every query i has its
                ``min(k, n_i)`` edges, the targets are the same in every head, the sources are
                each head's own. (default: :obj:`False`)
        """
        check_features(x, "x", width=self.in_channels, finite=False)
        num_nodes = x.size(0)
        if batch is not None:
            check_labels(batch, num_nodes, "batch")
        heads, width = self.heads, self.out_channels
        query, key, value = (
            lin(x).view(num_nodes, heads, width).transpose(0, 1)  # (H, N, d)
            for lin in (self.lin_query, self.lin_key, self.lin_value)
        )
        if batch is None:
            graphs = [torch.arange(num_nodes, device=x.device)]
        else:  # one graph at a time: O(sum of n_g²) scores, and nothing crosses graphs
            order = batch.argsort(stable=True)
            # sizes of the graphs present (not bincount: its length is the largest id + 1)
            graphs = list(order.split(batch[order].unique_consecutive(return_counts=True)[1]
                                      .tolist()))
        parts = [self._attend(query[:, nodes], key[:, nodes], value[:, nodes])
                 for nodes in graphs]
        out = torch.cat([part[0] for part in parts], dim=1)
        if batch is not None:  # back from the graphs' order to the nodes'
            inverse = torch.empty_like(batch)
            inverse[torch.cat(graphs)] = torch.arange(num_nodes, device=batch.device)
            out = out[:, inverse]
        out = out.transpose(0, 1).reshape(num_nodes, heads * width)
        if not return_attention_weights:
            return out
        sources = torch.cat([nodes[index].flatten(1) for nodes, (_, index, _) in
                             zip(graphs, parts, strict=True)], dim=1).t()  # (E, H)
        targets = torch.cat([nodes.repeat_interleave(index.size(-1)) for nodes, (_, index, _) in
                             zip(graphs, parts, strict=True)])
        alpha = torch.cat([weights.flatten(1) for _, _, weights in parts], dim=1).t()
        return out, (torch.stack([sources, targets.unsqueeze(1).expand_as(sources)]), alpha)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(H, n, d) outputs of one graph's (H, n, d) queries, keys and values, a chunk of query
        rows at a time, with the (H, n, K) kept keys of each query and their weights."""
        num_nodes = key.size(1)
        kept = min(self.k, num_nodes)
        rows = self.chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // max(self.heads * num_nodes, 1))
        chunks, indices, weights = [], [], []
        for start in range(0, num_nodes, rows):
            scores = query[:, start:start + rows] @ key.transpose(1, 2) / math.sqrt(key.size(-1))
            with torch.no_grad():  # (H, c, N) scores; the choice of the K has no gradient
                _, index = select_with_ties(scores.detach().flatten(0, 1), kept)
            index = index.view(*scores.shape[:2], kept)
            weight = scores.gather(-1, index).softmax(dim=-1)
            weight = F.dropout(weight, p=self.dropout, training=self.training)
            # Scattered into a dense (H, c, N) matrix: one matmul with the values.
            attention = scores.new_zeros(scores.shape, dtype=weight.dtype)
            chunks.append(attention.scatter(-1, index, weight) @ value)
            indices.append(index)
            weights.append(weight)
        if not chunks:
            empty = value.new_zeros(self.heads, 0, 0)
            return value, empty.long(), empty
        return torch.cat(chunks, dim=1), torch.cat(indices, dim=1), torch.cat(weights, dim=1)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"heads={self.heads}, k={self.k})")
