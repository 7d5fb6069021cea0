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
from .topk_attention import TopKAttention


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
    Both visual forms are recorded: SSA on the kNN graph (:class:`BatchGraphConv`) and the
    dynamic top-K attention (:class:`~bgf_pyg.nn.TopKAttention`, whose uniform bound is
    log K). A ``"propagation"`` semantic branch has no attention and is skipped, and so is a
    branch that is not built (λ = 1).
    """

    def __init__(self, module: nn.Module) -> None:
        self.branches: dict[str, BatchGraphConv | TopKAttention] = {}
        duals = [m for m in module.modules() if isinstance(m, DualSSA)]
        for layer, dual in enumerate(duals):
            for kind in ("visual", "semantic"):
                branch = getattr(dual, kind)
                if isinstance(branch, BatchGraphConv | TopKAttention):
                    self.branches[f"layer{layer}/{kind}"] = branch
        self._handles: list = []
        self._values: dict[str, tuple[float, float]] = {}
        self._busy = False

    def start(self) -> None:
        """Record from the next forward pass on."""
        self._values = {}
        if not self._handles:
            self._handles = [branch.register_forward_hook(self._hook(name), with_kwargs=True)
                             for name, branch in self.branches.items()]

    def stop(self) -> dict[str, tuple[float, float]]:
        """Stop recording; ``{name: (mean entropy, uniform-attention entropy)}`` of the last
        forward pass of each branch."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self._values

    def _hook(self, name: str):
        def hook(branch: nn.Module, args: tuple, kwargs: dict, output) -> None:
            if self._busy:  # the re-run below passes through this hook too
                return
            x = args[0]  # DualSSA calls its branches positionally
            if isinstance(branch, TopKAttention):
                inputs = args[:2]  # (x, batch)
            else:
                inputs = args[:3]  # (x, edge_index, edge_attr)
                if not isinstance(args[1], Tensor) or args[1].is_sparse:
                    return
            self._busy, training = True, branch.training
            try:
                branch.eval()
                with torch.no_grad():
                    _, (edges, alpha) = branch(*inputs, return_attention_weights=True)
            finally:
                branch.train(training)
                self._busy = False
            # a top-K branch's edges are (2, E, H), the same targets in every head
            targets = edges[1] if edges.dim() == 2 else edges[1, :, 0]
            num_nodes = x.size(0) if isinstance(x, Tensor) else x[1].size(0)
            self._values[name] = attention_entropy(alpha, targets, num_nodes)

        return hook
