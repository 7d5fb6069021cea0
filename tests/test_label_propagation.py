"""The authors' semantic branch (label propagation D^-1(A_same + I) W x) against a dense float64
re-statement built from the labels alone."""

from __future__ import annotations

import torch

from bgf_pyg import build_batch_graph
from bgf_pyg.nn import DualSSA
from bgf_pyg.nn.label_propagation import SameLabelPropagation


def dense_propagation(x, labels, weight, bias):
    same = (labels[:, None] == labels[None, :]).double()  # diagonal included
    adj = same + torch.eye(len(labels), dtype=torch.float64)
    adj = adj / adj.sum(dim=1, keepdim=True)
    return adj @ (x @ weight.t() + bias)


def test_label_propagation_matches_dense_reference():
    torch.manual_seed(0)
    labels = torch.tensor([3, 1, 3, 3, 1, 7, 1, 3])  # unequal class sizes, a singleton
    x = torch.randn(len(labels), 16, dtype=torch.float64)
    conv = SameLabelPropagation(16).double()
    edges = build_batch_graph(x, labels, k=2).semantic_edge_index
    ref = dense_propagation(x, labels, conv.lin.weight, conv.lin.bias)
    torch.testing.assert_close(conv(x, edges), ref)
    # self-loops in the edge list do not count twice
    loops = torch.arange(len(labels)).repeat(2, 1)
    torch.testing.assert_close(conv(x, torch.cat([edges, loops], 1)), ref)


def test_p_by_m_batch_weights():
    """In a P × m batch: self weight 2/(m+1), each mate 1/(m+1)."""
    m = 4
    labels = torch.arange(3).repeat_interleave(m)
    conv = SameLabelPropagation(5, bias=False).double()
    conv.lin.weight.data = torch.eye(5, dtype=torch.float64)
    x = torch.randn(len(labels), 5, dtype=torch.float64)
    out = conv(x, build_batch_graph(x, labels, k=1).semantic_edge_index)
    expected = (2 * x[0] + x[1] + x[2] + x[3]) / (m + 1)
    torch.testing.assert_close(out[0], expected)


def test_dual_ssa_semantic_only_is_projected_propagation():
    torch.manual_seed(1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    x = torch.randn(len(labels), 8, dtype=torch.float64)
    ssa = DualSSA(8, heads=2, lam=0.0, semantic_branch="label_propagation").double()
    graph = build_batch_graph(x, labels, k=2)
    out = ssa(x, graph.visual_edge_index, graph.semantic_edge_index)
    sem = ssa.semantic.lin
    ref = dense_propagation(x, labels, sem.weight, sem.bias) @ ssa.lin_out.weight.t()
    torch.testing.assert_close(out, ref + ssa.lin_out.bias)
