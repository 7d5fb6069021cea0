"""DualSSA, BGFormerLayer and BGFormer against float64 re-statements, batching and compile."""

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch, Data

from bgf_pyg import build_batch_graph
from bgf_pyg.nn import BGFormer, BGFormerLayer, DualSSA
from tests.reference import graph_norm_reference, ssa_reference


def with_loops(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    return torch.cat([edge_index, torch.arange(num_nodes).repeat(2, 1)], dim=1)


def branch_reference(conv, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    h, c = conv.heads, conv.out_channels
    out, _ = ssa_reference(
        conv.lin_query(x).view(-1, h, c),
        conv.lin_key(x).view(-1, h, c),
        conv.lin_value(x).view(-1, h, c),
        with_loops(edge_index, x.size(0)),
    )
    return out.reshape(x.size(0), -1)


def dual_ssa_reference(module: DualSSA, x, visual, semantic) -> torch.Tensor:
    mixed = module.lam * branch_reference(module.visual, x, visual)
    mixed = mixed + (1 - module.lam) * branch_reference(module.semantic, x, semantic)
    return F.linear(mixed, module.lin_out.weight, module.lin_out.bias)


def random_batch_graph(num_nodes: int = 10, channels: int = 8, k: int = 3, dtype=torch.float64):
    x = torch.randn(num_nodes, channels, dtype=dtype)
    y = torch.randint(0, 3, (num_nodes,))
    return build_batch_graph(x, y, k=k)


def test_dual_ssa_mixes_the_two_branches():
    graph = random_batch_graph()
    module = DualSSA(8, heads=2, lam=0.3).double()
    out = module(graph.x, graph.visual_edge_index, graph.semantic_edge_index)
    expected = dual_ssa_reference(module, graph.x, graph.visual_edge_index,
                                  graph.semantic_edge_index)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


def test_dual_ssa_uses_the_visual_branch_alone_without_semantic_edges():
    graph = random_batch_graph()
    module = DualSSA(8, heads=2).double()
    visual_only = F.linear(
        branch_reference(module.visual, graph.x, graph.visual_edge_index),
        module.lin_out.weight, module.lin_out.bias,
    )
    for semantic in (None, torch.empty(2, 0, dtype=torch.long)):
        out = module(graph.x, graph.visual_edge_index, semantic)
        torch.testing.assert_close(out, visual_only, atol=1e-10, rtol=1e-10)


def test_propagation_semantic_branch_is_symmetric_normalised_propagation():
    graph = random_batch_graph()
    module = DualSSA(8, heads=2, lam=0.0, semantic_branch="propagation").double()
    adj = torch.eye(10, dtype=torch.float64)
    adj[graph.semantic_edge_index[1], graph.semantic_edge_index[0]] = 1.0
    deg = adj.sum(dim=1)
    norm_adj = adj / torch.sqrt(deg.unsqueeze(1) * deg.unsqueeze(0))
    lin = module.semantic.lin.weight
    expected = norm_adj @ (graph.x @ lin.t()) + module.semantic.bias
    expected = F.linear(expected, module.lin_out.weight, module.lin_out.bias)
    out = module(graph.x, graph.visual_edge_index, graph.semantic_edge_index)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


def test_layer_matches_pre_norm_reference():
    graph = random_batch_graph()
    layer = BGFormerLayer(8, heads=2, ffn_ratio=2).double()
    with torch.no_grad():
        for norm in (layer.norm1, layer.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
            norm.mean_scale.uniform_(0.5, 1.5)
    x, vis, sem = graph.x, graph.visual_edge_index, graph.semantic_edge_index

    def norm(module, t):
        return graph_norm_reference(t, module.weight, module.bias, module.mean_scale)

    h = x + dual_ssa_reference(layer.attn, norm(layer.norm1, x), vis, sem)
    lin1, lin2 = layer.ffn[0], layer.ffn[3]
    ffn = F.linear(F.gelu(F.linear(norm(layer.norm2, h), lin1.weight, lin1.bias)),
                   lin2.weight, lin2.bias)
    torch.testing.assert_close(layer(x, vis, sem), h + ffn, atol=1e-10, rtol=1e-10)


def test_batch_of_graphs_equals_each_graph_alone():
    graphs = [random_batch_graph(n, dtype=torch.float32) for n in (7, 12, 9)]
    model = BGFormer(8, num_layers=2, heads=2).eval()
    batched = model(Batch.from_data_list(graphs))
    alone = torch.cat([model(g) for g in graphs])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_permutation_equivariance():
    graph = random_batch_graph(12, dtype=torch.float32)
    model = BGFormer(8, num_layers=2, heads=2).eval()
    perm = torch.randperm(12)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(12)
    out = model(graph.x, graph.visual_edge_index, graph.semantic_edge_index)
    out_perm = model(graph.x[perm], inverse[graph.visual_edge_index],
                     inverse[graph.semantic_edge_index])
    torch.testing.assert_close(out_perm, out[perm], atol=1e-5, rtol=1e-4)


def test_gradcheck_layer():
    graph = random_batch_graph(6, 4, k=2)
    layer = BGFormerLayer(4, heads=2, ffn_ratio=2).double()
    x = graph.x.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: layer(t, graph.visual_edge_index, graph.semantic_edge_index), (x,)
    )


def test_bgformer_accepts_tensors_or_a_batch_graph_and_reprs():
    graph = random_batch_graph(dtype=torch.float32)
    model = BGFormer(8, num_layers=3, heads=4)
    assert str(model) == "BGFormer(8, num_layers=3, heads=4)"
    torch.testing.assert_close(
        model(graph), model(graph.x, graph.visual_edge_index, graph.semantic_edge_index)
    )
    with pytest.raises(ValueError, match="visual_edge_index is required"):
        model(graph.x)


def test_constructor_errors():
    with pytest.raises(ValueError, match="divisible by heads"):
        DualSSA(10, heads=3)
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        DualSSA(8, heads=2, lam=1.5)
    with pytest.raises(ValueError, match="semantic_branch"):
        DualSSA(8, heads=2, semantic_branch="gat")
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        BGFormer(8, num_layers=0)


def test_compiled_forward_backward_matches_eager():
    torch._dynamo.reset()
    x = torch.randn(16, 8)
    graph = build_batch_graph(x, torch.randint(0, 4, (16,)), k=3, loop=True)
    model = BGFormer(8, num_layers=1, heads=2, add_self_loops=False)
    args = (graph.visual_edge_index, graph.semantic_edge_index)
    x_eager = x.clone().requires_grad_()
    model(x_eager, *args).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model)
    x_compiled = x.clone().requires_grad_()
    out = compiled(x_compiled, *args)
    torch.testing.assert_close(out, model(x, *args), atol=1e-5, rtol=1e-4)
    out.square().sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, atol=1e-4, rtol=1e-4)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-4)


def test_bgformer_on_a_single_node_and_an_empty_batch():
    model = BGFormer(8, heads=2).eval()
    one = build_batch_graph(torch.randn(1, 8), torch.tensor([0]))
    assert torch.isfinite(model(one)).all()
    assert model(build_batch_graph(torch.randn(0, 8))).shape == (0, 8)


def test_bgformer_without_visual_edges_names_them():
    with pytest.raises(ValueError, match="visual_edge_index is required"):
        BGFormer(8, heads=2)(Data(x=torch.randn(3, 8)))


@pytest.mark.parametrize("semantic_branch", ["attention", "propagation"])
def test_bgformer_batch_equals_each_graph_alone(semantic_branch):
    torch.manual_seed(5)
    labelled = build_batch_graph(torch.randn(6, 8), torch.tensor([0, 0, 1, 1, 2, 2]), k=3)
    unlabelled = build_batch_graph(torch.randn(5, 8), torch.arange(5), k=3)  # no same-label pair
    assert labelled.num_semantic_edges > 0 and unlabelled.num_semantic_edges == 0
    model = BGFormer(8, heads=2, semantic_branch=semantic_branch).double().eval()
    for graphs in ([labelled, unlabelled], [unlabelled, labelled]):
        graphs = [g.clone() for g in graphs]
        for g in graphs:
            g.x = g.x.double()
        out = model(Batch.from_data_list(graphs))
        sizes = [g.num_nodes for g in graphs]
        for part, graph in zip(out.split(sizes), graphs, strict=True):
            torch.testing.assert_close(part, model(graph), atol=1e-12, rtol=1e-10)


def visual_only_reference(module: DualSSA, x, visual) -> torch.Tensor:
    return F.linear(branch_reference(module.visual, x, visual), module.lin_out.weight,
                    module.lin_out.bias)


def test_lam_one_builds_and_computes_no_semantic_branch():
    graph = random_batch_graph()
    module = DualSSA(8, heads=2, lam=1.0).double()
    assert module.semantic is None
    assert not any(name.startswith("semantic.") for name in module.state_dict())
    out = module(graph.x, graph.visual_edge_index, graph.semantic_edge_index)  # edges unread
    torch.testing.assert_close(out, visual_only_reference(module, graph.x,
                                                          graph.visual_edge_index),
                               atol=1e-10, rtol=1e-10)
    assert not BGFormer(8, heads=2, lam=1.0).uses_semantic_edges
    assert BGFormer(8, heads=2, lam=0.5).uses_semantic_edges


def test_lam_one_loads_weights_that_held_a_semantic_branch():
    graph = random_batch_graph()
    older = DualSSA(8, heads=2, lam=0.5).double()  # an older λ = 1 module built its branch
    older.lam = 1.0
    module = DualSSA(8, heads=2, lam=1.0).double()
    module.load_state_dict(older.state_dict())  # the unweighted branch's keys are dropped
    torch.testing.assert_close(
        module(graph.x, graph.visual_edge_index, graph.semantic_edge_index),
        older(graph.x, graph.visual_edge_index, graph.semantic_edge_index), atol=1e-10,
        rtol=1e-10)
