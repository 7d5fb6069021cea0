r"""The semantic branch of BGFormer's authors: label propagation over the same-class graph.

Read from the first author's related SGFormer module (``SissiW/DyBGR``, ``Attention_SG``; see
``docs/design.rst`` §5): a single linear projection, then
:math:`\hat A = D^{-1}(A_{same} + I)` with :math:`A_{same}[i, j] = 1` when :math:`y_i = y_j`,
*including* :math:`i = j`, so a node's self weight is :math:`2 / (n_i + 1)` and each of its
:math:`n_i - 1` same-class mates gets :math:`1 / (n_i + 1)` (:math:`n_i` = size of its class in
the batch). In a P × m batch the row and the symmetric normalisation coincide.
"""

from __future__ import annotations

from torch import Tensor
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.dense.linear import Linear
from torch_geometric.utils import degree, remove_self_loops

from ..checks import check_edge_index, check_features
from ..domains import positive_int

#: Weight of a node on itself in A_same + I (once from A_same's diagonal, once from I).
SELF_WEIGHT = 2.0


class SameLabelPropagation(MessagePassing):
    r"""Label propagation :math:`\mathbf{x}'_i = \frac{1}{n_i + 1}\big(2\,\mathbf{W}\mathbf{x}_i
    + \sum_{j \in \mathcal{N}(i)} \mathbf{W}\mathbf{x}_j\big)` over the semantic (same-label)
    edges :math:`j \to i`, :math:`j \ne i` (self-loops in ``edge_index`` are dropped: the self
    term is added here), where :math:`n_i - 1 = |\mathcal{N}(i)|`.

    Args:
        channels (int): Input and output width.
        bias (bool, optional): Bias of :math:`\mathbf{W}` (the authors' ``qkv_bias=True``).
            (default: :obj:`True`)

    **Shapes:** x :math:`(|V|, C)`, edge_index :math:`(2, |E|)` → :math:`(|V|, C)`.
    """

    def __init__(self, channels: int, bias: bool = True) -> None:
        super().__init__(aggr="add")
        self.channels = positive_int.check(channels, "channels")
        self.lin = Linear(channels, channels, bias=bias, weight_initializer="glorot")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.lin.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        check_features(x, "x", width=self.channels, finite=False)
        check_edge_index(edge_index, x.size(0), name="edge_index")
        edge_index, _ = remove_self_loops(edge_index)
        h = self.lin(x)
        neighbours = self.propagate(edge_index, x=h)
        deg = degree(edge_index[1], x.size(0), dtype=h.dtype)
        return (SELF_WEIGHT * h + neighbours) / (deg + SELF_WEIGHT).unsqueeze(-1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.channels})"
