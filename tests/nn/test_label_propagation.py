"""The authors' semantic branch (label propagation D^-1(A_same + I) W x) against a dense float64
re-statement built from the labels alone."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize(("channels", "error", "match"), [
    (0, ValueError, "channels must be >= 1, got 0"),
    (-1, ValueError, "channels must be >= 1, got -1"),
    (2.5, TypeError, "channels must be an int >= 1, got float 2.5"),
    (True, TypeError, "channels must be an int"),
])
def test_bad_channels_are_refused(channels, error, match):
    with pytest.raises(error, match=match):
        SameLabelPropagation(channels)


@pytest.mark.parametrize(("x", "edge_index", "error", "match"), [
    (torch.randn(4, 5), None, ValueError, r"x must have 6 columns, got shape \(4, 5\)"),
    (torch.randn(4), None, ValueError, r"x must be a 2-D tensor of shape \(N, D\)"),
    (torch.randn(2, 4, 6), None, ValueError, r"x must be a 2-D tensor"),
    (torch.ones(4, 6, dtype=torch.long), None, TypeError, "x must be a floating-point tensor"),
    ([[0.0] * 6] * 4, None, TypeError, "x must be a torch.Tensor"),
    (torch.randn(4, 6), torch.tensor([[0, 1, 2]]), ValueError,
     r"edge_index must have shape \(2, E\)"),
    (torch.randn(4, 6), torch.tensor([[0, 4], [1, 0]]), ValueError,
     r"edge_index\[0\] \(sources\) must lie in \[0, 4\)"),
    (torch.randn(4, 6), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), TypeError,
     "edge_index must be an int64"),
])
def test_bad_inputs_name_the_argument(x, edge_index, error, match):
    edge_index = torch.tensor([[0, 1], [1, 0]]) if edge_index is None else edge_index
    with pytest.raises(error, match=match):
        SameLabelPropagation(6)(x, edge_index)
