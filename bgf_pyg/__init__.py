"""bgf_pyg: batch-graph metric learning for PyTorch Geometric.

Each mini-batch of embeddings becomes a :class:`BatchGraph` (visual kNN edges and semantic
same-label edges); :class:`~bgf_pyg.nn.BatchGraphConv` runs structure-constrained
self-attention on it and :class:`~bgf_pyg.nn.BGFormer` stacks it into the BGFormer block.
"""

from .graph import BatchGraph, build_batch_graph

__version__ = "0.1.0"

__all__ = ["BatchGraph", "build_batch_graph", "__version__"]
