"""ProjectedGraph: a graph module run at its own width between two projections."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bgf_pyg import build_batch_graph
from bgf_pyg.nn import BGFormer, ProjectedGraph


def test_projects_in_runs_the_graph_and_projects_out():
    torch.manual_seed(0)
    x = torch.randn(10, 12, dtype=torch.float64)
    graph = build_batch_graph(x, torch.arange(5).repeat(2), k=3)
    inner = BGFormer(8, heads=2, lam=0.5).double()
    module = ProjectedGraph(12, inner).double()
    out = module(x, graph.visual_edge_index, graph.semantic_edge_index)
    hidden = F.linear(x, module.lin_in.weight, module.lin_in.bias)
    refined = inner(hidden, graph.visual_edge_index, graph.semantic_edge_index)
    expected = F.linear(refined, module.lin_out.weight, module.lin_out.bias)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert out.shape == x.shape and module.channels == 12


def test_reads_the_graph_modules_attributes():
    topk = ProjectedGraph(12, BGFormer(8, heads=2, lam=1.0, visual_graph="attention_topk"))
    assert topk.visual_graph == "attention_topk" and not topk.uses_semantic_edges
    knn = ProjectedGraph(12, BGFormer(8, heads=2))
    assert knn.visual_graph == "knn" and knn.uses_semantic_edges
    assert repr(knn).startswith("ProjectedGraph(12, BGFormer(8,")


def test_a_graph_module_without_a_width_is_refused():
    with pytest.raises(TypeError, match="graph must have an int attribute channels"):
        ProjectedGraph(12, torch.nn.Identity())
