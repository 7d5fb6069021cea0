"""The attention path a ``BatchGraphConv`` takes, asked of the one function that decides it."""

from typing import Optional

import torch

from bgf_pyg.nn import BatchGraphConv
from bgf_pyg.nn.kernels.ssa import Route, select_path


def layer_route(
    conv: BatchGraphConv,
    x: torch.Tensor,
    edge_index: torch.Tensor,
    path: Optional[str] = None,
    edge_features: bool = False,
) -> Route:
    """:func:`select_path` on ``conv``'s projected queries with its ``add_self_loops``, for
    ``path`` (default: the layer's ``attention_path``); a path that cannot run raises."""
    query = conv.lin_query(x).view(-1, conv.heads, conv.out_channels)
    return select_path(
        query, edge_index, x.size(0), path=path or conv.attention_path,
        edge_features=edge_features, add_self_loops=conv.add_self_loops,
    )
