"""The optimiser factory: the originals' optimisers over a :class:`~bgf_pyg.models.Method`'s
parameter groups (:meth:`~bgf_pyg.models.Method.param_groups`)."""

from __future__ import annotations

import torch

from .methods import Method

#: The originals' optimisers: AdamW (BGFormer's authors), Adam with coupled L2 weight decay
#: (ProxyGML), RAdam with decoupled weight decay (intra-batch; its RAdam.py matches torch's).
OPTIMIZERS = ("adamw", "adam", "radam")


def build_optimizer(
    method: Method,
    lr: float,
    proxy_lr: float,
    weight_decay: float = 0.0,
    *,
    graph_lr: float | None = None,
    backbone_lr: float | None = None,
    name: str = "adamw",
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """``name`` (see :data:`OPTIMIZERS`) over ``method.param_groups(lr, proxy_lr, graph_lr,
    backbone_lr)``."""
    groups = method.param_groups(lr, proxy_lr, graph_lr, backbone_lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay, eps=eps)
    if name == "adam":
        return torch.optim.Adam(groups, weight_decay=weight_decay, eps=eps)
    if name == "radam":
        return torch.optim.RAdam(groups, weight_decay=weight_decay, eps=eps,
                                 decoupled_weight_decay=True)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
