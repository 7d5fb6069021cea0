"""A graph module run at a narrower width than the features it refines, projected on its own side.

ResNet-50's 2048-d features make a wide BGFormer. Projecting them before the head would put the
projection into the test-time network ``head(proj(trunk(x)))``, which a method without a graph
module does not have. Here the projection belongs to the graph module alone: in-projection →
graph module → out-projection, beside the test path, so ``head(trunk(x))`` stays the test-time
network whatever the graph's width.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..domains import positive_int


class ProjectedGraph(nn.Module):
    r"""A graph module of width :math:`d` refining :math:`C`-wide features:

    .. math::
        \mathbf{x}' = \mathbf{W}_{out}\, \mathrm{graph}(\mathbf{W}_{in} \mathbf{x}
        + \mathbf{b}_{in}) + \mathbf{b}_{out}

    Called like the graph module itself (every argument after ``x`` is passed on), e.g. by
    :class:`~bgf_pyg.losses.BatchGraphLoss`, which reads the attributes below.

    Args:
        channels (int): Width :math:`C` of the input features and of the output.
        graph (nn.Module): The graph module, e.g. :class:`~bgf_pyg.nn.BGFormer`; its
            ``channels`` attribute is its width :math:`d`.

    Attributes:
        visual_graph, uses_semantic_edges: the graph module's (``"knn"`` and :obj:`True` when
            it has none).

    **Shapes:** x (N, C) → (N, C).
    """

    def __init__(self, channels: int, graph: nn.Module) -> None:
        super().__init__()
        self.channels = positive_int.check(channels, "channels")
        if not isinstance(getattr(graph, "channels", None), int):
            raise TypeError(f"graph must have an int attribute channels (its width), got "
                            f"{type(graph).__name__}")
        width = positive_int.check(graph.channels, "graph.channels")
        self.lin_in = nn.Linear(channels, width)
        self.graph = graph
        self.lin_out = nn.Linear(width, channels)

    @property
    def visual_graph(self) -> str:
        return getattr(self.graph, "visual_graph", "knn")

    @property
    def uses_semantic_edges(self) -> bool:
        return getattr(self.graph, "uses_semantic_edges", True)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.lin_out(self.graph(self.lin_in(x), *args, **kwargs))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.channels}, {self.graph!r})"
