"""Structure-constrained self-attention (SSA) behind one function, :func:`ssa_attention`: the
execution paths of :class:`~bgf_pyg.nn.BatchGraphConv` and the rules that choose among them.

Every path computes the same thing on projected queries (N_dst, H, d) and keys/values
(N_src, H, d): a softmax of :math:`q_i \\cdot k_j / \\sqrt{d}` over the in-edges j→i of each
target, the weighted sum of the values, zeros for a target without in-edges, a duplicated edge
counted as often as it appears. They differ in how:

- ``"dense"``: masked attention on the (N_dst, N_src) edge-count matrix
  (:func:`~bgf_pyg.nn.dense.dense_attention`, one SDPA call; O(N²) memory).
- ``"csr"``: per-head sparse-matrix products with a recomputing backward
  (:mod:`.sparse_cpu`; CPU, float32/float64).
- ``"fused"``: the Triton kernel of :mod:`.fused_triton` (CUDA, or CPU under
  ``TRITON_INTERPRET=1``).
- ``"regular"``: when every target has the same number k of in-edges, sorted by target (the kNN
  graphs of :func:`~bgf_pyg.build_batch_graph`), the edges reshaped to (N_dst, k) and a dense
  softmax over the k slots, no scatter.
- ``"edges"``: the edge-by-edge form of PyG's ``propagate`` (a gather per edge, a scatter
  softmax, a scatter sum; :func:`edge_messages` is its per-edge part).

Two choosing values: ``"sparse"`` takes the first edge-list path that applies, ``"csr"`` (not under
``torch.compile``, which fuses the gather form into faster code), ``"regular"`` (not under
``torch.compile``: its layout check is data dependent), else ``"edges"``; ``"auto"`` takes
``"dense"`` when :func:`dense_preferred` says so and the sparse choice otherwise. Neither picks
``"fused"``: no GPU measurement has shown it faster yet. :func:`select_path` applies these rules;
a path asked for by name where it cannot run is refused with an error naming ``path``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.utils import add_self_loops as add_loops
from torch_geometric.utils import remove_self_loops, scatter, softmax

from ...checks import is_compiling
from ..dense import dense_adjacency, dense_attention
from .sparse_cpu import csr_attention, csr_attention_supported

#: The execution paths, then the two values that choose one of them.
PATHS = ("dense", "csr", "fused", "regular", "edges")
CHOOSING = ("auto", "sparse")

#: Paths that take no edge features.
NO_EDGE_FEATURES = ("dense", "csr", "fused")

#: ``path="auto"`` runs the dense path when N_src·N_dst ≤ this × :math:`|E|` (self-loops counted):
#: the N² masked attention (SDPA, no per-edge gathers or scatters) then costs less than the sparse
#: path. From a quiet sweep (CPU, 1 thread, D = 512, 8 heads, forward+backward, kNN graphs with
#: loops; ``benchmarks/results/cpu_threshold_quiet*.json``): dense won at 11.6 pairs per edge
#: (N = 128, k = 10: 8.5 vs 8.9 ms) and 8.3 (N = 256, k = 30: 17.7 vs 18.4 ms), tied at 12.2
#: (N = 256, k = 20) and lost from 16.5 on (N = 512, k = 30: 43.9 vs 36.0 ms; N = 512, k = 20: 43.4
#: vs 32.5 ms). The former 30 came from one run on a loaded machine.
DENSE_PAIRS_PER_EDGE = 12

Weights = Optional[tuple[Tensor, Tensor]]


class Route(NamedTuple):
    """A path :func:`select_path` chose, with what it found on the way: the (N_dst, k) sources
    of the ``"regular"`` path (``None`` on the others)."""

    path: str
    source: Optional[Tensor] = None


def dense_preferred(num_edges: int, num_src: int, num_dst: int, add_self_loops: bool) -> bool:
    """Whether ``"auto"`` takes the dense path: N_src·N_dst ≤ :data:`DENSE_PAIRS_PER_EDGE` ·
    :math:`|E|`, with the self-loops to be added counted as edges."""
    num_edges += min(num_src, num_dst) if add_self_loops else 0
    return num_src * num_dst <= DENSE_PAIRS_PER_EDGE * num_edges


def regular_sources(
    edge_index: Tensor, num_src: int, num_dst: int, add_self_loops: bool = False
) -> Optional[Tensor]:
    """The (N_dst, k) sources of the ``"regular"`` path, or ``None`` when it cannot run: every
    target must have the same number k of in-edges, sorted by target, and with
    ``add_self_loops`` (the loop becomes slot 0) the input must have no loops and
    N_dst ≤ N_src. Reads the edge list once (:math:`O(|E|)`, no sort; one device sync)."""
    if (
        num_dst == 0
        or edge_index.size(1) % num_dst != 0
        or (add_self_loops and num_dst > num_src)
    ):
        return None
    source, target = edge_index.view(2, num_dst, -1)
    node = torch.arange(num_dst, device=edge_index.device).view(-1, 1)
    regular = target == node
    if add_self_loops:
        regular = regular & (source != node)
    if not bool(regular.all()):
        return None
    return torch.cat([node, source], dim=1) if add_self_loops else source


def with_self_loops(
    edge_index: Tensor,
    edge_attr: Optional[Tensor],
    num_src: int,
    num_dst: int,
    fill_value: Union[float, str] = "mean",
) -> tuple[Tensor, Optional[Tensor]]:
    """Existing self-loops removed and one loop i→i added (last, in node order) for every
    i < min(N_src, N_dst); edge features of the new loops from ``fill_value`` (see
    :func:`torch_geometric.utils.add_self_loops`)."""
    edge_index, edge_attr = remove_self_loops(edge_index, edge_attr)
    return add_loops(
        edge_index, edge_attr, fill_value=fill_value, num_nodes=min(num_src, num_dst)
    )


def select_path(
    query: Tensor,
    edge_index: Tensor,
    num_src: int,
    *,
    path: str = "auto",
    edge_features: bool = False,
    add_self_loops: bool = False,
    name: str = "path",
) -> Route:
    """The path :func:`ssa_attention` runs on these inputs.

    ``"auto"`` and ``"sparse"`` choose by the rules of this module's description; a named path is
    checked and returned, or refused with a ``ValueError`` naming ``path`` (or ``name``, the
    parameter a caller exposes it as) where it cannot run: edge features on ``"dense"``,
    ``"csr"`` or ``"fused"``, a tensor ``"csr"`` does not take, a layout ``"regular"`` does not
    take. ``"fused"``'s own conditions (Triton, the device) are checked when it runs.
    """
    if path not in PATHS + CHOOSING:
        raise ValueError(f"{name} must be one of {PATHS + CHOOSING}, got {path!r}")
    num_dst = query.size(0)
    if path in NO_EDGE_FEATURES and edge_features:
        raise ValueError(f"{name}={path!r} takes no edge features; use {name}='sparse' with them")
    if path == "csr" and not csr_attention_supported(query):
        raise ValueError(
            f"{name}='csr' runs on CPU float32/float64 tensors, got {query.device.type} "
            f"{query.dtype}; use {name}='sparse'"
        )
    if path == "regular":
        source = None
        if not (edge_features and add_self_loops):  # the loops' features come from other edges
            source = regular_sources(edge_index, num_src, num_dst, add_self_loops)
        if source is None:
            raise ValueError(
                f"{name}='regular' needs the same number of in-edges at every target, sorted by "
                "target (to add self-loops also no loops in the input, no edge features and "
                f"N_dst <= N_src); use {name}='sparse' for other graphs"
            )
        return Route(path, source)
    if path in PATHS:
        return Route(path)
    if (
        path == "auto"
        and not edge_features
        and dense_preferred(edge_index.size(1), num_src, num_dst, add_self_loops)
    ):
        return Route("dense")
    if is_compiling():
        return Route("edges")
    if not edge_features and csr_attention_supported(query):
        return Route("csr")
    source = None
    if not (edge_features and add_self_loops):
        source = regular_sources(edge_index, num_src, num_dst, add_self_loops)
    return Route("edges") if source is None else Route("regular", source)


def ssa_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    edge_index: Tensor,
    *,
    edge: Optional[Tensor] = None,
    path: Union[str, Route] = "auto",
    add_self_loops: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    need_weights: bool = False,
) -> tuple[Tensor, Weights]:
    r"""Structure-constrained attention over the edges j→i of ``edge_index``, on the path
    ``path`` names or chooses.

    Args:
        query: (N_dst, H, d); key, value: (N_src, H, d).
        edge_index: (2, E), row 0 = source.
        edge: optional projected edge features (E, H, d), added to the key and the value of
            their edge (``"regular"`` and ``"edges"`` only).
        path: ``"auto"``, ``"sparse"``, a path name (see :func:`select_path`), or the
            :class:`Route` :func:`select_path` returned for these inputs (not checked again).
        add_self_loops: replace existing self-loops by one loop i→i per target
            i < min(N_src, N_dst). Not with ``edge``: add those loops and their features
            beforehand (:func:`with_self_loops`).
        dropout: dropout probability of α in the aggregation (only when ``training``).
        need_weights: also return the attention weights.

    Returns:
        ``(out (N_dst, H, d), weights)``: ``weights`` is ``(edge_index', alpha (E', H))``, the
        edges with any added loops (last, in node order) and their α before dropout, or ``None``
        without ``need_weights``.
    """
    if edge is not None and add_self_loops:
        raise ValueError(
            "add_self_loops=True takes no edge features: add the loops and their features to "
            "edge_index and edge beforehand (with_self_loops)"
        )
    if not isinstance(path, Route):
        path = select_path(
            query, edge_index, key.size(0), path=path, edge_features=edge is not None,
            add_self_loops=add_self_loops,
        )
    if path.path == "dense":
        return _dense(query, key, value, edge_index, add_self_loops, dropout, training,
                      need_weights)
    if path.path == "regular":
        return _regular(query, key, value, path.source, edge_index, edge, add_self_loops,
                        dropout, training, need_weights)
    if add_self_loops:
        edge_index, _ = with_self_loops(edge_index, None, key.size(0), query.size(0))
    if path.path == "edges":
        out, alpha = _edges(query, key, value, edge_index, edge, dropout, training)
    else:
        out, alpha = _kernel(path.path, query, key, value, edge_index, dropout, training)
    return out, (edge_index, alpha) if need_weights else None


def edge_messages(
    query_i: Tensor,
    key_j: Tensor,
    value_j: Tensor,
    index: Tensor,
    num_dst: Optional[int],
    ptr: Optional[Tensor] = None,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[Tensor, Tensor]:
    """The per-edge part of the ``"edges"`` path (and of ``BatchGraphConv.message``):
    ``(messages (E, H, d), alpha (E, H))`` from the gathered query of each edge's target and key
    and value of its source, α softmaxed over the edges of each target ``index``."""
    alpha = (query_i * key_j).sum(dim=-1) / math.sqrt(query_i.size(-1))
    alpha = softmax(alpha, index, ptr, num_dst)
    weight = F.dropout(alpha, p=dropout, training=training)
    return value_j * weight.unsqueeze(-1), alpha


def _edges(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    edge_index: Tensor,
    edge: Optional[Tensor],
    dropout: float,
    training: bool,
) -> tuple[Tensor, Tensor]:
    source, target = edge_index
    key_j, value_j = key.index_select(0, source), value.index_select(0, source)
    if edge is not None:
        key_j, value_j = key_j + edge, value_j + edge
    num_dst = query.size(0)
    messages, alpha = edge_messages(
        query.index_select(0, target), key_j, value_j, target, num_dst, None, dropout, training
    )
    return scatter(messages, target, 0, num_dst, reduce="sum"), alpha


def _kernel(
    path: str,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    edge_index: Tensor,
    dropout: float,
    training: bool,
) -> tuple[Tensor, Tensor]:
    """``"csr"`` or ``"fused"``: dropout enters the kernels as an (E, H) multiplier of α."""
    weight = None
    if training and dropout > 0:
        ones = query.new_ones(edge_index.size(1), query.size(1))
        weight = F.dropout(ones, p=dropout, training=True)
    if path == "fused":
        from .fused_triton import fused_attention

        return fused_attention(query, key, value, edge_index, weight)
    return csr_attention(query, key, value, edge_index, weight)


def _dense(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    edge_index: Tensor,
    add_self_loops: bool,
    dropout: float,
    training: bool,
    need_weights: bool,
) -> tuple[Tensor, Weights]:
    """Masked dense attention; the loops are the adjacency's diagonal (no data-dependent
    masking, so ``torch.compile`` keeps one graph), the per-edge α is read off the matrix."""
    num_src, num_dst = key.size(0), query.size(0)
    adj = dense_adjacency(
        edge_index, num_src, num_dst, dtype=query.dtype, self_loops=add_self_loops
    )
    out, alpha = dense_attention(query, key, value, adj, dropout, training, need_weights)
    if alpha is None:
        return out, None
    if add_self_loops:
        edge_index, _ = with_self_loops(edge_index, None, num_src, num_dst)
    # Per-edge weights: a pair with c duplicate edges carries c shares of the softmax.
    src, dst = edge_index
    return out, (edge_index, (alpha[:, dst, src] / adj[dst, src]).t())


def _regular(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    source: Tensor,
    edge_index: Tensor,
    edge: Optional[Tensor],
    add_self_loops: bool,
    dropout: float,
    training: bool,
    need_weights: bool,
) -> tuple[Tensor, Weights]:
    """The sparse softmax on a regular graph: a dense softmax over each target's k slots
    (``source`` from :func:`regular_sources`), with no scatter. α comes in the edge order of
    the ``"edges"`` path (added loops last)."""
    num_dst, degree = source.shape
    _, heads, channels = query.shape
    key_j = key.index_select(0, source.reshape(-1)).view(num_dst, degree, heads, channels)
    value_j = value.index_select(0, source.reshape(-1)).view(num_dst, degree, heads, channels)
    if edge is not None:
        edge = edge.view(num_dst, degree, heads, channels)
        key_j = key_j + edge
        value_j = value_j + edge
    # Broadcast products, not einsum: einsum's bmm over N·H tiny (1, d) @ (d, k) matrices
    # copies every batch entry on CPU and was 3× slower.
    score = (query.unsqueeze(1) * key_j).sum(dim=-1) / math.sqrt(channels)  # (N_dst, k, H)
    alpha = score.softmax(dim=1)
    weight = F.dropout(alpha, p=dropout, training=training)
    out = (weight.unsqueeze(-1) * value_j).sum(dim=1)
    if not need_weights:
        return out, None
    if add_self_loops:
        loop = source[:, :1].t().expand(2, -1)
        edge_index = torch.cat([edge_index, loop], dim=1)
        alpha = torch.cat([alpha[:, 1:].reshape(-1, heads), alpha[:, 0]])
    return out, (edge_index, alpha.reshape(-1, heads))
