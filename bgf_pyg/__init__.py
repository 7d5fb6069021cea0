"""bgf_pyg: batch-graph metric learning for PyTorch Geometric.

Each mini-batch of embeddings becomes a :class:`BatchGraph` (visual kNN edges and semantic
same-label edges); :class:`~bgf_pyg.nn.BatchGraphConv` runs structure-constrained
self-attention on it and :class:`~bgf_pyg.nn.BGFormer` stacks it into the BGFormer block.
"""

import warnings

with warnings.catch_warnings():
    # PyG 2.8 scripts a few pooling helpers at import time, which torch ≥ 2.9 reports as deprecated
    # on every start; users cannot act on it, so it is silenced for that one import only.
    warnings.filterwarnings(
        "ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning
    )
    import torch_geometric  # noqa: F401

from .graph import BatchGraph, build_batch_graph  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BatchGraph", "build_batch_graph", "__version__"]
