"""Structure-constrained attention on a dense adjacency.

The same math as :class:`~bgf_pyg.nn.BatchGraphConv`'s sparse softmax, computed as masked dense
attention: the reference the tests check the sparse path against, and the fast path for small or
dense batch graphs (one matmul instead of per-edge gathers and scatters).

Adjacency convention (as PyG's ``DenseGATConv``): ``adj[i, j]`` = number of edges j→i, i.e. rows
are *targets* and columns *sources*; ``torch_geometric.utils.to_dense_adj`` gives the transpose.
A duplicated edge counts twice in the softmax, exactly as in the edge-list form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def dense_adjacency(
    edge_index: Tensor, num_src: int, num_dst: int, dtype: torch.dtype = torch.float
) -> Tensor:
    """(num_dst, num_src) edge-count matrix, ``adj[target, source]``, of a (2, E) edge list."""
    adj = torch.zeros(num_dst * num_src, dtype=dtype, device=edge_index.device)
    flat = edge_index[1] * num_src + edge_index[0]
    adj.index_add_(0, flat, torch.ones_like(flat, dtype=dtype))
    return adj.view(num_dst, num_src)


def dense_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    adj: Tensor,
    dropout: float = 0.0,
    training: bool = False,
    return_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    r"""Multi-head attention whose softmax runs over each target's in-neighbours only.

    .. math::
        \alpha^h_{ij} = \frac{A_{ij}\exp(q^h_i \cdot k^h_j / \sqrt{d})}
        {\sum_l A_{il}\exp(q^h_i \cdot k^h_l / \sqrt{d})}, \qquad
        \mathbf{o}^h_i = \sum_j \alpha^h_{ij} \mathbf{v}^h_j

    with :math:`A_{ij}` the number of edges j→i. A target with no in-edge gets zeros.

    Args:
        query: (N_dst, H, d); key, value: (N_src, H, d).
        adj: (N_dst, N_src) non-negative edge counts.
        dropout: dropout probability on α (only when ``training``).
        return_weights: also return α as an (H, N_dst, N_src) tensor.

    Returns:
        ``(out (N_dst, H, d), alpha or None)``.
    """
    has_edge = adj > 0
    has_neighbour = has_edge.any(dim=1)
    # log-counts as an additive mask: -inf where no edge, log 2 for a doubled edge. Rows without
    # neighbours get a zero mask (a finite softmax) and are zeroed afterwards.
    log_adj = torch.where(has_edge, adj.log(), adj.new_full((), float("-inf")))
    log_adj = torch.where(has_neighbour.unsqueeze(1), log_adj, torch.zeros_like(log_adj))
    log_adj = log_adj.to(query.dtype)
    q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # (H, N, d)
    alpha = None
    if return_weights:
        scores = q @ k.transpose(1, 2) / math.sqrt(q.size(-1)) + log_adj
        alpha = scores.softmax(dim=-1) * has_neighbour.view(1, -1, 1)
        out = F.dropout(alpha, p=dropout, training=training) @ v
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=log_adj, dropout_p=dropout if training else 0.0
        )
    out = out.transpose(0, 1) * has_neighbour.view(-1, 1, 1)
    return out, alpha
