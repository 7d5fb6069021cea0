"""``BatchGraphConv``: structure-constrained self-attention (SSA) as a PyG convolution."""

from __future__ import annotations

import math
import typing
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.nn.dense.linear import Linear
from torch_geometric.typing import Adj, NoneType, OptTensor, PairTensor, SparseTensor
from torch_geometric.utils import (
    add_self_loops,
    remove_self_loops,
    softmax,
    to_edge_index,
    to_torch_coo_tensor,
    to_torch_csc_tensor,
    to_torch_csr_tensor,
)

from ..checks import (
    check_channels,
    check_edge_index,
    check_features,
    check_positive_int,
    check_probability,
    is_compiling,
)
from .dense import dense_adjacency, dense_attention
from .kernels import csr_attention, csr_attention_supported

if typing.TYPE_CHECKING:
    from typing import overload
else:
    from torch.jit import _overload_method as overload

ATTENTION_PATHS = ("auto", "sparse", "dense", "fused")


def _is_edge_list(edge_index: Adj) -> bool:
    """A plain (2, E) index tensor, not a ``SparseTensor`` or ``torch.sparse`` adjacency."""
    return isinstance(edge_index, Tensor) and edge_index.layout == torch.strided


def _adjacency_edges(adj: Adj, num_src: int, num_dst: int) -> tuple[Tensor, OptTensor]:
    """The (2, E) edge list j→i of a ``SparseTensor`` / ``torch.sparse`` adjacency ``adj_t`` (rows
    = targets, columns = sources), in its stored (coalesced) entry order, which edge features
    follow, and the edge features the adjacency carries, as PyG's ``propagate`` reads them: a
    ``SparseTensor``'s values (any shape), a ``torch.sparse`` tensor's values only when they
    are vectors (hybrid, (E, D)): its scalar values are edge weights. ``None`` without any."""
    size = tuple(adj.sparse_sizes()) if isinstance(adj, SparseTensor) else tuple(adj.shape[:2])
    if size != (num_dst, num_src):
        raise ValueError(
            f"edge_index (a sparse adjacency, rows = targets) must have size ({num_dst}, "
            f"{num_src}) to match x, got {size}"
        )
    edges, values = to_edge_index(adj)
    if isinstance(adj, SparseTensor):
        values = adj.storage.value()
    elif values.dim() == 1:
        values = None
    return edges.flip(0), values


def _weights_as_adjacency(
    adj: Adj, edge_index: Tensor, alpha: Tensor, num_src: int, num_dst: int
) -> Union[SparseTensor, tuple[Tensor, Tensor]]:
    """Attention weights in the input's adjacency form, as PyG's ``GATConv`` returns them: a
    ``SparseTensor``, or ``(torch.sparse adjacency, alpha)`` of the same layout."""
    if isinstance(adj, SparseTensor):
        return SparseTensor(
            row=edge_index[1], col=edge_index[0], value=alpha, sparse_sizes=(num_dst, num_src)
        )
    to_layout = {torch.sparse_csr: to_torch_csr_tensor, torch.sparse_csc: to_torch_csc_tensor}
    build = to_layout.get(adj.layout, to_torch_coo_tensor)
    return build(edge_index.flip(0), alpha, size=(num_dst, num_src)), alpha


def _check_constructor_args(
    in_channels: Union[int, tuple[int, int]],
    out_channels: int,
    heads: int,
    dropout: float,
    edge_dim: Optional[int],
) -> None:
    """Refuse widths, head counts and probabilities that cannot build a layer, naming each."""
    if isinstance(in_channels, tuple):
        if len(in_channels) != 2:
            raise ValueError(f"in_channels must be an int or a pair of ints, got {in_channels!r}")
        check_channels(in_channels[0], "in_channels[0]", lazy=True)
        check_channels(in_channels[1], "in_channels[1]", lazy=True)
    else:
        check_channels(in_channels, "in_channels", lazy=True)
    check_positive_int(out_channels, "out_channels")
    check_positive_int(heads, "heads")
    check_probability(dropout, "dropout")
    if edge_dim is not None:
        check_positive_int(edge_dim, "edge_dim")


#: ``attention_path="auto"`` runs the dense path when N_src·N_dst ≤ this × |E| (self-loops
#: counted): the N² masked attention (SDPA, no per-edge gathers or scatters) then costs less than
#: the sparse path. From a quiet sweep (CPU, 1 thread, D = 512, 8 heads, forward+backward, kNN
#: graphs with loops; ``benchmarks/results/cpu_threshold_quiet*.json``): dense won at 11.6 pairs
#: per edge (N = 128, k = 10: 8.5 vs 8.9 ms) and 8.3 (N = 256, k = 30: 17.7 vs 18.4 ms), tied at
#: 12.2 (N = 256, k = 20) and lost from 16.5 on (N = 512, k = 30: 43.9 vs 36.0 ms; N = 512,
#: k = 20: 43.4 vs 32.5 ms). The former 30 came from one run on a loaded machine.
DENSE_PAIRS_PER_EDGE = 12


class BatchGraphConv(MessagePassing):
    r"""Structure-constrained self-attention (SSA) from `"Rethinking Batch Sample Relationships for
    Data Representation: A Batch-Graph Transformer based Approach"
    <https://arxiv.org/abs/2211.10622>`_: multi-head scaled dot-product attention whose softmax runs
    over each node's in-edges only (a *sparse* softmax).

    .. math::
        \mathbf{x}^{\prime}_i = \Big\Vert_{h=1}^{H} \sum_{j \in \mathcal{N}(i)}
        \alpha^{h}_{i,j} \left(\mathbf{W}^{h}_V \mathbf{x}_j + \mathbf{W}^{h}_E \mathbf{e}_{j,i}
        \right) \; \left[ + \mathbf{W}_S \mathbf{x}_i \right]

    with the attention coefficients

    .. math::
        \alpha^{h}_{i,j} = \operatorname{softmax}_{j \in \mathcal{N}(i)} \left(
        \frac{(\mathbf{W}^{h}_Q \mathbf{x}_i)^{\top}
        (\mathbf{W}^{h}_K \mathbf{x}_j + \mathbf{W}^{h}_E \mathbf{e}_{j,i})}{\sqrt{d}} \right),

    where :math:`\mathcal{N}(i)` are the sources of the edges j→i (plus i itself when
    :obj:`add_self_loops`), :math:`d` = :obj:`out_channels` and :math:`\Vert` concatenates the
    :math:`H` heads (or averages them when :obj:`concat=False`). A node without in-edges gets zeros
    (never NaN). A duplicated edge is counted as often as it appears. With
    :obj:`add_self_loops=False`, :obj:`root_weight=False` and :obj:`bias=False` the layer computes
    exactly :class:`~torch_geometric.nn.conv.TransformerConv` and loads its weights (same parameter
    names; strict loading works, the unused ``lin_skip`` of a TransformerConv with
    :obj:`root_weight=False` is ignored when this layer has none).

    Two equivalent implementations are available: the edge-list ``"sparse"`` path (gathers per edge
    and a scatter softmax, :math:`O(|E|)` memory) and the ``"dense"`` path (masked attention on
    an (N, N) adjacency, O(N²) memory; one matmul, faster for small or nearly complete graphs);
    ``"auto"`` picks one from :math:`N` and :math:`|E|`. Edge features always use the sparse path.
    On CPU (float32/float64, no edge features) the sparse path runs as per-head sparse-matrix
    products with a recomputing backward (:mod:`bgf_pyg.nn.kernels.sparse_cpu`), which allocates
    no :math:`(|E|, H, d)` tensor; under ``torch.compile`` it keeps the gather form below, which
    inductor fuses. Elsewhere it gathers per edge; when every target has the same number k of
    in-edges, sorted by target (the kNN graphs of :func:`~bgf_pyg.build_batch_graph`), it
    reshapes the edges to (N, k) and takes a dense softmax over the k slots instead of a scatter
    softmax (not under ``torch.compile``).
    Every path gives the edge-list result, also for non-finite input: a NaN or inf feature makes
    exactly the rows non-finite whose attention neighbourhood holds it. A ``SparseTensor`` or
    ``torch.sparse`` adjacency is read as an edge list in its stored (coalesced) order, which
    :obj:`edge_attr` rows follow. Without :obj:`edge_attr`, a layer with :obj:`edge_dim` takes the
    edge features from the adjacency as PyG's ``propagate`` does: a ``SparseTensor``'s values
    (e.g. ``SparseTensor.from_edge_index(edge_index, edge_attr, sparse_sizes=...).t()``) or a
    hybrid ``torch.sparse`` tensor's (E, D) values (its scalar values are edge weights and are
    ignored). With :obj:`edge_dim=1` edge features may be given as a vector (E,). PyG's
    explainers see every path: explain mode or a ``propagate``/``message``/``aggregate`` hook
    routes the layer through :meth:`propagate`.

    Args:
        in_channels (int or tuple): Size of each input sample, or :obj:`-1` to derive it from the
            first input. A tuple gives the source and target sizes (bipartite graphs).
        out_channels (int): Size of each head's output :math:`d`.
        heads (int, optional): Number of attention heads. (default: :obj:`1`)
        concat (bool, optional): Concatenate the heads; if :obj:`False`, average them.
            (default: :obj:`True`)
        dropout (float, optional): Dropout probability of the normalised attention coefficients.
            (default: :obj:`0.`)
        add_self_loops (bool, optional): Remove existing self-loops and add one per node, so that
            every node attends to itself exactly once. This masking is data dependent and breaks
            ``torch.compile`` graphs: for compiled models build the graph with its self-loops
            (:func:`~bgf_pyg.build_batch_graph` with :obj:`loop=True`) and set this to
            :obj:`False`. (default: :obj:`True`)
        edge_dim (int, optional): Edge feature dimensionality; edge features are projected by
            :math:`\mathbf{W}_E` and added to keys and values. (default: :obj:`None`)
        bias (bool, optional): Learn additive biases in the query/key/value/skip projections (as
            :class:`~torch_geometric.nn.conv.TransformerConv`). (default: :obj:`True`)
        root_weight (bool, optional): Add the projected root features
            :math:`\mathbf{W}_S \mathbf{x}_i`. (default: :obj:`False`)
        fill_value (float or str, optional): Edge features of added self-loops (see
            :meth:`torch_geometric.utils.add_self_loops`). (default: :obj:`"mean"`)
        attention_path (str, optional): ``"sparse"`` (edge list), ``"dense"`` (masked dense
            attention), ``"fused"`` (the Triton kernel of :mod:`bgf_pyg.nn.kernels.fused_triton`:
            CUDA, or CPU under ``TRITON_INTERPRET=1``; needs ``triton``; no edge features) or
            ``"auto"``: dense when :math:`N_s N_t \le` :data:`DENSE_PAIRS_PER_EDGE`
            :math:`\cdot |\mathcal{E}|`, else sparse. ``"auto"`` never picks ``"fused"``: no GPU
            measurement has shown it faster yet. (default: :obj:`"auto"`)
        **kwargs (optional): Additional arguments of
            :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F_{in})` or
          :math:`((|\mathcal{V}_s|, F_s), (|\mathcal{V}_t|, F_t))` if bipartite, edge indices
          :math:`(2, |\mathcal{E}|)` (or a ``SparseTensor`` / ``torch.sparse`` adjacency
          ``adj_t``), edge features :math:`(|\mathcal{E}|, D)` *(optional)*
        - **output:** node features :math:`(|\mathcal{V}_t|, H \cdot d)` or
          :math:`(|\mathcal{V}_t|, d)` if :obj:`concat=False`; with
          :obj:`return_attention_weights=True` also :math:`((2, |\mathcal{E}'|),
          (|\mathcal{E}'|, H))`, where :math:`\mathcal{E}'` includes the added self-loops.
    """

    _alpha: OptTensor

    def __init__(
        self,
        in_channels: Union[int, tuple[int, int]],
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        dropout: float = 0.0,
        add_self_loops: bool = True,
        edge_dim: Optional[int] = None,
        bias: bool = True,
        root_weight: bool = False,
        fill_value: Union[float, str] = "mean",
        attention_path: str = "auto",
        **kwargs,
    ) -> None:
        kwargs.setdefault("aggr", "add")
        super().__init__(node_dim=0, **kwargs)
        # Checked here, not at the first forward: a zero width or head count would otherwise
        # surface as a reshape error inside the attention.
        if attention_path not in ATTENTION_PATHS:
            raise ValueError(
                f"attention_path must be one of {ATTENTION_PATHS}, got {attention_path!r}"
            )
        _check_constructor_args(in_channels, out_channels, heads, dropout, edge_dim)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.heads = heads
        self.concat = concat
        self.dropout = dropout
        self.add_self_loops = add_self_loops
        self.edge_dim = edge_dim
        self.root_weight = root_weight
        self.fill_value = fill_value
        self.attention_path = attention_path
        self._alpha = None

        src_channels, dst_channels = (
            (in_channels, in_channels) if isinstance(in_channels, int) else in_channels
        )
        width = heads * out_channels
        self.lin_key = Linear(src_channels, width, bias=bias)
        self.lin_query = Linear(dst_channels, width, bias=bias)
        self.lin_value = Linear(src_channels, width, bias=bias)
        if edge_dim is not None:
            self.lin_edge = Linear(edge_dim, width, bias=False)
        else:
            self.register_parameter("lin_edge", None)
        if root_weight:
            self.lin_skip = Linear(dst_channels, width if concat else out_channels, bias=bias)
        else:
            self.register_parameter("lin_skip", None)
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # TransformerConv always holds ``lin_skip``, unused when root_weight=False; without a
        # root weight we hold none, so exactly those keys are dropped and strict loading works.
        if self.lin_skip is None:
            for name in ("weight", "bias"):
                state_dict.pop(f"{prefix}lin_skip.{name}", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.lin_key.reset_parameters()
        self.lin_query.reset_parameters()
        self.lin_value.reset_parameters()
        if self.lin_edge is not None:
            self.lin_edge.reset_parameters()
        if self.lin_skip is not None:
            self.lin_skip.reset_parameters()

    @overload
    def forward(
        self,
        x: Union[Tensor, PairTensor],
        edge_index: Adj,
        edge_attr: OptTensor = None,
        return_attention_weights: NoneType = None,
    ) -> Tensor:
        pass

    @overload
    def forward(  # noqa: F811
        self,
        x: Union[Tensor, PairTensor],
        edge_index: Tensor,
        edge_attr: OptTensor = None,
        return_attention_weights: bool = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        pass

    @overload
    def forward(  # noqa: F811
        self,
        x: Union[Tensor, PairTensor],
        edge_index: SparseTensor,
        edge_attr: OptTensor = None,
        return_attention_weights: bool = None,
    ) -> tuple[Tensor, SparseTensor]:
        pass

    def forward(  # noqa: F811
        self,
        x: Union[Tensor, PairTensor],
        edge_index: Adj,
        edge_attr: OptTensor = None,
        return_attention_weights: Optional[bool] = None,
    ) -> Union[Tensor, tuple[Tensor, tuple[Tensor, Tensor]], tuple[Tensor, SparseTensor]]:
        r"""Runs the forward pass of the module.

        Args:
            x (torch.Tensor or (torch.Tensor, torch.Tensor)): The input node features.
            edge_index (torch.Tensor or SparseTensor): Edge indices (2, E), row 0 = source, or a
                ``SparseTensor`` / ``torch.sparse`` adjacency ``adj_t`` (rows = targets).
            edge_attr (torch.Tensor, optional): Edge features (E, edge_dim) (or (E,) when
                edge_dim=1); taken from a sparse adjacency's values when not given.
                (default: :obj:`None`)
            return_attention_weights (bool, optional): If truthy, also return
                :obj:`(edge_index, attention_weights)` (PyG ≥ 2.8 ``GATConv`` semantics: a
                value of :obj:`False` returns only the output). (default: :obj:`None`)
        """
        x_src, x_dst = (x, x) if isinstance(x, Tensor) else x
        num_src, num_dst = x_src.size(0), x_dst.size(0)
        # Every adjacency form runs as an edge list: self-loops, edge features and bipartite
        # sizes then take one code path, and the attention paths below see one input form.
        adjacency = None if _is_edge_list(edge_index) else edge_index
        if adjacency is not None:
            edge_index, values = _adjacency_edges(adjacency, num_src, num_dst)
            if edge_attr is None and self.lin_edge is not None:
                edge_attr = values
        if edge_attr is not None and edge_attr.dim() == 1 and self.edge_dim == 1:
            edge_attr = edge_attr.view(-1, 1)
        self._check_inputs(x_src, x_dst, edge_index, edge_attr)
        query, key, value = self._project(x_src, x_dst)
        return_weights = bool(return_attention_weights)

        # PyG's explain tools (GNNExplainer's edge masks, AttentionExplainer's message hooks) see
        # the attention only inside ``propagate``: with explain mode or a hook that path runs.
        generic = self._observed()
        if not generic and self._use_dense(edge_index, edge_attr, num_src, num_dst):
            out, alpha, edge_index = self._dense_forward(
                query, key, value, edge_index, return_weights
            )
        elif not generic and self._use_kernel(query, edge_attr):
            if self.add_self_loops:
                edge_index, _ = self._with_self_loops(edge_index, None, num_src, num_dst)
            out, alpha = self._kernel_forward(query, key, value, edge_index)
        else:
            source = None
            if not generic:
                source = self._regular_sources(edge_index, edge_attr, num_src, num_dst)
            if source is not None:
                out, alpha, edge_index = self._regular_forward(
                    query, key, value, source, edge_index, edge_attr
                )
            else:
                if self.add_self_loops:
                    edge_index, edge_attr = self._with_self_loops(
                        edge_index, edge_attr, num_src, num_dst
                    )
                # propagate_type: (query: Tensor, key: Tensor, value: Tensor, edge_attr: OptTensor)
                out = self.propagate(
                    edge_index, query=query, key=key, value=value, edge_attr=edge_attr,
                    size=(num_src, num_dst),
                )
                alpha = self._alpha
                self._alpha = None

        out = out.reshape(-1, self.heads * self.out_channels) if self.concat else out.mean(dim=1)
        if self.lin_skip is not None:
            out = out + self.lin_skip(x_dst)

        if return_weights:
            assert alpha is not None
            if adjacency is not None:
                return out, _weights_as_adjacency(adjacency, edge_index, alpha, num_src, num_dst)
            return out, (edge_index, alpha)
        return out

    def _observed(self) -> bool:
        """Explain mode, or a hook on ``propagate``/``message``/``aggregate``: only the generic
        path calls them. A few dict look-ups, nothing on the tensors."""
        return bool(self.explain) or any(
            bool(hooks) for hooks in (
                self._propagate_forward_pre_hooks, self._propagate_forward_hooks,
                self._message_forward_pre_hooks, self._message_forward_hooks,
                self._aggregate_forward_pre_hooks, self._aggregate_forward_hooks,
            )
        )

    def message(
        self,
        query_i: Tensor,
        key_j: Tensor,
        value_j: Tensor,
        edge_attr: OptTensor,
        index: Tensor,
        ptr: OptTensor,
        size_i: Optional[int],
    ) -> Tensor:
        if self.lin_edge is not None:
            edge = self.lin_edge(edge_attr).view(-1, self.heads, self.out_channels)
            key_j = key_j + edge
            value_j = value_j + edge
        alpha = (query_i * key_j).sum(dim=-1) / math.sqrt(self.out_channels)
        alpha = softmax(alpha, index, ptr, size_i)
        self._alpha = alpha
        alpha = F.dropout(alpha, p=self.dropout, training=self.training)
        return value_j * alpha.unsqueeze(-1)

    def _check_inputs(
        self, x_src: Tensor, x_dst: Tensor, edge_index: Tensor, edge_attr: OptTensor
    ) -> None:
        src_width = self.lin_key.in_channels if self.lin_key.in_channels > 0 else None
        dst_width = self.lin_query.in_channels if self.lin_query.in_channels > 0 else None
        check_features(x_src, "x" if x_src is x_dst else "x[0]", src_width, finite=False)
        check_features(x_dst, "x" if x_src is x_dst else "x[1]", dst_width, finite=False)
        check_edge_index(edge_index, x_src.size(0), x_dst.size(0), "edge_index")
        num_edges = edge_index.size(1)
        if self.lin_edge is not None:
            if edge_attr is None:
                raise ValueError(
                    f"edge_attr is required: the layer has edge_dim={self.edge_dim} (pass it, or "
                    "as the values of a SparseTensor adjacency)"
                )
            if edge_attr.dim() == 1:
                raise ValueError(
                    f"edge_attr must have shape (E, {self.edge_dim}), got {tuple(edge_attr.shape)}"
                )
            if edge_attr.size(0) != num_edges:
                raise ValueError(
                    f"edge_attr must have one row per edge ({num_edges}), got "
                    f"{tuple(edge_attr.shape)}"
                )
        elif edge_attr is not None:
            raise ValueError("edge_attr was given but the layer has edge_dim=None")

    def _with_self_loops(
        self, edge_index: Tensor, edge_attr: OptTensor, num_src: int, num_dst: int
    ) -> tuple[Tensor, OptTensor]:
        edge_index, edge_attr = remove_self_loops(edge_index, edge_attr)
        return add_self_loops(
            edge_index, edge_attr, fill_value=self.fill_value, num_nodes=min(num_src, num_dst)
        )

    def _project(self, x_src: Tensor, x_dst: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Query (N_dst, H, d), key and value (N_src, H, d).

        Three GEMMs, not one on concatenated weights: the fused form measured 5% slower on CPU
        (N = 4096, D = 512, eager and compiled) because of the per-call weight copy and strided
        chunks."""
        shape = (-1, self.heads, self.out_channels)
        return (
            self.lin_query(x_dst).view(shape),
            self.lin_key(x_src).view(shape),
            self.lin_value(x_src).view(shape),
        )

    def _use_dense(
        self, edge_index: Tensor, edge_attr: OptTensor, num_src: int, num_dst: int
    ) -> bool:
        if edge_attr is not None:
            return False
        if self.attention_path != "auto":
            return self.attention_path == "dense"
        num_edges = edge_index.size(1) + (min(num_src, num_dst) if self.add_self_loops else 0)
        return num_src * num_dst <= DENSE_PAIRS_PER_EDGE * num_edges

    def _use_kernel(self, query: Tensor, edge_attr: OptTensor) -> bool:
        """Whether an attention kernel runs: the Triton one when ``attention_path="fused"``, else
        the sparse-matrix one (:mod:`.kernels.sparse_cpu`) for edge lists without edge features
        on CPU. The caller skips both in explain mode or with a hook (:meth:`_observed`): PyG's
        explainers need ``propagate``. Under ``torch.compile`` the gather form of ``propagate``
        runs instead: inductor fuses it, and it measured faster than the opaque kernel (CPU,
        1 thread, N = 4096, k = 10, D = 512, 8 heads, fwd+bwd: 459 ms vs 562 ms, compiled
        TransformerConv 427 and 372 ms in the same two runs)."""
        if self.attention_path == "fused":
            if edge_attr is not None:
                raise ValueError(
                    "attention_path='fused' takes no edge_attr; use attention_path='sparse' for "
                    "edge features"
                )
            return True
        return (
            not is_compiling()
            and edge_attr is None
            and csr_attention_supported(query)
        )

    def _kernel_forward(
        self, query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(out (N_dst, H, d), alpha (E, H))`` from the CPU sparse-matrix kernel or, with
        ``attention_path="fused"``, the Triton kernel."""
        weight = None
        if self.training and self.dropout > 0:
            ones = query.new_ones(edge_index.size(1), self.heads)
            weight = F.dropout(ones, p=self.dropout, training=True)
        if self.attention_path == "fused":
            from .kernels.fused_triton import fused_attention

            return fused_attention(query, key, value, edge_index, weight)
        return csr_attention(query, key, value, edge_index, weight)

    def _dense_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        edge_index: Tensor,
        return_weights: bool,
    ) -> tuple[Tensor, OptTensor, Tensor]:
        """Masked dense attention; returns ``(out, alpha (E', H) or None, edge_index')``."""
        num_src, num_dst = key.size(0), query.size(0)
        adj = dense_adjacency(
            edge_index, num_src, num_dst, dtype=query.dtype, self_loops=self.add_self_loops
        )
        out, alpha = dense_attention(
            query, key, value, adj, self.dropout, self.training, return_weights
        )
        if alpha is not None:
            if self.add_self_loops:
                edge_index, _ = self._with_self_loops(edge_index, None, num_src, num_dst)
            # Per-edge weights: a pair with c duplicate edges carries c shares of the softmax.
            src, dst = edge_index
            alpha = (alpha[:, dst, src] / adj[dst, src]).t()
        return out, alpha, edge_index

    def _regular_sources(
        self, edge_index: Tensor, edge_attr: OptTensor, num_src: int, num_dst: int
    ) -> OptTensor:
        """(N_dst, k) sources when every target has the same k in-edges, sorted by target (the
        kNN graphs of :func:`~bgf_pyg.build_batch_graph`); with :obj:`add_self_loops` the loop
        becomes slot 0 (only when the input has no loops). ``None`` when the layout differs.

        The check reads the edge list once (O(|E|), no sort), but its outcome is data dependent:
        under ``torch.compile`` the generic path runs instead, so the graph stays unbroken.
        """
        if (
            is_compiling()
            or num_dst == 0
            or edge_index.size(1) % num_dst != 0
            or (self.add_self_loops and (edge_attr is not None or num_dst > num_src))
        ):
            return None
        source, target = edge_index.view(2, num_dst, -1)
        node = torch.arange(num_dst, device=edge_index.device).view(-1, 1)
        regular = target == node
        if self.add_self_loops:
            regular = regular & (source != node)
        if not bool(regular.all()):
            return None
        if self.add_self_loops:
            source = torch.cat([node, source], dim=1)
        return source

    def _regular_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        source: Tensor,
        edge_index: Tensor,
        edge_attr: OptTensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The sparse softmax on a regular graph: a dense softmax over each target's k slots,
        with no scatter. Returns ``(out (N_dst, H, d), alpha (E', H), edge_index')`` in the edge
        order of the generic path (added loops last)."""
        num_dst, degree = source.shape
        heads, channels = self.heads, self.out_channels
        key_j = key.index_select(0, source.reshape(-1)).view(num_dst, degree, heads, channels)
        value_j = value.index_select(0, source.reshape(-1)).view(num_dst, degree, heads, channels)
        if self.lin_edge is not None:
            edge = self.lin_edge(edge_attr).view(num_dst, degree, heads, channels)
            key_j = key_j + edge
            value_j = value_j + edge
        # Broadcast products, not einsum: einsum's bmm over N·H tiny (1, d) @ (d, k) matrices
        # copies every batch entry on CPU and was 3× slower.
        score = (query.unsqueeze(1) * key_j).sum(dim=-1) / math.sqrt(channels)  # (N_dst, k, H)
        alpha = score.softmax(dim=1)
        weight = F.dropout(alpha, p=self.dropout, training=self.training)
        out = (weight.unsqueeze(-1) * value_j).sum(dim=1)
        if self.add_self_loops:
            loop = source[:, :1].t().expand(2, -1)
            edge_index = torch.cat([edge_index, loop], dim=1)
            alpha = torch.cat([alpha[:, 1:].reshape(-1, heads), alpha[:, 0]])
        return out, alpha.reshape(-1, heads), edge_index

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"heads={self.heads})"
        )
