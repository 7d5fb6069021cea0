r"""The intra-batch message-passing network (MPN) baseline.

Seidenschwarz, Elezi and Leal-Taixé, `"Learning Intra-Batch Connections for Deep Metric Learning"
<https://arxiv.org/abs/2102.07753>`_, ICML 2021; original code ``dvl-tum/intra_batch``
(``net/gnn_base.py :: GNNReID``, ``net/attentions.py``, ``net/utils.py :: softmax``), which this
module follows operation by operation (see ``load_reference_state_dict``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.utils import scatter, softmax

from bgf_pyg.checks import check_divides, check_edge_index, check_features
from bgf_pyg.domains import dropout_rate, positive_int

# Standard deviation of the classifier weights' normal init in the original code.
_CLASSIFIER_INIT_STD = 0.001


def softmax_with_zero_logit(src: Tensor, index: Tensor, num_nodes: int) -> Tensor:
    r"""Sparse softmax over the entries of each group with one extra, implicit logit of 0:

    .. math::
        \alpha_e = \frac{\exp(s_e)}{1 + \sum_{e' : \mathrm{index}_{e'} = \mathrm{index}_e}
        \exp(s_{e'})},

    as ``net/utils.py :: softmax`` (margin 0) of the intra-batch code. The weights of a group sum to
    less than 1 (the phantom neighbour has value 0). Computed stably with
    :math:`m = \max(0, \max_{e'} s_{e'})` per group: :math:`\exp(s_e - m) / (\exp(-m) + \sum
    \exp(s_{e'} - m))`.

    Args:
        src (Tensor): scores of shape (E,) or (E, H).
        index (Tensor): group (target node) of every entry, shape (E,).
        num_nodes (int): number of groups.
    """
    # The shift only stabilises: the expression does not depend on m, so m needs no gradient.
    shift = scatter(src.detach(), index, dim=0, dim_size=num_nodes, reduce="max").clamp_min(0.0)
    out = (src - shift.index_select(0, index)).exp()
    denom = scatter(out, index, dim=0, dim_size=num_nodes, reduce="sum") + (-shift).exp()
    return out / denom.index_select(0, index)


class IntraBatchAttention(MessagePassing):
    r"""Multi-head dot-product attention over the edges of a batch graph, as the ``att`` module of
    the intra-batch MPN (Seidenschwarz et al., ICML 2021, ``net/attentions.py``):

    .. math::
        \mathbf{x}'_i = \mathbf{W}_o \mathop{\Big\Vert}_{h=1}^{H} \sum_{j \in \mathcal{N}(i)}
        \alpha_{ij}^h \mathbf{W}_v^h \mathbf{x}_j + \mathbf{b}_o, \qquad
        \alpha_{ij}^h = \frac{\exp(s_{ij}^h)}{1 + \sum_{l \in \mathcal{N}(i)} \exp(s_{il}^h)},
        \qquad s_{ij}^h = \frac{(\mathbf{W}_q^h \mathbf{x}_i)^\top (\mathbf{W}_k^h \mathbf{x}_j)}
        {\sqrt{d}},

    with :math:`d = D / H`, edges :math:`j \to i` and biases on :math:`\mathbf{W}_{q,k,v}`. The
    :math:`1 +` in the denominator is the original's implicit zero logit
    (:func:`softmax_with_zero_logit`); ``zero_logit=False`` uses a plain sparse softmax instead.
    Dropout acts on :math:`\alpha`. A node without in-edges gets :math:`\mathbf{b}_o`, never NaN.

    Args:
        channels (int): input and output width :math:`D`.
        heads (int, optional): number of heads :math:`H`, dividing :math:`D`. (default: :obj:`2`)
        dropout (float, optional): dropout on the attention weights; the original hard-codes 0.1.
            (default: :obj:`0.1`)
        zero_logit (bool, optional): add the implicit zero logit. (default: :obj:`True`)

    **Shapes:** input x :math:`(|V|, D)`, edge_index :math:`(2, |E|)` (row 0 = source, row 1 =
    target) → :math:`(|V|, D)`.
    """

    def __init__(
        self, channels: int, heads: int = 2, dropout: float = 0.1, zero_logit: bool = True
    ) -> None:
        super().__init__(aggr="add", node_dim=0)
        self.channels = positive_int.check(channels, "channels")
        self.heads = positive_int.check(heads, "heads")
        check_divides(heads, channels)
        self.dropout = dropout_rate.check(dropout, "dropout")
        self.zero_logit = zero_logit
        self.lin_query = nn.Linear(channels, channels)
        self.lin_key = nn.Linear(channels, channels)
        self.lin_value = nn.Linear(channels, channels)
        self.lin_out = nn.Linear(channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for lin in (self.lin_query, self.lin_key, self.lin_value, self.lin_out):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        check_features(x, "x", width=self.channels, finite=False)
        check_edge_index(edge_index, x.size(0))
        shape = (-1, self.heads, self.channels // self.heads)
        query = self.lin_query(x).view(shape)
        key = self.lin_key(x).view(shape)
        value = self.lin_value(x).view(shape)
        out = self.propagate(edge_index, query=query, key=key, value=value)
        return self.lin_out(out.reshape(-1, self.channels))

    def message(
        self, query_i: Tensor, key_j: Tensor, value_j: Tensor, index: Tensor, size_i: int | None
    ) -> Tensor:
        score = (query_i * key_j).sum(dim=-1) / math.sqrt(query_i.size(-1))
        if self.zero_logit:
            alpha = softmax_with_zero_logit(score, index, size_i)
        else:
            alpha = softmax(score, index, num_nodes=size_i)
        alpha = F.dropout(alpha, p=self.dropout, training=self.training)
        return value_j * alpha.unsqueeze(-1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.channels}, heads={self.heads})"


class IntraBatchLayer(nn.Module):
    r"""One post-norm layer of the intra-batch MPN (``net/gnn_base.py :: DotAttentionLayer``):

    .. math::
        \mathbf{h}' = \mathrm{LN}_1(\mathbf{h} + \mathrm{Dropout}(\mathrm{Att}(\mathbf{h}))),
        \qquad \mathbf{h}'' = \mathrm{LN}_2(\mathbf{h}' + \mathrm{Dropout}(\mathbf{W}_2\,
        \mathrm{Dropout}(\mathrm{ReLU}(\mathbf{W}_1 \mathbf{h}')))),

    with :class:`IntraBatchAttention` as Att and an FFN of width ``ffn_ratio`` · D.
    """

    def __init__(
        self, channels: int, heads: int = 2, dropout: float = 0.1, ffn_ratio: int = 4
    ) -> None:
        super().__init__()
        positive_int.check(ffn_ratio, "ffn_ratio")
        self.attn = IntraBatchAttention(channels, heads, dropout)
        self.lin1 = nn.Linear(channels, ffn_ratio * channels)
        self.lin2 = nn.Linear(ffn_ratio * channels, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.norm2 = nn.LayerNorm(channels)
        self.dropout = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        for module in (self.attn, self.lin1, self.lin2, self.norm1, self.norm2):
            module.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout(self.attn(x, edge_index)))
        ffn = self.lin2(self.dropout(F.relu(self.lin1(x))))
        return self.norm2(x + self.dropout(ffn))


class IntraBatchMPN(nn.Module):
    r"""The message-passing network of `"Learning Intra-Batch Connections for Deep Metric Learning"
    <https://arxiv.org/abs/2102.07753>`_ (Seidenschwarz et al., ICML 2021), faithful to the
    original ``GNNReID`` of ``dvl-tum/intra_batch``:

    .. math::
        \mathbf{h}^{(0)} = \mathbf{W}_r \mathbf{x} + \mathbf{b}_r, \qquad
        \mathbf{h}^{(\ell)} = \mathrm{Layer}_\ell(\mathbf{h}^{(\ell-1)}), \qquad
        \mathrm{logits} = \mathbf{W}_c\, \mathrm{BN}(\mathbf{h}^{(L)}),

    where each layer is an :class:`IntraBatchLayer` (zero-logit attention, post-norm, FFN of
    width 4·D), BN is ``BatchNorm1d`` with its bias frozen at 0 (the "BNNeck") and
    :math:`\mathbf{W}_c` has no bias and is drawn from :math:`\mathcal{N}(0, 0.001^2)`. With
    ``cat=True`` the classifier sees :math:`\Vert_\ell \mathbf{h}^{(\ell)}` (width L·D).

    The original feeds the complete graph over the batch, self-loops included
    (``edge_index=None`` here), built from L2-normalised backbone features (normalising is the
    caller's job). Differences from the original: one ``dropout`` sets all four dropouts (the
    original hard-codes 0.1 on the attention weights and reads 0.1 for the others from its
    config); ``h`` is returned un-normalised (the original's ``"plain"`` output L2-normalises it;
    call ``F.normalize`` if needed); logits are a tensor, not a one-element list; the original's
    unused options (``every``, edge weights, other aggregators) are not offered.

    Args:
        in_channels (int, optional): feature width D. (default: :obj:`512`)
        num_layers (int, optional): number of layers L. (default: :obj:`1`)
        heads (int, optional): attention heads, dividing D. (default: :obj:`2`)
        dropout (float, optional): dropout probability. (default: :obj:`0.1`)
        num_classes (int, optional): classes of the BNNeck classifier; no classifier when
            :obj:`None`. (default: :obj:`None`)
        cat (bool, optional): concatenate every layer's output. (default: :obj:`False`)

    **Shapes:** input x :math:`(N, D)`, edge_index :math:`(2, |E|)` or :obj:`None` →
    logits :math:`(N, C)` or :obj:`None`, h :math:`(N, D)` (:math:`(N, L \cdot D)` when ``cat``).
    """

    def __init__(
        self,
        in_channels: int = 512,
        num_layers: int = 1,
        heads: int = 2,
        dropout: float = 0.1,
        num_classes: int | None = None,
        cat: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = positive_int.check(in_channels, "in_channels")
        self.num_layers = positive_int.check(num_layers, "num_layers")
        self.heads = positive_int.check(heads, "heads")
        check_divides(heads, in_channels, channels_name="in_channels")
        dropout_rate.check(dropout, "dropout")
        self.num_classes = None if num_classes is None else positive_int.check(
            num_classes, "num_classes"
        )
        self.cat = cat
        self.dim_red = nn.Linear(in_channels, in_channels)
        self.layers = nn.ModuleList(
            IntraBatchLayer(in_channels, heads, dropout) for _ in range(num_layers)
        )
        self.out_channels = in_channels * num_layers if cat else in_channels
        self.bottleneck: nn.BatchNorm1d | None = None
        self.classifier: nn.Linear | None = None
        if num_classes is not None:
            self.bottleneck = nn.BatchNorm1d(self.out_channels)
            self.bottleneck.bias.requires_grad_(False)
            self.classifier = nn.Linear(self.out_channels, num_classes, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.dim_red.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()
        if self.bottleneck is not None and self.classifier is not None:
            self.bottleneck.reset_parameters()
            nn.init.normal_(self.classifier.weight, std=_CLASSIFIER_INIT_STD)

    def forward(self, x: Tensor, edge_index: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
        """Return ``(logits, h)``; ``edge_index=None`` is the complete graph with self-loops."""
        # The BNNeck's batch statistics need two samples; say so before any work is done.
        training_bn = self.training and self.bottleneck is not None
        check_features(
            x, "x", width=self.in_channels, min_rows=2 if training_bn else 0,
            purpose="in training mode (the BNNeck's BatchNorm1d needs batch statistics)",
        )
        if edge_index is None:
            edge_index = complete_edge_index(x.size(0), x.device)
        else:
            check_edge_index(edge_index, x.size(0))
        h = self.dim_red(x)
        outs = []
        for layer in self.layers:
            h = layer(h, edge_index)
            outs.append(h)
        if self.cat:
            h = torch.cat(outs, dim=-1)
        logits = None
        if self.bottleneck is not None and self.classifier is not None:
            logits = self.classifier(self.bottleneck(h))
        return logits, h

    def _reference_keys(self) -> dict[str, str]:
        """Map every key of the original ``GNNReID`` state dict to ours."""
        names = {"dim_red.weight": "dim_red.weight", "dim_red.bias": "dim_red.bias"}
        att = {"q_linear": "lin_query", "k_linear": "lin_key", "v_linear": "lin_value",
               "out": "lin_out"}
        sub = {**{f"att.{k}": f"attn.{v}" for k, v in att.items()},
               "linear1": "lin1", "linear2": "lin2", "norm1": "norm1", "norm2": "norm2"}
        for i in range(self.num_layers):
            for ref, ours in sub.items():
                for p in ("weight", "bias"):
                    names[f"gnn_model.node_model.layers.{i}.{ref}.{p}"] = f"layers.{i}.{ours}.{p}"
        if self.bottleneck is not None:
            for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                names[f"bottleneck.0.{p}"] = f"bottleneck.{p}"
            names["fc.0.weight"] = "classifier.weight"
        return names

    def load_reference_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a state dict of the original ``dvl-tum/intra_batch`` ``GNNReID`` (e.g. from its
        released checkpoints) built with the same width, layers and classes.

        Raises ``KeyError`` naming every missing and unexpected key, ``ValueError`` naming every
        shape mismatch.
        """
        names = self._reference_keys()
        missing = sorted(set(names) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(names))
        if missing or unexpected:
            raise KeyError(
                f"reference state dict does not match IntraBatchMPN(num_layers={self.num_layers}, "
                f"num_classes={self.num_classes}): missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        own = self.state_dict()
        bad = [
            f"{ref}: expected {tuple(own[ours].shape)}, got {tuple(state_dict[ref].shape)}"
            for ref, ours in names.items()
            if own[ours].shape != state_dict[ref].shape
        ]
        if bad:
            raise ValueError("reference state dict has shape mismatches: " + "; ".join(bad))
        self.load_state_dict({ours: state_dict[ref] for ref, ours in names.items()})

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, num_layers={self.num_layers}, "
            f"heads={self.heads}, num_classes={self.num_classes}, cat={self.cat})"
        )


def complete_edge_index(num_nodes: int, device: torch.device | None = None) -> Tensor:
    """All ``num_nodes``² ordered pairs, self-loops included, as a (2, N²) edge list (row 0 =
    source, row 1 = target), in the row-major source order of the original code."""
    nodes = torch.arange(num_nodes, device=device)
    return torch.stack([nodes.repeat_interleave(num_nodes), nodes.repeat(num_nodes)])
