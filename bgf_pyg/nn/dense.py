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
    edge_index: Tensor,
    num_src: int,
    num_dst: int,
    dtype: torch.dtype = torch.float,
    self_loops: bool = False,
) -> Tensor:
    """(num_dst, num_src) edge-count matrix, ``adj[target, source]``, of a (2, E) edge list.

    With ``self_loops`` the diagonal is set to exactly one edge i→i for i < min(num_src, num_dst),
    as ``remove_self_loops`` followed by ``add_self_loops`` would give, but without their
    data-dependent masking (so ``torch.compile`` keeps one graph).
    """
    adj = torch.zeros(num_dst * num_src, dtype=dtype, device=edge_index.device)
    flat = edge_index[1] * num_src + edge_index[0]
    adj.index_add_(0, flat, torch.ones_like(flat, dtype=dtype))
    adj = adj.view(num_dst, num_src)
    if self_loops:
        adj.diagonal().fill_(1.0)
    return adj


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
    has_neighbour = adj.any(dim=1)
    # log-counts as an additive mask: log 0 = -inf where no edge, log 2 for a doubled edge. Rows
    # without neighbours get a zero mask (a finite softmax) and are zeroed afterwards. Three passes
    # over the N² matrix in all: this mask is the dense path's main cost beyond the two matmuls.
    log_adj = adj.to(query.dtype).masked_fill(~has_neighbour.unsqueeze(1), 1.0).log_()
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
