"""BatchGraphConv against an edge-by-edge float64 reference, PyG's TransformerConv (its weights
load both ways), and itself across adjacency layouts (edge lists, torch.sparse, SparseTensor) and
attention paths: the fast paths (regular kNN layout, dense, auto) equal the generic sparse path,
the layer compiles without graph breaks, a NaN feature reaches exactly its attention
neighbourhood, and PyG's explainers read every path."""

import copy
import math
import shutil

import pytest
import torch
import torch_geometric.typing
from torch_geometric.explain import Explainer, GNNExplainer
from torch_geometric.explain.algorithm import AttentionExplainer
from torch_geometric.nn import TransformerConv
from torch_geometric.utils import to_torch_coo_tensor, to_torch_csc_tensor, to_torch_csr_tensor

import bgf_pyg.nn.conv as conv_module
from bgf_pyg.graph import knn_edges
from bgf_pyg.nn import BatchGraphConv
from bgf_pyg.nn.kernels.ssa import ssa_attention
from tests.nn.routes import layer_route
from tests.reference import ssa_reference


def random_graph(num_nodes: int = 12, num_edges: int = 40, isolated: int = 2) -> torch.Tensor:
    """Random directed edges with duplicates and self-loops; the last ``isolated`` nodes have no
    in-edges."""
    src = torch.randint(0, num_nodes, (num_edges,))
    dst = torch.randint(0, num_nodes - isolated, (num_edges,))
    edge_index = torch.stack([src, dst])
    loops = torch.arange(3).repeat(2, 1)
    duplicates = edge_index[:, :5]
    return torch.cat([edge_index, loops, duplicates], dim=1)


def projections(conv: BatchGraphConv, x: torch.Tensor):
    h, c = conv.heads, conv.out_channels
    return (
        conv.lin_query(x).view(-1, h, c),
        conv.lin_key(x).view(-1, h, c),
        conv.lin_value(x).view(-1, h, c),
    )


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("concat", [True, False])
def test_matches_reference_without_self_loops(path, concat):
    x = torch.randn(12, 6, dtype=torch.float64)
    edge_index = random_graph()
    conv = BatchGraphConv(6, 4, heads=3, concat=concat, add_self_loops=False, attention_path=path)
    conv = conv.double()
    out, (ei, alpha) = conv(x, edge_index, return_attention_weights=True)
    ref, ref_weights = ssa_reference(*projections(conv, x), edge_index)
    ref = ref.reshape(12, -1) if concat else ref.mean(dim=1)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    assert torch.equal(ei, edge_index)
    for e, weight in ref_weights.items():
        torch.testing.assert_close(alpha[e], weight, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_self_loops_replace_existing_ones(path):
    x = torch.randn(12, 6, dtype=torch.float64)
    edge_index = random_graph()
    conv = BatchGraphConv(6, 4, heads=2, attention_path=path).double()
    out = conv(x, edge_index)
    not_loop = edge_index[0] != edge_index[1]
    looped = torch.cat([edge_index[:, not_loop], torch.arange(12).repeat(2, 1)], dim=1)
    ref, _ = ssa_reference(*projections(conv, x), looped)
    torch.testing.assert_close(out, ref.reshape(12, -1), atol=1e-10, rtol=1e-10)


def test_isolated_nodes_get_zeros_not_nan():
    x = torch.randn(12, 6)
    for path in ("sparse", "dense"):
        conv = BatchGraphConv(6, 4, heads=2, add_self_loops=False, attention_path=path)
        out = conv(x, random_graph(isolated=2))
        assert torch.isfinite(out).all()
        assert torch.equal(out[-2:], torch.zeros(2, 8))


def test_attention_weights_sum_to_one_per_target_and_head():
    conv = BatchGraphConv(6, 4, heads=3)
    edge_index = random_graph()
    _, (ei, alpha) = conv(torch.randn(12, 6), edge_index, return_attention_weights=True)
    assert alpha.shape == (ei.size(1), 3)
    sums = torch.zeros(12, 3).index_add_(0, ei[1], alpha)
    torch.testing.assert_close(sums, torch.ones(12, 3))


def test_output_ignores_nodes_outside_the_neighbourhood():
    x = torch.randn(12, 6)
    edge_index = random_graph()
    conv = BatchGraphConv(6, 4, heads=2)
    out = conv(x, edge_index)
    target = int(edge_index[1, 0])
    in_neighbours = set(edge_index[0, edge_index[1] == target].tolist()) | {target}
    outsider = next(j for j in range(12) if j not in in_neighbours)
    x_changed = x.clone()
    x_changed[outsider] += 10.0
    torch.testing.assert_close(conv(x_changed, edge_index)[target], out[target])


def test_return_attention_weights_false_returns_only_the_output():
    conv = BatchGraphConv(6, 4)
    out = conv(torch.randn(5, 6), random_graph(5, 10, 0), return_attention_weights=False)
    assert isinstance(out, torch.Tensor)
    assert conv._alpha is None


@pytest.mark.parametrize("concat", [True, False])
def test_equals_transformer_conv_with_its_weights(concat):
    x = torch.randn(12, 6)
    edge_index = random_graph()
    reference = TransformerConv(6, 4, heads=3, concat=concat, root_weight=False, bias=False)
    conv = BatchGraphConv(6, 4, heads=3, concat=concat, add_self_loops=False, bias=False)
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("lin_skip")}
    conv.load_state_dict(state)
    torch.testing.assert_close(conv(x, edge_index), reference(x, edge_index))


def test_root_weight_and_edge_features_match_transformer_conv():
    x, edge_attr = torch.randn(12, 6), torch.randn(40, 3)
    edge_index = random_graph(isolated=0)[:, :40]
    reference = TransformerConv(6, 4, heads=2, edge_dim=3, root_weight=True)
    conv = BatchGraphConv(6, 4, heads=2, edge_dim=3, root_weight=True, add_self_loops=False)
    conv.load_state_dict(reference.state_dict())
    torch.testing.assert_close(
        conv(x, edge_index, edge_attr), reference(x, edge_index, edge_attr)
    )


def test_edge_features_with_added_self_loops_use_the_mean():
    x, edge_attr = torch.randn(12, 6), torch.randn(30, 3)
    edge_index = random_graph(isolated=0)[:, :30]
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    edge_attr = edge_attr[: edge_index.size(1)]
    conv = BatchGraphConv(6, 4, heads=2, edge_dim=3)
    out = conv(x, edge_index, edge_attr)
    looped = torch.cat([edge_index, torch.arange(12).repeat(2, 1)], dim=1)
    mean_attr = torch.zeros(12, 3).index_add_(0, edge_index[1], edge_attr)
    mean_attr /= torch.bincount(edge_index[1], minlength=12).clamp(min=1).unsqueeze(1)
    manual = BatchGraphConv(6, 4, heads=2, edge_dim=3, add_self_loops=False)
    manual.load_state_dict(conv.state_dict())
    torch.testing.assert_close(out, manual(x, looped, torch.cat([edge_attr, mean_attr])))


def coalesced_graph():
    edge_index = random_graph(isolated=1)
    return torch.unique(edge_index, dim=1)  # sparse layouts merge duplicates


def test_torch_sparse_adjacency_matches_edge_list():
    x = torch.randn(12, 6)
    edge_index = coalesced_graph()
    conv = BatchGraphConv(6, 4, heads=2)
    out, (_, alpha) = conv(x, edge_index, return_attention_weights=True)
    for adj in (to_torch_csc_tensor(edge_index, size=(12, 12)).t(),
                to_torch_coo_tensor(edge_index.flip(0), size=(12, 12))):
        torch.testing.assert_close(conv(x, adj), out, atol=1e-6, rtol=1e-5)
        _, (adj_alpha, _) = conv(x, adj, return_attention_weights=True)
        assert adj_alpha.is_sparse or adj_alpha.layout != torch.strided


@pytest.mark.skipif(not torch_geometric.typing.WITH_TORCH_SPARSE, reason="needs torch-sparse")
def test_sparse_tensor_matches_edge_list():
    from torch_sparse import SparseTensor

    x = torch.randn(12, 6)
    edge_index = coalesced_graph()
    adj_t = SparseTensor.from_edge_index(edge_index, sparse_sizes=(12, 12)).t()
    for add_loops in (True, False):
        conv = BatchGraphConv(6, 4, heads=2, add_self_loops=add_loops)
        torch.testing.assert_close(conv(x, adj_t), conv(x, edge_index), atol=1e-6, rtol=1e-5)
    out, adj_alpha = conv(x, adj_t, return_attention_weights=True)
    assert adj_alpha.storage.value().shape == (adj_t.nnz(), 2)


def pyg_test_inputs(edge_dim: int):
    """The inputs of PyG's ``test_transformer_conv``: 4 sources, targets 0 and 1, edge features."""
    x1, x2 = torch.randn(4, 8), torch.randn(2, 16)
    edge_index = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 1]])
    edge_attr = torch.randn(edge_index.size(1), edge_dim)
    return x1, x2, edge_index, edge_attr


@pytest.mark.skipif(not torch_geometric.typing.WITH_TORCH_SPARSE, reason="needs torch-sparse")
@pytest.mark.parametrize("edge_dim", [1, 8])
@pytest.mark.parametrize("bipartite", [False, True])
def test_sparse_tensor_values_are_the_edge_features(edge_dim, bipartite):
    from torch_sparse import SparseTensor

    torch.manual_seed(edge_dim + 10 * bipartite)
    x1, x2, edge_index, edge_attr = pyg_test_inputs(edge_dim)
    x, in_channels, size = ((x1, x2), (8, 16), (4, 2)) if bipartite else (x1, 8, (4, 4))
    conv = BatchGraphConv(in_channels, 32, heads=2, edge_dim=edge_dim, root_weight=True)
    out, (ei, alpha) = conv(x, edge_index, edge_attr, return_attention_weights=True)
    values = edge_attr.view(-1) if edge_dim == 1 else edge_attr  # (E,) when edge_dim=1
    adj = SparseTensor.from_edge_index(edge_index, values, sparse_sizes=size)
    torch.testing.assert_close(conv(x, adj.t()), out, atol=1e-6, rtol=1e-5)
    adj_out, adj_alpha = conv(x, adj.t(), return_attention_weights=True)
    torch.testing.assert_close(adj_out, out, atol=1e-6, rtol=1e-5)
    assert adj_alpha.sizes() == [size[1], size[0], 2]
    dense = torch.zeros(size[1], size[0], 2).index_put_((ei[1], ei[0]), alpha, accumulate=True)
    torch.testing.assert_close(adj_alpha.to_dense(), dense)
    # An explicit edge_attr wins over the values, as in PyG's propagate.
    other = torch.randn_like(edge_attr)
    torch.testing.assert_close(conv(x, adj.t(), other), conv(x, edge_index, other))


def test_hybrid_torch_sparse_values_are_the_edge_features():
    torch.manual_seed(3)
    x1, _, edge_index, edge_attr = pyg_test_inputs(8)
    conv = BatchGraphConv(8, 32, heads=2, edge_dim=8)
    adj = to_torch_coo_tensor(edge_index.flip(0), edge_attr, size=(4, 4))  # (4, 4, 8) hybrid
    torch.testing.assert_close(conv(x1, adj), conv(x1, edge_index, edge_attr))
    with pytest.raises(ValueError, match="edge_attr is required"):  # scalar values are weights
        conv(x1, to_torch_coo_tensor(edge_index.flip(0), size=(4, 4)))


def test_edge_dim_one_takes_a_vector_of_edge_features():
    x1, _, edge_index, edge_attr = pyg_test_inputs(1)
    conv = BatchGraphConv(8, 32, heads=2, edge_dim=1)
    torch.testing.assert_close(
        conv(x1, edge_index, edge_attr.view(-1)), conv(x1, edge_index, edge_attr)
    )


@pytest.mark.parametrize("edge_dim", [None, 8])
@pytest.mark.parametrize("path", ["auto", "sparse", "dense"])
def test_return_attention_weights_does_not_change_the_output(edge_dim, path):
    """PyG's ``assert torch.allclose(result[0], out)`` (default tolerances) on its test graph and
    on random graphs, over seeds: the weights must come from the same computation."""
    conv_kwargs = dict(heads=2, concat=True, root_weight=True, edge_dim=edge_dim,
                       attention_path=path)
    for seed in range(30):
        torch.manual_seed(seed)
        x1, _, edge_index, edge_attr = pyg_test_inputs(edge_dim or 1)
        if seed % 2:
            x1, edge_index = torch.randn(12, 8), random_graph()
            edge_attr = torch.randn(edge_index.size(1), edge_dim or 1)
        edge_attr = edge_attr if edge_dim else None
        for add_loops in (True, False):
            conv = BatchGraphConv(8, 32, add_self_loops=add_loops, **conv_kwargs)
            out = conv(x1, edge_index, edge_attr)
            result = conv(x1, edge_index, edge_attr, return_attention_weights=True)
            assert torch.allclose(result[0], out), (seed, add_loops)
        if not seed % 2:  # PyG's bipartite form: 4 sources, 2 targets
            x2 = torch.randn(2, 16)
            conv = BatchGraphConv((8, 16), 32, **conv_kwargs)
            out = conv((x1, x2), edge_index, edge_attr)
            result = conv((x1, x2), edge_index, edge_attr, return_attention_weights=True)
            assert torch.allclose(result[0], out), (seed, "bipartite")


def test_bipartite_and_lazy_input():
    x_src, x_dst = torch.randn(7, 5), torch.randn(4, 3)
    edge_index = torch.stack([torch.randint(0, 7, (15,)), torch.randint(0, 4, (15,))])
    conv = BatchGraphConv((5, 3), 8, heads=2, add_self_loops=False, root_weight=True)
    assert str(conv) == "BatchGraphConv((5, 3), 8, heads=2)"
    assert conv((x_src, x_dst), edge_index).shape == (4, 16)
    lazy = BatchGraphConv(-1, 8, heads=2, add_self_loops=False)
    assert lazy((x_src, x_dst), edge_index).shape == (4, 16)
    lazy.reset_parameters()


def test_to_hetero():
    from torch_geometric.data import HeteroData
    from torch_geometric.nn import to_hetero

    data = HeteroData()
    data["image"].x = torch.randn(6, 5)
    data["proxy"].x = torch.randn(3, 4)
    data["image", "near", "image"].edge_index = torch.randint(0, 6, (2, 12))
    data["proxy", "of", "image"].edge_index = torch.stack(
        [torch.randint(0, 3, (8,)), torch.randint(0, 6, (8,))]
    )

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = BatchGraphConv(-1, 4, heads=2, add_self_loops=False)

        def forward(self, x, edge_index):
            return self.conv(x, edge_index)

    model = to_hetero(Net(), data.metadata(), aggr="sum")
    out = model(data.x_dict, data.edge_index_dict)
    assert out["image"].shape == (6, 8)


def test_repr_and_reset_parameters():
    conv = BatchGraphConv(16, 32, heads=8)
    assert str(conv) == "BatchGraphConv(16, 32, heads=8)"
    before = conv.lin_query.weight.clone()
    conv.reset_parameters()
    assert not torch.equal(before, conv.lin_query.weight)
    assert conv.lin_skip is None and conv.lin_edge is None


def test_attention_dropout_only_in_training():
    x, edge_index = torch.randn(12, 6), random_graph(isolated=0)
    conv = BatchGraphConv(6, 4, heads=2, dropout=0.5)
    conv.eval()
    torch.testing.assert_close(conv(x, edge_index), conv(x, edge_index))
    conv.train()
    torch.manual_seed(0)
    assert not torch.allclose(conv(x, edge_index), conv.eval()(x, edge_index))


def test_empty_graph():
    conv = BatchGraphConv(6, 4, heads=2, add_self_loops=False)
    out = conv(torch.randn(5, 6), torch.empty(2, 0, dtype=torch.long))
    assert torch.equal(out, torch.zeros(5, 8))
    assert conv(torch.randn(0, 6), torch.empty(2, 0, dtype=torch.long)).shape == (0, 8)


def test_gradcheck():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    edge_index = random_graph(6, 14, 1)
    for path in ("sparse", "dense"):
        conv = BatchGraphConv(4, 3, heads=2, root_weight=True, attention_path=path).double()
        assert torch.autograd.gradcheck(lambda t, c=conv: c(t, edge_index), (x,))


@pytest.mark.parametrize(
    ("x", "edge_index", "match"),
    [
        (torch.randn(5), torch.zeros(2, 1, dtype=torch.long), "x must be a 2-D tensor"),
        (torch.randn(5, 7), torch.zeros(2, 1, dtype=torch.long), "x must have 6 columns"),
        (torch.randn(5, 6), torch.zeros(3, 1, dtype=torch.long), r"must have shape \(2, E\)"),
        (torch.randn(5, 6), torch.zeros(2, 1), "edge_index must be an int64"),
        (torch.randn(5, 6), torch.tensor([[0], [5]]), r"edge_index\[1\] \(targets\) must lie in"),
        (torch.randn(5, 6), torch.tensor([[-1], [0]]), r"edge_index\[0\] \(sources\) must lie in"),
    ],
)
def test_bad_input_names_the_argument(x, edge_index, match):
    conv = BatchGraphConv(6, 4)
    with pytest.raises((ValueError, TypeError), match=match):
        conv(x, edge_index)


def test_edge_attr_errors():
    x, edge_index = torch.randn(5, 6), torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="edge_attr is required"):
        BatchGraphConv(6, 4, edge_dim=3)(x, edge_index)
    with pytest.raises(ValueError, match="edge_attr must have one row per edge"):
        BatchGraphConv(6, 4, edge_dim=3, add_self_loops=False)(x, edge_index, torch.randn(3, 3))
    with pytest.raises(ValueError, match="edge_dim=None"):
        BatchGraphConv(6, 4)(x, edge_index, torch.randn(2, 3))
    with pytest.raises(ValueError, match="attention_path"):
        BatchGraphConv(6, 4, attention_path="fast")


def test_explainer_masks_exactly_the_in_edges():
    from torch_geometric.explain import Explainer, GNNExplainer

    from bgf_pyg import build_batch_graph

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = BatchGraphConv(8, 4, heads=2)  # auto path: dense or kNN outside explain
            self.lin = torch.nn.Linear(8, 3)

        def forward(self, x, edge_index):
            return self.lin(self.conv(x, edge_index).relu())

    graph = build_batch_graph(torch.randn(20, 8), k=4)
    explainer = Explainer(
        Net(), algorithm=GNNExplainer(epochs=5), explanation_type="model",
        node_mask_type="attributes", edge_mask_type="object",
        model_config={"mode": "multiclass_classification", "task_level": "node",
                      "return_type": "raw"},
    )
    edge_mask = explainer(graph.x, graph.visual_edge_index, index=3).edge_mask
    assert edge_mask.shape == (graph.num_visual_edges,)
    assert torch.equal(edge_mask > 0, graph.visual_edge_index[1] == 3)


def test_lazy_channels_are_still_accepted():
    conv = BatchGraphConv((-1, -1), 4, heads=2, add_self_loops=False)
    assert conv((torch.randn(3, 5), torch.randn(2, 7)), torch.tensor([[0, 2], [1, 0]])).shape == (
        2, 8)


def neighbourhood_rows(edge_index, node, num_nodes, self_loops):
    """Targets whose attention neighbourhood contains ``node`` (itself as query included)."""
    rows = set(edge_index[1, edge_index[0] == node].tolist())
    if self_loops:
        rows.add(node)
    elif node in edge_index[1].tolist():
        rows.add(node)
    return sorted(rows)


@pytest.mark.parametrize("add_self_loops", [False, True])
@pytest.mark.parametrize("path", ["sparse", "dense", "auto", "knn"])
def test_nan_feature_reaches_exactly_its_attention_neighbourhood(path, add_self_loops):
    torch.manual_seed(4)
    x = torch.randn(12, 6)
    if path == "knn":
        edge_index, _ = knn_edges(x, 3, loop=not add_self_loops)
    else:
        edge_index = torch.stack([torch.randint(0, 12, (30,)), torch.randint(0, 10, (30,))])
    conv = BatchGraphConv(6, 4, heads=2, add_self_loops=add_self_loops,
                          attention_path="sparse" if path == "knn" else path)
    if path == "knn":
        assert layer_route(conv, x, edge_index, path="regular").source is not None
    clean = conv(x, edge_index)
    x[5, 2] = math.nan
    out = conv(x, edge_index)
    bad = (~torch.isfinite(out)).any(dim=1).nonzero().view(-1).tolist()
    assert bad == neighbourhood_rows(edge_index, 5, 12, add_self_loops)
    good = torch.isfinite(out).all(dim=1)
    torch.testing.assert_close(out[good], clean[good])


def sparse_forms(edge_index, num_src, num_dst):
    """The adjacency ``adj_t`` (rows = targets) in the three torch.sparse layouts."""
    adj = edge_index.flip(0)
    size = (num_dst, num_src)
    return {
        "coo": to_torch_coo_tensor(adj, size=size),
        "csr": to_torch_csr_tensor(adj, size=size),
        "csc": to_torch_csc_tensor(adj, size=size),
    }


def stored_order(edge_index, num_src):
    """Coalesced (target-major) order, the order edge features of a sparse adjacency follow."""
    return torch.argsort(edge_index[1] * num_src + edge_index[0])


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_torch_sparse_with_edge_attr_and_self_loops(layout):
    torch.manual_seed(6)
    x = torch.randn(9, 6)
    edge_index = torch.unique(torch.randint(0, 9, (2, 25)), dim=1)
    edge_index = edge_index[:, stored_order(edge_index, 9)]
    edge_attr = torch.randn(edge_index.size(1), 3)
    conv = BatchGraphConv(6, 4, heads=2, edge_dim=3, add_self_loops=True)
    expected, (ei, alpha) = conv(x, edge_index, edge_attr, return_attention_weights=True)
    adj = sparse_forms(edge_index, 9, 9)[layout]
    out, (adj_alpha, sparse_alpha) = conv(x, adj, edge_attr, return_attention_weights=True)
    torch.testing.assert_close(out, expected)
    assert adj_alpha.layout == adj.layout and tuple(adj_alpha.shape) == (9, 9, 2)
    dense = torch.zeros(9, 9, 2).index_put_((ei[1], ei[0]), alpha, accumulate=True)
    torch.testing.assert_close(adj_alpha.to_dense(), dense)


@pytest.mark.parametrize("layout", ["coo", "csr", "csc"])
def test_bipartite_torch_sparse_with_fewer_sources_than_targets(layout):
    torch.manual_seed(7)
    x_src, x_dst = torch.randn(3, 5), torch.randn(7, 4)
    edge_index = torch.unique(torch.stack([torch.randint(0, 3, (12,)),
                                           torch.randint(0, 7, (12,))]), dim=1)
    conv = BatchGraphConv((5, 4), 4, heads=2, add_self_loops=True)
    expected = conv((x_src, x_dst), edge_index)
    out = conv((x_src, x_dst), sparse_forms(edge_index, 3, 7)[layout])
    torch.testing.assert_close(out, expected)


def test_sparse_adjacency_of_the_wrong_size_is_refused():
    adj = to_torch_csr_tensor(torch.tensor([[0, 1], [1, 0]]), size=(4, 4))
    with pytest.raises(ValueError, match=r"must have size \(5, 5\) to match x, got \(4, 4\)"):
        BatchGraphConv(6, 4)(torch.randn(5, 6), adj)


def test_sparse_tensor_with_edge_attr_self_loops_and_bipartite():
    torch_sparse = pytest.importorskip("torch_sparse")
    torch.manual_seed(8)
    x = torch.randn(8, 6)
    edge_index = torch.unique(torch.randint(0, 8, (2, 20)), dim=1)
    edge_index = edge_index[:, stored_order(edge_index, 8)]
    edge_attr = torch.randn(edge_index.size(1), 2)
    adj_t = torch_sparse.SparseTensor(row=edge_index[1], col=edge_index[0], sparse_sizes=(8, 8))
    conv = BatchGraphConv(6, 4, heads=2, edge_dim=2)
    expected, (ei, alpha) = conv(x, edge_index, edge_attr, return_attention_weights=True)
    out, adj_alpha = conv(x, adj_t, edge_attr, return_attention_weights=True)
    torch.testing.assert_close(out, expected)
    dense = torch.zeros(8, 8, 2).index_put_((ei[1], ei[0]), alpha, accumulate=True)
    torch.testing.assert_close(adj_alpha.to_dense(), dense)

    x_src, x_dst = torch.randn(3, 6), torch.randn(6, 6)
    bip = torch.unique(torch.stack([torch.randint(0, 3, (10,)), torch.randint(0, 6, (10,))]), dim=1)
    adj_t = torch_sparse.SparseTensor(row=bip[1], col=bip[0], sparse_sizes=(6, 3))
    torch.testing.assert_close(conv.__class__(6, 4, heads=2)((x_src, x_dst), adj_t).shape,
                               torch.Size([6, 8]))
    bip_conv = BatchGraphConv(6, 4, heads=2)
    torch.testing.assert_close(bip_conv((x_src, x_dst), adj_t), bip_conv((x_src, x_dst), bip))


class TwoConvs(torch.nn.Module):
    """Two BatchGraphConvs on one attention path, then a node classifier."""

    def __init__(self, path: str, add_self_loops: bool = True) -> None:
        super().__init__()
        self.conv1 = BatchGraphConv(8, 4, heads=2, attention_path=path,
                                    add_self_loops=add_self_loops)
        self.conv2 = BatchGraphConv(8, 4, heads=2, attention_path=path,
                                    add_self_loops=add_self_loops)
        self.lin = torch.nn.Linear(8, 3)

    def forward(self, x, edge_index):
        return self.lin(self.conv2(self.conv1(x, edge_index).relu(), edge_index))


EXPLAIN_PATHS = ["sparse", "dense", "auto", "knn"]


def explain_setup(path):
    torch.manual_seed(9)
    x = torch.randn(20, 8)
    if path == "knn":
        model = TwoConvs("sparse")
        edge_index, _ = knn_edges(x, 4)
        assert layer_route(model.conv1, x, edge_index, path="regular").source is not None
    else:
        model = TwoConvs(path)
        edge_index = torch.stack([torch.randint(0, 20, (80,)), torch.randint(0, 20, (80,))])
        edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    if path in ("dense", "auto"):
        assert layer_route(model.conv1, x, edge_index).path == "dense"
    return model.eval(), x, edge_index


MODEL_CONFIG = {"mode": "multiclass_classification", "task_level": "node", "return_type": "raw"}


@pytest.mark.parametrize("path", EXPLAIN_PATHS)
def test_attention_explainer_reads_every_path(path):
    model, x, edge_index = explain_setup(path)
    explainer = Explainer(model, algorithm=AttentionExplainer(), explanation_type="model",
                          edge_mask_type="object", model_config=MODEL_CONFIG)
    mask = explainer(x, edge_index, index=3).edge_mask
    assert mask.shape == (edge_index.size(1),) and torch.isfinite(mask).all()
    assert bool((mask[edge_index[1] == 3] > 0).all())
    # The mask is PyG's reduction (max over heads, then layers) of the layers' attention.
    _, (_, alpha1) = model.conv1(x, edge_index, return_attention_weights=True)
    h = model.conv1(x, edge_index).relu()
    _, (_, alpha2) = model.conv2(h, edge_index, return_attention_weights=True)
    expected = torch.stack([alpha1[: edge_index.size(1)].max(-1).values,
                            alpha2[: edge_index.size(1)].max(-1).values]).max(0).values
    in_hops = mask > 0
    torch.testing.assert_close(mask[in_hops], expected[in_hops])
    # Hooks are gone after explaining: the fast paths are back.
    assert not model.conv1._observed()


@pytest.mark.parametrize("path", EXPLAIN_PATHS)
def test_gnn_explainer_reads_every_path(path):
    model, x, edge_index = explain_setup(path)
    explainer = Explainer(model, algorithm=GNNExplainer(epochs=3), explanation_type="model",
                          node_mask_type="attributes", edge_mask_type="object",
                          model_config=MODEL_CONFIG)
    explanation = explainer(x, edge_index, index=3)
    assert explanation.edge_mask.shape == (edge_index.size(1),)
    assert bool((explanation.edge_mask[edge_index[1] == 3] > 0).all())
    assert explanation.node_mask.abs().sum() > 0


def test_a_message_hook_sees_the_same_attention_as_the_fast_path():
    model, x, edge_index = explain_setup("dense")
    conv = model.conv1
    _, (ei, fast_alpha) = conv(x, edge_index, return_attention_weights=True)
    seen = []
    handle = conv.register_message_forward_hook(lambda m, inputs, out: seen.append(m._alpha))
    hooked, (ei_hooked, alpha) = conv(x, edge_index, return_attention_weights=True)
    handle.remove()
    assert len(seen) == 1 and torch.equal(ei_hooked, ei)
    torch.testing.assert_close(seen[0], fast_alpha)
    torch.testing.assert_close(alpha, fast_alpha)


@pytest.mark.parametrize("root_weight", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_strict_load_of_transformer_conv_weights(root_weight, bias):
    torch.manual_seed(10)
    x, edge_index = torch.randn(9, 6), torch.randint(0, 9, (2, 30))
    reference = TransformerConv(6, 4, heads=2, root_weight=root_weight, bias=bias)
    conv = BatchGraphConv(6, 4, heads=2, root_weight=root_weight, bias=bias,
                          add_self_loops=False)
    state = copy.deepcopy(reference.state_dict())
    conv.load_state_dict(state, strict=True)
    assert state.keys() == reference.state_dict().keys()  # the caller's dict is not changed
    torch.testing.assert_close(conv(x, edge_index), reference(x, edge_index))
    # The other way: strict when both have a root weight; without one, exactly lin_skip misses.
    fresh = TransformerConv(6, 4, heads=2, root_weight=root_weight, bias=bias)
    result = fresh.load_state_dict(conv.state_dict(), strict=root_weight)
    if root_weight:
        torch.testing.assert_close(fresh(x, edge_index), conv(x, edge_index))
    else:
        assert sorted(result.missing_keys) == sorted(
            k for k in reference.state_dict() if k.startswith("lin_skip"))
        assert result.unexpected_keys == []
        torch.testing.assert_close(fresh(x, edge_index), conv(x, edge_index))


def test_other_unexpected_keys_still_fail_strict_loading():
    conv = BatchGraphConv(6, 4, heads=2)
    state = {**conv.state_dict(), "lin_beta.weight": torch.zeros(1, 24)}
    with pytest.raises(RuntimeError, match="lin_beta"):
        conv.load_state_dict(state)


NUM_NODES, CHANNELS, OUT, HEADS, K = 10, 6, 4, 3, 3


def knn_graph(loop: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 features and their kNN edges (sorted by target, in-degree K, or K + 1 with loops)."""
    x = torch.randn(NUM_NODES, CHANNELS, dtype=torch.float64)
    edge_index, _ = knn_edges(x, K, loop=loop)
    return x, edge_index


def run(conv: BatchGraphConv, x: torch.Tensor, edge_index: torch.Tensor, **kwargs):
    """Output, (edge_index, alpha) and the gradients of x and of every parameter."""
    x = x.clone().requires_grad_(True)
    conv.zero_grad(set_to_none=True)
    out, (ei, alpha) = conv(x, edge_index, return_attention_weights=True, **kwargs)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = [x.grad] + [p.grad for p in conv.parameters()]
    return out, ei, alpha, grads


def assert_grads_close(grads, expected):
    for grad, ref in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, ref, atol=1e-10, rtol=1e-10)


# Edge features together with added loops take the generic path (the loops' features are
# per-target means), so that combination has no fast path to compare.
@pytest.mark.parametrize("add_self_loops,edge_dim", [(False, None), (False, 2), (True, None)])
@pytest.mark.parametrize("concat", [True, False])
def test_knn_fast_path_equals_generic_path(add_self_loops, edge_dim, concat):
    x, edge_index = knn_graph(loop=not add_self_loops)
    edge_attr = None if edge_dim is None else torch.randn(edge_index.size(1), 2, dtype=x.dtype)
    conv = BatchGraphConv(
        CHANNELS, OUT, heads=HEADS, concat=concat, add_self_loops=add_self_loops,
        edge_dim=edge_dim, root_weight=True, attention_path="sparse",
    ).double().train()  # dropout = 0: training mode changes nothing
    edge_features = edge_attr is not None
    assert layer_route(conv, x, edge_index, "regular", edge_features).source is not None
    out, ei, alpha, grads = run(conv, x, edge_index, edge_attr=edge_attr)

    # Reversed edge order is not sorted by target: the generic scatter-softmax path runs.
    reverse = edge_index.flip(1)
    with pytest.raises(ValueError, match="'regular' needs the same number"):
        layer_route(conv, x, reverse, "regular", edge_features)
    ref_attr = None if edge_attr is None else edge_attr.flip(0)
    ref_out, ref_ei, ref_alpha, ref_grads = run(conv, x, reverse, edge_attr=ref_attr)

    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    num_edges = edge_index.size(1)  # any added loops come last, in node order, on both paths
    assert torch.equal(ei[:, :num_edges], ref_ei[:, :num_edges].flip(1))
    assert torch.equal(ei[:, num_edges:], ref_ei[:, num_edges:])
    torch.testing.assert_close(alpha[:num_edges], ref_alpha[:num_edges].flip(0))
    torch.testing.assert_close(alpha[num_edges:], ref_alpha[num_edges:])
    assert_grads_close(grads, ref_grads)


def test_regular_layout_with_loops_and_added_loops_falls_back():
    # Existing loops must be replaced, not kept: the fast path declines, the result is unchanged.
    x, edge_index = knn_graph(loop=True)
    conv = BatchGraphConv(CHANNELS, OUT, heads=HEADS, attention_path="sparse").double()
    with pytest.raises(ValueError, match="'regular' needs the same number"):
        layer_route(conv, x, edge_index, "regular")
    without_loops = edge_index[:, edge_index[0] != edge_index[1]]
    torch.testing.assert_close(conv(x, edge_index), conv(x, without_loops))


@pytest.mark.parametrize(
    ("path", "dtype", "edge_dim", "loops"),
    [
        ("auto", torch.float64, None, True),  # small graph: dense
        ("auto", torch.float64, 2, False),  # edge features: the sparse choice
        ("sparse", torch.float64, None, True),  # CPU float: csr
        ("sparse", torch.bfloat16, None, False),  # no CPU kernel: regular
        ("dense", torch.float64, 2, False),  # dense with edge features: the sparse choice
        ("regular", torch.float64, None, False),
        ("edges", torch.float64, None, True),
    ],
)
def test_forward_runs_the_route_select_path_gives(monkeypatch, path, dtype, edge_dim, loops):
    """The layer keeps no path rule of its own: what forward runs is select_path's answer."""
    x, edge_index = knn_graph(loop=not loops)
    x = x.to(dtype)
    conv = BatchGraphConv(CHANNELS, OUT, heads=HEADS, add_self_loops=loops, edge_dim=edge_dim,
                          attention_path=path).to(dtype)
    edge_attr = None if edge_dim is None else torch.randn(edge_index.size(1), 2, dtype=dtype)
    taken = []
    monkeypatch.setattr(conv_module, "ssa_attention", lambda *args, path, **kwargs: (
        taken.append(path.path), ssa_attention(*args, path=path, **kwargs))[1])
    propagate = conv._propagate
    monkeypatch.setattr(conv, "_propagate", lambda *args: (taken.append("edges"),
                                                           propagate(*args))[1])
    conv(x, edge_index, edge_attr)
    asked = "sparse" if path == "dense" and edge_dim else path
    assert taken == [layer_route(conv, x, edge_index, asked, edge_dim is not None).path]


@pytest.mark.parametrize("path", ["dense", "auto"])
@pytest.mark.parametrize("add_self_loops", [False, True])
@pytest.mark.parametrize("concat", [True, False])
def test_dense_and_auto_equal_sparse(path, add_self_loops, concat):
    x = torch.randn(NUM_NODES, CHANNELS, dtype=torch.float64)
    # Random edges with duplicates, loops and a node without in-edges, in no particular order.
    edge_index = torch.stack([
        torch.randint(0, NUM_NODES, (30,)), torch.randint(0, NUM_NODES - 1, (30,))
    ])
    edge_index = torch.cat([edge_index, edge_index[:, :4], torch.arange(3).repeat(2, 1)], dim=1)
    sparse = BatchGraphConv(
        CHANNELS, OUT, heads=HEADS, concat=concat, add_self_loops=add_self_loops,
        attention_path="sparse",
    ).double()
    other = copy.deepcopy(sparse)
    other.attention_path = path
    assert layer_route(other, x, edge_index).path == "dense"  # 100 pairs, ≥ 37 edges
    out, ei, alpha, grads = run(other, x, edge_index)
    ref_out, ref_ei, ref_alpha, ref_grads = run(sparse, x, edge_index)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    assert torch.equal(ei, ref_ei)
    torch.testing.assert_close(alpha, ref_alpha, atol=1e-10, rtol=1e-10)
    assert_grads_close(grads, ref_grads)


def test_auto_picks_sparse_for_large_sparse_graphs():
    conv = BatchGraphConv(CHANNELS, OUT, attention_path="auto")
    edge_index = torch.zeros(2, 10 * 4096, dtype=torch.long)
    assert layer_route(conv, torch.zeros(4096, CHANNELS), edge_index).path != "dense"
    assert layer_route(conv, torch.zeros(64, CHANNELS), edge_index[:, :640]).path == "dense"


compile_available = pytest.mark.skipif(
    not hasattr(torch, "compile") or shutil.which("gcc") is None and shutil.which("cc") is None,
    reason="torch.compile needs torch >= 2 and a C compiler",
)


@compile_available
@pytest.mark.parametrize("path", ["sparse", "dense", "auto"])
def test_no_graph_breaks_with_self_looped_graph(path):
    x, edge_index = knn_graph(loop=True)
    conv = BatchGraphConv(
        CHANNELS, OUT, heads=HEADS, add_self_loops=False, attention_path=path
    ).double()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(conv)(x, edge_index)
    assert explanation.graph_break_count == 0


@compile_available
def test_compiled_forward_backward_equals_eager():
    x, edge_index = knn_graph(loop=True)
    conv = BatchGraphConv(CHANNELS, OUT, heads=HEADS, add_self_loops=False, attention_path="sparse")
    conv = conv.double()
    torch._dynamo.reset()
    compiled = torch.compile(conv, dynamic=False)
    out, _, alpha, grads = run(compiled, x, edge_index)
    ref_out, _, ref_alpha, ref_grads = run(conv, x, edge_index)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(alpha, ref_alpha)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref)
