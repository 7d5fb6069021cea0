"""BGFormer: dual structure-constrained self-attention, GraphNorm and an FFN over the batch graph.

Wang, Jiang, Wang, Luo: "Rethinking Batch Sample Relationships for Data Representation: A
Batch-Graph Transformer based Approach", arXiv 2211.10622 (TMM 2023). No official code exists; the
block follows the paper's description and the first author's related SGFormer module (see
``docs/design.rst`` §4-6), with PyG's ``GraphNorm`` in place of LayerNorm as the paper names.
"""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch_geometric.data import Data
from torch_geometric.nn import GCNConv, GraphNorm

from .. import defaults
from ..checks import check_divides
from ..domains import dropout_rate, positive_int, probability
from .conv import BatchGraphConv
from .label_propagation import SameLabelPropagation
from .topk_attention import TopKAttention

SEMANTIC_BRANCHES = ("attention", "propagation", "label_propagation")
#: ``"knn"``: SSA on given visual edges (e.g. :func:`~bgf_pyg.build_batch_graph`'s kNN graph);
#: ``"attention_topk"``: :class:`~bgf_pyg.nn.TopKAttention`, each layer and head picks its own.
VISUAL_GRAPHS = ("knn", "attention_topk")


def _has_edges(edge_index: Optional[Tensor]) -> bool:
    return edge_index is not None and edge_index.size(-1) > 0


def _graphs_with_edges(
    edge_index: Tensor, batch: Tensor, batch_size: Optional[int] = None
) -> Tensor:
    """(N,) bool: does the node's graph (``batch``) hold at least one of the edges? Edges never
    cross graphs in a PyG ``Batch``, so an edge's target names its graph."""
    if batch_size is None:
        batch_size = int(batch.max()) + 1 if batch.numel() > 0 else 0
    has = torch.zeros(batch_size, dtype=torch.bool, device=batch.device)
    return has.index_fill_(0, batch[edge_index[1]], True)[batch]


def _k_or_topk(k: int, topk: Optional[int], owner: type) -> int:
    """``k``, or the value given under its former name ``topk`` (checked under that name, with a
    ``DeprecationWarning``); a ``TypeError`` when both are given and differ."""
    if topk is None:
        return k
    if k not in (defaults.K, topk):
        raise TypeError(f"{owner.__name__} got k={k} and topk={topk}: topk is the former name of "
                        "k; give k alone")
    positive_int.check(topk, "topk")
    warnings.warn(f"{owner.__name__}(topk=...) is deprecated: the parameter is now named k",
                  DeprecationWarning, stacklevel=3)
    return topk


class _TopKAlias:
    """The attribute ``topk``, the former name of ``k``, read with a ``DeprecationWarning``."""

    k: int

    @property
    def topk(self) -> int:
        warnings.warn(f"{type(self).__name__}.topk is deprecated: the attribute is now named k",
                      DeprecationWarning, stacklevel=2)
        return self.k


class DualSSA(_TopKAlias, nn.Module):
    r"""Dual structure-constrained self-attention: one SSA branch per edge set, mixed by
    :math:`\lambda`, then an output projection.

    .. math::
        \mathbf{s} = \mathbf{W}_O \left( \lambda\, \mathrm{SSA}_{vis}(\mathbf{x}, \mathcal{E}_{vis})
        + (1 - \lambda)\, \mathrm{SSA}_{sem}(\mathbf{x}, \mathcal{E}_{sem}) \right)

    Each branch has its own projections (``channels // heads`` per head): the visual branch is a
    :class:`BatchGraphConv` on the visual edges, or with ``visual_graph="attention_topk"`` a
    :class:`~bgf_pyg.nn.TopKAttention` that chooses its own neighbours. Without semantic edges
    (``None`` or empty: test time, unlabeled data) the visual branch alone is used,
    :math:`\mathbf{s} = \mathbf{W}_O\, \mathrm{SSA}_{vis}`. The choice is made per graph of
    ``batch``: in a PyG ``Batch`` of labelled and unlabelled graphs each graph gets what it would
    get alone.

    What weighs 0 is skipped: with :math:`\lambda = 1` the semantic branch is neither built nor
    computed (``semantic`` is :obj:`None`; the semantic edges are not read, and
    :class:`~bgf_pyg.losses.BatchGraphLoss` builds none). With :math:`\lambda = 0` the visual
    branch stays: it is the whole attention of a graph without semantic edges (test time,
    unlabelled data), and under DistributedDataParallel every parameter must take part in
    every step.

    Args:
        channels (int): Input and output width; must be divisible by :obj:`heads`.
        heads (int, optional): Attention heads per branch. (default: :obj:`8`)
        dropout (float, optional): Attention dropout. (default: :obj:`0.`)
        lam (float, optional): Weight :math:`\lambda` of the visual branch. (default: :obj:`0.5`)
        semantic_branch (str, optional): ``"attention"`` (SSA on the semantic edges),
            ``"propagation"``: :math:`\hat{D}^{-1/2}(A + I)\hat{D}^{-1/2} \mathbf{W} \mathbf{x}`
            (PyG's ``GCNConv``), or ``"label_propagation"``: the authors' form
            :math:`D^{-1}(A_{same} + I)\, \mathbf{W} \mathbf{x}`
            (:class:`~bgf_pyg.nn.label_propagation.SameLabelPropagation`).
            (default: :obj:`"attention"`)
        add_self_loops (bool, optional): Passed to the attention branches. (default: :obj:`True`)
        attention_path (str, optional): Passed to the attention branches. (default: :obj:`"auto"`)
        visual_graph (str, optional): ``"knn"``: the visual branch is SSA on the given
            ``visual_edge_index`` (a graph fixed for the batch, shared by heads and layers), or
            ``"attention_topk"``: the authors' dynamic top-K attention
            (:class:`~bgf_pyg.nn.TopKAttention`), which keeps each query's ``k`` largest
            attention scores among all nodes of its graph, per head, and reads no visual edges.
            (default: :obj:`"knn"`)
        k (int, optional): K of ``"attention_topk"`` (unused by ``"knn"``), the value that is
            ``k`` in :class:`~bgf_pyg.losses.BatchGraphLoss`. ``topk=`` is its deprecated
            former name. (default: :obj:`30`, the authors' runs)
    """

    def __init__(
        self,
        channels: int,
        heads: int = 8,
        dropout: float = 0.0,
        lam: float = defaults.LAM,
        semantic_branch: str = "attention",
        add_self_loops: bool = True,
        attention_path: str = "auto",
        visual_graph: str = "knn",
        k: int = defaults.K,
        *,
        topk: Optional[int] = None,
    ) -> None:
        super().__init__()
        k = _k_or_topk(k, topk, DualSSA)
        positive_int.check(channels, "channels")
        positive_int.check(heads, "heads")
        positive_int.check(k, "k")
        check_divides(heads, channels)
        dropout_rate.check(dropout, "dropout")
        probability.check(lam, "lam")
        if semantic_branch not in SEMANTIC_BRANCHES:
            raise ValueError(
                f"semantic_branch must be one of {SEMANTIC_BRANCHES}, got {semantic_branch!r}"
            )
        if visual_graph not in VISUAL_GRAPHS:
            raise ValueError(f"visual_graph must be one of {VISUAL_GRAPHS}, got {visual_graph!r}")
        self.channels = channels
        self.heads = heads
        self.lam = lam
        self.semantic_branch = semantic_branch
        self.visual_graph = visual_graph
        self.k = k

        def attention() -> BatchGraphConv:
            return BatchGraphConv(
                channels, channels // heads, heads=heads, dropout=dropout,
                add_self_loops=add_self_loops, attention_path=attention_path,
            )

        if visual_graph == "knn":
            self.visual = attention()
        else:
            self.visual = TopKAttention(channels, channels // heads, heads=heads, k=k,
                                        dropout=dropout)
        self.semantic: nn.Module | None
        if lam == 1:  # weighs 0: neither built nor computed
            self.semantic = None
            self.register_load_state_dict_pre_hook(_drop_unweighted_semantic)
        elif semantic_branch == "attention":
            self.semantic = attention()
        elif semantic_branch == "propagation":
            self.semantic = GCNConv(channels, channels)
        else:
            self.semantic = SameLabelPropagation(channels)
        self.lin_out = nn.Linear(channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.visual.reset_parameters()
        if self.semantic is not None:
            self.semantic.reset_parameters()
        self.lin_out.reset_parameters()

    def forward(
        self,
        x: Tensor,
        visual_edge_index: Optional[Tensor] = None,
        semantic_edge_index: Optional[Tensor] = None,
        batch: Optional[Tensor] = None,
        batch_size: Optional[int] = None,
    ) -> Tensor:
        """``visual_edge_index`` is required by ``visual_graph="knn"`` and not read by
        ``"attention_topk"`` (which attends within each graph of ``batch``)."""
        if self.visual_graph == "knn":
            if visual_edge_index is None:
                raise ValueError('visual_edge_index is required with visual_graph="knn"')
            out = self.visual(x, visual_edge_index)
        else:
            out = self.visual(x, batch)
        if self.semantic is not None and _has_edges(semantic_edge_index):
            mixed = self.lam * out + (1.0 - self.lam) * self.semantic(x, semantic_edge_index)
            if batch is None:
                out = mixed
            else:
                keep = _graphs_with_edges(semantic_edge_index, batch, batch_size)
                out = torch.where(keep.unsqueeze(-1), mixed, out)
        return self.lin_out(out)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.channels}, heads={self.heads}, lam={self.lam}, "
            f"semantic_branch={self.semantic_branch!r}{_visual_graph_repr(self)})"
        )


def _drop_unweighted_semantic(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook of a :class:`DualSSA` without a semantic branch (λ = 1): drop the
    ``semantic.*`` weights that older versions built and weighted by 0 (loading the rest is
    exact: they never changed an output)."""
    for key in [k for k in state_dict if k.startswith(prefix + "semantic.")]:
        del state_dict[key]


class BGFormerLayer(nn.Module):
    r"""One pre-norm BGFormer block:

    .. math::
        \mathbf{h} &= \mathbf{x} + \mathrm{Dropout}(\mathrm{DualSSA}(
        \mathrm{GraphNorm}(\mathbf{x}), \mathcal{E}_{vis}, \mathcal{E}_{sem})) \\
        \mathbf{x}' &= \mathbf{h} + \mathrm{Dropout}(\mathrm{FFN}(\mathrm{GraphNorm}(\mathbf{h})))

    with FFN = Linear(C, rC) → GELU → Dropout → Linear(rC, C). ``GraphNorm`` normalises over the
    nodes of each graph in ``batch`` (all nodes when ``batch`` is ``None``) and keeps no running
    statistics, so outputs depend on the batch they are computed in, at test time too; for the
    same reason one NaN or inf input row makes every output row of its graph non-finite
    (:class:`~bgf_pyg.losses.BatchGraphLoss` refuses such features up front).

    Args:
        channels (int): Node feature width C.
        heads (int, optional): Attention heads. (default: :obj:`8`)
        ffn_ratio (int, optional): FFN expansion r. (default: :obj:`4`)
        dropout (float, optional): Dropout on attention, residual branches and the FFN.
            (default: :obj:`0.`)
        lam (float, optional): Visual-branch weight of :class:`DualSSA`. (default: :obj:`0.5`)
        **ssa_kwargs: ``semantic_branch``, ``add_self_loops``, ``attention_path``,
            ``visual_graph``, ``k`` of :class:`DualSSA`.
    """

    def __init__(
        self,
        channels: int,
        heads: int = 8,
        ffn_ratio: int = 4,
        dropout: float = 0.0,
        lam: float = defaults.LAM,
        **ssa_kwargs,
    ) -> None:
        super().__init__()
        positive_int.check(channels, "channels")
        positive_int.check(ffn_ratio, "ffn_ratio")
        dropout_rate.check(dropout, "dropout")
        self.channels = channels
        self.norm1 = GraphNorm(channels)
        self.attn = DualSSA(channels, heads=heads, dropout=dropout, lam=lam, **ssa_kwargs)
        self.norm2 = GraphNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, ffn_ratio * channels),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_ratio * channels, channels),
        )
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.norm1.reset_parameters()
        self.attn.reset_parameters()
        self.norm2.reset_parameters()
        for module in self.ffn:
            if isinstance(module, nn.Linear):
                module.reset_parameters()

    def forward(
        self,
        x: Tensor,
        visual_edge_index: Optional[Tensor] = None,
        semantic_edge_index: Optional[Tensor] = None,
        batch: Optional[Tensor] = None,
        batch_size: Optional[int] = None,
    ) -> Tensor:
        h = self.norm1(x, batch, batch_size)
        x = x + self.dropout(
            self.attn(h, visual_edge_index, semantic_edge_index, batch, batch_size)
        )
        h = self.norm2(x, batch, batch_size)
        return x + self.dropout(self.ffn(h))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.channels}, heads={self.attn.heads})"


class BGFormer(_TopKAlias, nn.Module):
    r"""A stack of :class:`BGFormerLayer` blocks refining a batch's embeddings.

    ``forward`` takes tensors ``(x, visual_edge_index, semantic_edge_index, batch)`` or a
    :class:`~bgf_pyg.BatchGraph` / PyG ``Batch`` of them. The authors' runs used depth 2, 8 heads
    and K ≈ 30 visual neighbours, chosen by their dynamic top-K attention
    (``visual_graph="attention_topk"``).

    Two visual graphs:

    - ``"knn"``: SSA on the given ``visual_edge_index``, e.g. the cosine kNN graph of the input
      features (:func:`~bgf_pyg.build_batch_graph`): fixed for the batch, shared by every head
      and layer. At test time: ``bgformer(x, knn_edge_index)``.
    - ``"attention_topk"``: in every layer and head each node attends to the ``k`` nodes of
      its graph with the largest attention scores :math:`q_i \cdot k_j / \sqrt{d}` (itself a
      candidate; all of them when ``k`` ≥ the graph's size), computed from that layer's own
      projections (:class:`~bgf_pyg.nn.TopKAttention`). ``visual_edge_index`` is not read (it may
      be ``None``): at test time ``bgformer(x)`` needs nothing but the features.

    Args:
        channels (int): Node feature width.
        num_layers (int, optional): Number of blocks. (default: :obj:`2`)
        heads, ffn_ratio, dropout, lam: as :class:`BGFormerLayer`.
        visual_graph (str, optional): ``"knn"`` or ``"attention_topk"``. (default: :obj:`"knn"`)
        k (int, optional): K of ``"attention_topk"``, the value that is ``k`` in
            :class:`~bgf_pyg.losses.BatchGraphLoss` (``topk=``: its deprecated former name).
            (default: :obj:`30`)
        \*\*ssa_kwargs: ``semantic_branch``, ``add_self_loops``, ``attention_path`` of
            :class:`DualSSA`.
    """

    def __init__(
        self,
        channels: int,
        num_layers: int = 2,
        heads: int = 8,
        ffn_ratio: int = 4,
        dropout: float = 0.0,
        lam: float = defaults.LAM,
        visual_graph: str = "knn",
        k: int = defaults.K,
        *,
        topk: Optional[int] = None,
        **ssa_kwargs,
    ) -> None:
        super().__init__()
        k = _k_or_topk(k, topk, BGFormer)
        positive_int.check(num_layers, "num_layers")
        self.channels = channels
        self.num_layers = num_layers
        self.heads = heads
        self.layers = nn.ModuleList(
            BGFormerLayer(channels, heads, ffn_ratio, dropout, lam, visual_graph=visual_graph,
                          k=k, **ssa_kwargs)
            for _ in range(num_layers)
        )
        self.visual_graph = visual_graph
        self.k = k

    @property
    def uses_semantic_edges(self) -> bool:
        """Whether any block has a semantic branch (λ < 1): without one, semantic edges are not
        read and need not be built."""
        return any(layer.attn.semantic is not None for layer in self.layers)

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()

    def forward(
        self,
        x: Union[Tensor, Data],
        visual_edge_index: Optional[Tensor] = None,
        semantic_edge_index: Optional[Tensor] = None,
        batch: Optional[Tensor] = None,
        batch_size: Optional[int] = None,
    ) -> Tensor:
        if isinstance(x, Data):
            graph = x
            x = graph.x
            visual_edge_index = graph.get("visual_edge_index")
            semantic_edge_index = graph.get("semantic_edge_index")
            batch = graph.get("batch")
            batch_size = graph.num_graphs if batch is not None else None
        if visual_edge_index is None and self.visual_graph == "knn":
            raise ValueError(
                "visual_edge_index is required with visual_graph=\"knn\" (pass it, or a "
                "BatchGraph / Batch that holds it)"
            )
        for layer in self.layers:
            x = layer(x, visual_edge_index, semantic_edge_index, batch, batch_size)
        return x

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.channels}, num_layers={self.num_layers}, "
            f"heads={self.heads}{_visual_graph_repr(self)})"
        )


def _visual_graph_repr(module: nn.Module) -> str:
    """``, visual_graph='attention_topk', k=K`` for the top-K form, nothing for kNN."""
    if module.visual_graph == "knn":
        return ""
    return f", visual_graph={module.visual_graph!r}, k={module.k}"
