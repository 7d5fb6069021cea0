"""Attention statistics of BGFormer's graph blocks: is the graph doing anything?

The mean entropy of a node's attention over its in-edges tells: near the entropy of uniform
attention (log in-degree) the block averages its neighbours; well below it, it picks a few.
:class:`AttentionEntropy` records it for the visual and semantic branch of every
:class:`~bgf_pyg.nn.DualSSA` of a model, only while it is active, so a training loop pays for it
on the steps it logs and on no other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.utils import degree, scatter

from .bgformer import DualSSA
from .conv import BatchGraphConv


def attention_entropy(alpha: Tensor, index: Tensor, num_nodes: int) -> tuple[float, float]:
    r"""Mean attention entropy :math:`-\sum_j \alpha_{ij} \log \alpha_{ij}` over the target nodes
    with in-edges and the heads, and the same mean for uniform attention (:math:`\log`
    in-degree), for edge weights ``alpha`` (E, H) whose targets are ``index`` (E,)."""
    alpha = alpha.detach().float()
    # 0 · log 0 = 0: a masked-out edge adds nothing.
    terms = -(alpha * alpha.clamp_min(torch.finfo(alpha.dtype).tiny).log())
    entropy = scatter(terms, index, dim=0, dim_size=num_nodes, reduce="sum")
    in_degree = degree(index, num_nodes, dtype=alpha.dtype)
    has_edges = in_degree > 0
    return (float(entropy[has_edges].mean()), float(in_degree[has_edges].log().mean()))


class AttentionEntropy:
    """Records the mean attention entropy of each attention branch of every :class:`DualSSA` in
    ``module`` (named ``layer{l}/visual``, ``layer{l}/semantic``, in module order) during the
    forward passes between :meth:`start` and :meth:`stop`.

    While active, a forward hook re-runs each branch under ``no_grad`` in eval mode with
    ``return_attention_weights=True`` (eval mode: the softmax before attention dropout, and no
    random numbers drawn, so training itself is unchanged). Inactive, no hook is installed.
    A ``"propagation"`` semantic branch has no attention and is skipped, and so (not yet recorded)
    is a :class:`~bgf_pyg.nn.TopKAttention` visual branch (``visual_graph="attention_topk"``).
    """

    def __init__(self, module: nn.Module) -> None:
        self.branches: dict[str, BatchGraphConv] = {}
        duals = [m for m in module.modules() if isinstance(m, DualSSA)]
        for layer, dual in enumerate(duals):
            for kind in ("visual", "semantic"):
                conv = getattr(dual, kind)
                if isinstance(conv, BatchGraphConv):
                    self.branches[f"layer{layer}/{kind}"] = conv
        self._handles: list = []
        self._values: dict[str, tuple[float, float]] = {}
        self._busy = False

    def start(self) -> None:
        """Record from the next forward pass on."""
        self._values = {}
        if not self._handles:
            self._handles = [conv.register_forward_hook(self._hook(name), with_kwargs=True)
                             for name, conv in self.branches.items()]

    def stop(self) -> dict[str, tuple[float, float]]:
        """Stop recording; ``{name: (mean entropy, uniform-attention entropy)}`` of the last
        forward pass of each branch."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self._values

    def _hook(self, name: str):
        def hook(conv: BatchGraphConv, args: tuple, kwargs: dict, output) -> None:
            if self._busy:  # the re-run below passes through this hook too
                return
            x, edge_index = args[0], args[1]  # DualSSA calls its branches positionally
            if not isinstance(edge_index, Tensor) or edge_index.is_sparse:
                return
            self._busy, training = True, conv.training
            try:
                conv.eval()
                with torch.no_grad():
                    _, (edges, alpha) = conv(*args[:3], return_attention_weights=True)
            finally:
                conv.train(training)
                self._busy = False
            num_nodes = x.size(0) if isinstance(x, Tensor) else x[1].size(0)
            self._values[name] = attention_entropy(alpha, edges[1], num_nodes)

        return hook
