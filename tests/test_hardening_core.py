"""Issue #11, core library: degenerate sizes, half precision and zero rows, NaN containment,
per-graph branch choice, adjacency forms, PyG's explainers and TransformerConv weights. Each test
checks one class of failure against an independent statement of the expected result."""

import copy
import math

import pytest
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.explain import Explainer, GNNExplainer
from torch_geometric.explain.algorithm import AttentionExplainer
from torch_geometric.nn import TransformerConv
from torch_geometric.utils import to_torch_coo_tensor, to_torch_csc_tensor, to_torch_csr_tensor

from bgf_pyg import build_batch_graph
from bgf_pyg.graph import knn_edges
from bgf_pyg.knn import cosine_topk, normalize_rows
from bgf_pyg.losses import LabelSmoothingCE, ProxyGMLLoss
from bgf_pyg.metrics import evaluate_retrieval, recall_at_k, recall_at_k_query_gallery
from bgf_pyg.nn import BatchGraphConv, BGFormer, BGFormerLayer, DualSSA, IntraBatchMPN
from bgf_pyg.nn.intra_batch import IntraBatchAttention, IntraBatchLayer
from tests.reference import cosine_reference, proxygml_reference, retrieval_reference

# ---------------------------------------------------------------------------------------------
# Degenerate sizes


@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("num_nodes", [0, 1])
def test_batch_graph_of_zero_or_one_node(num_nodes, loop):
    graph = build_batch_graph(torch.randn(num_nodes, 4), torch.zeros(num_nodes).long(), loop=loop)
    loops = [[i, i] for i in range(num_nodes)] if loop else []
    assert graph.visual_edge_index.t().tolist() == loops
    assert graph.semantic_edge_index.t().tolist() == loops
    assert graph.visual_edge_weight.tolist() == [1.0] * len(loops)
    graph.validate()


def test_cosine_topk_k_zero_and_clear_bound():
    values, index = cosine_topk(torch.randn(3, 2), k=0, exclude_self=True)
    assert values.shape == index.shape == (3, 0)
    with pytest.raises(ValueError, match=r"k must lie in \[0, 2\] .*self excluded.*got 3"):
        cosine_topk(torch.randn(3, 2), k=3, exclude_self=True)


def test_bgformer_on_a_single_node_and_an_empty_batch():
    model = BGFormer(8, heads=2).eval()
    one = build_batch_graph(torch.randn(1, 8), torch.tensor([0]))
    assert torch.isfinite(model(one)).all()
    assert model(build_batch_graph(torch.randn(0, 8))).shape == (0, 8)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: BatchGraphConv(8, 0), "out_channels must be >= 1"),
        (lambda: BatchGraphConv(8, 4, heads=0), "heads must be >= 1"),
        (lambda: BatchGraphConv(8, 4.0), "out_channels must be an int"),
        (lambda: BatchGraphConv(0, 4), "in_channels must be >= 1"),
        (lambda: BatchGraphConv((8, 0), 4), r"in_channels\[1\] must be >= 1"),
        (lambda: BatchGraphConv((8, 4, 2), 4), "in_channels must be an int or a pair"),
        (lambda: BatchGraphConv(8, 4, dropout=-0.1), r"dropout must lie in \[0, 1\)"),
        (lambda: BatchGraphConv(8, 4, dropout=math.nan), "dropout must lie"),
        (lambda: BatchGraphConv(8, 4, edge_dim=0), "edge_dim must be >= 1"),
        (lambda: DualSSA(8, heads=3), r"channels \(8\) must be divisible by heads \(3\)"),
        (lambda: DualSSA(8, heads=2, dropout=1.5), "dropout must lie"),
        (lambda: DualSSA(8, heads=2, lam=math.nan), r"lam must lie in \[0, 1\]"),
        (lambda: BGFormerLayer(0, heads=1), "channels must be >= 1"),
        (lambda: BGFormerLayer(8, heads=2, dropout=-1.0), "dropout must lie"),
        (lambda: BGFormer(8, heads=0), "heads must be >= 1"),
        (lambda: BGFormer(8, num_layers=0), "num_layers must be >= 1"),
        (lambda: IntraBatchAttention(8, heads=3), r"channels \(8\) must be divisible"),
        (lambda: IntraBatchLayer(8, ffn_ratio=0), "ffn_ratio must be >= 1"),
        (lambda: IntraBatchMPN(8, heads=3), r"in_channels \(8\) must be divisible by heads"),
        (lambda: IntraBatchMPN(8, heads=2, dropout=2.0), "dropout must lie"),
        (lambda: LabelSmoothingCE(temperature=math.inf), "temperature must be a finite"),
        (lambda: LabelSmoothingCE(epsilon=math.nan), r"epsilon must lie in \[0, 1\]"),
        (lambda: ProxyGMLLoss(0, 8), "num_classes must be >= 1"),
        (lambda: ProxyGMLLoss(3, 8, r=math.nan), "r must lie"),
        (lambda: ProxyGMLLoss(3, 8, weight_lambda=math.inf), "weight_lambda must be a finite"),
        (lambda: ProxyGMLLoss(3, 8, proxies_per_class=0), "proxies_per_class must be >= 1"),
    ],
)
def test_bad_constructor_arguments_fail_in_the_constructor(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_lazy_channels_are_still_accepted():
    conv = BatchGraphConv((-1, -1), 4, heads=2, add_self_loops=False)
    assert conv((torch.randn(3, 5), torch.randn(2, 7)), torch.tensor([[0, 2], [1, 0]])).shape == (
        2, 8)


def test_empty_and_single_row_batches_are_refused_by_name():
    with pytest.raises(ValueError, match="logits needs at least 1 samples"):
        LabelSmoothingCE()(torch.randn(0, 3), torch.zeros(0).long())
    with pytest.raises(ValueError, match="embeddings needs at least 1 samples"):
        ProxyGMLLoss(3, 4)(torch.randn(0, 4), torch.zeros(0).long())
    mpn = IntraBatchMPN(8, heads=2, num_classes=3)
    with pytest.raises(ValueError, match="x needs at least 2 samples .*training mode"):
        mpn.train()(torch.randn(1, 8))
    logits, h = mpn.eval()(torch.randn(1, 8))  # evaluation uses running statistics: fine
    assert logits.shape == (1, 3) and torch.isfinite(h).all()


def test_bgformer_without_visual_edges_names_them():
    with pytest.raises(ValueError, match="visual_edge_index is required"):
        BGFormer(8, heads=2)(Data(x=torch.randn(3, 8)))


def test_metrics_on_one_class_and_too_few_samples():
    emb, labels = torch.randn(6, 4), torch.zeros(6).long()
    result = evaluate_retrieval(emb, labels, ks=(1, 5), with_nmi=True)
    assert result == pytest.approx({"recall@1": 1.0, "recall@5": 1.0, "map@r": 1.0,
                                    "r_precision": 1.0, "nmi": 1.0})
    with pytest.raises(ValueError, match="emb needs at least 2 samples"):
        recall_at_k(torch.randn(1, 4), torch.zeros(1).long(), ks=(1,))
    with pytest.raises(ValueError, match="gallery_emb needs at least 1 samples"):
        recall_at_k_query_gallery(torch.randn(3, 4), torch.arange(3), torch.randn(0, 4),
                                  torch.zeros(0).long(), ks=(1,))


# ---------------------------------------------------------------------------------------------
# Half precision and zero rows


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_zero_row_has_cosine_zero_in_every_dtype(dtype):
    torch.manual_seed(0)
    x = torch.randn(12, 6)
    x[4] = 0.0
    sim, index = cosine_topk(x.to(dtype), k=11, exclude_self=True)
    assert torch.isfinite(sim).all()
    reference = cosine_reference(x.to(dtype))
    # The zero row ranks where cosine 0 ranks, and as a query all its neighbours tie at 0, so
    # they come in index order.
    assert index[4].tolist() == [j for j in range(12) if j != 4]
    assert torch.equal(sim[4], torch.zeros(11, dtype=sim.dtype))
    for i in range(12):
        torch.testing.assert_close(sim[i].double(), reference[i, index[i]], atol=1e-2, rtol=0)


def test_normalize_rows_zero_row_is_zero_with_zero_gradient():
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(normalize_rows(x), x / x.norm(dim=1, keepdim=True))
    assert torch.autograd.gradcheck(normalize_rows, (x.requires_grad_(True),))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        z = torch.zeros(2, 4, dtype=dtype, requires_grad=True)
        out = normalize_rows(z)
        assert out.dtype == torch.float32 and torch.equal(out, torch.zeros(2, 4))
        (out * torch.randn(2, 4)).sum().backward()
        assert torch.equal(z.grad, torch.zeros_like(z))


def test_normalize_rows_of_huge_finite_rows_keeps_their_direction():
    """A float32 row beyond ~1.8e19 has an infinite plain norm (x / inf = 0 before)."""
    x = torch.randn(4, 5, dtype=torch.float64)
    big = (x * torch.tensor([[1e20], [3e30], [1.0], [1e-6]], dtype=torch.float64)).float()
    big.requires_grad_()
    out = normalize_rows(big)
    torch.testing.assert_close(out, (x / x.norm(dim=1, keepdim=True)).float())
    (out * torch.randn(4, 5)).sum().backward()
    assert torch.isfinite(big.grad).all()


def test_half_precision_batch_graph_equals_float32_with_a_zero_row():
    torch.manual_seed(1)
    x = torch.randn(16, 8).half()
    x[3] = 0.0
    half = build_batch_graph(x, k=4)
    full = build_batch_graph(x.float(), k=4)
    assert torch.equal(half.visual_edge_index, full.visual_edge_index)
    assert half.visual_edge_weight.dtype == torch.float16
    assert torch.isfinite(half.visual_edge_weight).all()
    # Node 3 is chosen only where cosine 0 is among the 4 best, never first by accident.
    cos = cosine_reference(x)
    for target in half.visual_edge_index[1, half.visual_edge_index[0] == 3].tolist():
        others = sorted((cos[target, j] for j in range(16) if j != target), reverse=True)
        assert others[3] <= 0.0


def test_half_precision_metrics_equal_float64_brute_force_with_a_zero_row():
    torch.manual_seed(2)
    emb, labels = torch.randn(20, 6), torch.randint(0, 4, (20,))
    emb[7] = 0.0
    result = evaluate_retrieval(emb.half(), labels, ks=(1, 2, 4), with_nmi=True)
    expected = retrieval_reference(emb.half(), labels, [1, 2, 4])
    assert all(math.isfinite(v) for v in result.values())
    assert {k: result[k] for k in expected} == pytest.approx(expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_proxygml_takes_every_float_dtype_and_a_zero_row(dtype):
    torch.manual_seed(3)
    crit = ProxyGMLLoss(5, 6, proxies_per_class=2, r=0.3, weight_lambda=0.3)
    x = torch.randn(6, 6).to(dtype)
    x[2] = 0.0
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    x.requires_grad_(True)
    loss = crit(x, y)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(loss)
    loss.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    # Non-zero rows against the float64 re-statement of the original (zero rows tie everywhere,
    # so the proxies they select depend on the tie order; they are checked below).
    keep = torch.tensor([0, 1, 3, 4, 5])
    expected = proxygml_reference(x.detach()[keep].double(), crit.proxies.detach().double(),
                                  y[keep], 5, 2, 0.3, 0.3)
    torch.testing.assert_close(crit(x.detach()[keep], y[keep]).double(), expected,
                               atol=1e-5, rtol=1e-5)


def test_proxygml_zero_row_is_uniform_over_the_selected_classes():
    crit = ProxyGMLLoss(4, 5, proxies_per_class=3, r=1.0, weight_lambda=0.0)
    loss = crit(torch.zeros(1, 5), torch.tensor([2]))
    assert loss.item() == pytest.approx(math.log(4))  # Z = 0 for all 4 classes: log 4


# ---------------------------------------------------------------------------------------------
# NaN containment


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
        assert conv._regular_sources(edge_index, None, 12, 12) is not None
    clean = conv(x, edge_index)
    x[5, 2] = math.nan
    out = conv(x, edge_index)
    bad = (~torch.isfinite(out)).any(dim=1).nonzero().view(-1).tolist()
    assert bad == neighbourhood_rows(edge_index, 5, 12, add_self_loops)
    good = torch.isfinite(out).all(dim=1)
    torch.testing.assert_close(out[good], clean[good])


# ---------------------------------------------------------------------------------------------
# Batching


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


# ---------------------------------------------------------------------------------------------
# Adjacency forms


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


# ---------------------------------------------------------------------------------------------
# PyG's explainers


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
        assert model.conv1._regular_sources(edge_index, None, 20, 20) is not None
    else:
        model = TwoConvs(path)
        edge_index = torch.stack([torch.randint(0, 20, (80,)), torch.randint(0, 20, (80,))])
        edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    if path in ("dense", "auto"):
        assert model.conv1._use_dense(edge_index, None, 20, 20)
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


# ---------------------------------------------------------------------------------------------
# TransformerConv weights


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
