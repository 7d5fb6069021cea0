"""TopKAttention (the authors' dynamic top-K visual branch) and BGFormer's ``visual_graph``
option, against float64 re-statements: several heads, K < N, K ≥ N, ties, batching, gradients,
a training step and the CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses
from torch_geometric.data import Batch

from bgf_pyg import BatchGraph, build_batch_graph
from bgf_pyg.cli import build_parser, main
from bgf_pyg.experiment.build import method_hparams
from bgf_pyg.losses import BatchGraphLoss
from bgf_pyg.losses import batch_graph as batch_graph_module
from bgf_pyg.models import EmbeddingNet, build_method
from bgf_pyg.nn import BatchGraphConv, BGFormer, DualSSA, TopKAttention
from tests.nn.test_bgformer import branch_reference
from tests.reference import topk_attention_reference, topk_weights_reference
from tests.test_cli import assert_user_error


def reference(module: TopKAttention, x: torch.Tensor, batch=None) -> torch.Tensor:
    """The module's output restated from its projections."""
    n, h, d = x.size(0), module.heads, module.out_channels
    q, k, v = (lin(x).detach().view(n, h, d)
               for lin in (module.lin_query, module.lin_key, module.lin_value))
    return topk_attention_reference(q, k, v, module.k, batch).reshape(n, h * d)


@pytest.mark.parametrize("num_nodes,k,heads", [(9, 3, 3), (12, 5, 4), (7, 1, 2)])
def test_matches_the_dense_reference_with_several_heads(num_nodes, k, heads):
    torch.manual_seed(num_nodes)
    module = TopKAttention(6, 4, heads=heads, k=k).double()
    x = torch.randn(num_nodes, 6, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference(module, x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("k", [8, 50])
def test_k_at_least_n_is_full_attention(k):
    torch.manual_seed(0)
    module = TopKAttention(6, 3, heads=2, k=k).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference(module, x), atol=1e-12, rtol=1e-12)
    # The same as SSA over the complete graph with self-loops, with the same projections.
    conv = BatchGraphConv(6, 3, heads=2).double()
    conv.load_state_dict(module.state_dict())
    complete = torch.ones(8, 8).nonzero().t()
    torch.testing.assert_close(module(x), conv(x, complete), atol=1e-12, rtol=1e-12)


def test_ties_the_lower_index_wins():
    # Integer features and identity query/key projections: the scores are exact multiples of
    # 1/2 (d = 4), so the ties are exact. Nodes 0, 2, 3, 5 are the same point.
    x = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0],
                      [1, 0, 0, 0]], dtype=torch.float64)
    module = TopKAttention(4, 4, heads=1, k=2).double()
    with torch.no_grad():
        for lin in (module.lin_query, module.lin_key):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
    out = module(x)
    value = module.lin_value(x).detach()
    # Row 0 scores 1/2 against nodes 0, 2, 3, 5: K = 2 keeps nodes 0 and 2, equal weights.
    torch.testing.assert_close(out[0], (value[0] + value[2]) / 2, atol=1e-12, rtol=1e-12)
    # Row 1 scores 1/2 against itself and 0 against all others: it keeps itself and node 0.
    expected = (torch.e ** 0.5 * value[1] + value[0]) / (torch.e ** 0.5 + 1)
    torch.testing.assert_close(out[1], expected, atol=1e-12, rtol=1e-12)
    module.k = 4  # the K-th score is tied again (row 1: 0 against nodes 0, 2, 3, 4, 5)
    torch.testing.assert_close(module(x), reference(module, x), atol=1e-12, rtol=1e-12)


def test_chunked_rows_equal_one_chunk():
    torch.manual_seed(1)
    x = torch.randn(11, 6, dtype=torch.float64)
    whole = TopKAttention(6, 2, heads=3, k=4).double()
    chunked = TopKAttention(6, 2, heads=3, k=4, chunk_size=3).double()
    chunked.load_state_dict(whole.state_dict())
    torch.testing.assert_close(chunked(x), whole(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("k", [2, 4, 10])  # 4 ≥ the first graph's 3 nodes: full attention there
def test_a_batch_of_graphs_equals_each_graph_alone(k):
    torch.manual_seed(k)
    module = TopKAttention(6, 2, heads=2, k=k, chunk_size=4).double()
    xs = [torch.randn(n, 6, dtype=torch.float64) for n in (3, 7, 5)]
    batch = torch.cat([torch.full((x.size(0),), i) for i, x in enumerate(xs)])
    out = module(torch.cat(xs), batch)
    torch.testing.assert_close(out, torch.cat([module(x) for x in xs]), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, reference(module, torch.cat(xs), batch), atol=1e-12,
                               rtol=1e-12)


def test_a_non_finite_row_stays_in_its_graph():
    module = TopKAttention(6, 2, heads=2, k=3)
    x = torch.randn(9, 6)
    x[6, 0] = float("nan")
    out = module(x, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1]))
    assert torch.isfinite(out[:4]).all()


def test_gradcheck():
    torch.manual_seed(2)
    module = TopKAttention(3, 2, heads=2, k=3).double()
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    batch = torch.tensor([0, 0, 0, 0, 1, 1])
    assert torch.autograd.gradcheck(lambda t: module(t), (x,))
    assert torch.autograd.gradcheck(lambda t: module(t, batch), (x,))
    module(x).square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_attention_dropout_acts_in_training_only():
    torch.manual_seed(3)
    module = TopKAttention(6, 2, heads=2, k=4, dropout=0.5)
    x = torch.randn(10, 6)
    expected = module.eval()(x)
    torch.testing.assert_close(module(x), expected)
    assert not torch.allclose(module.train()(x), expected)
    module.dropout = 0.0
    torch.testing.assert_close(module(x), expected)


def test_repr_reset_and_bad_arguments():
    module = TopKAttention(8, 4, heads=2, k=5)
    assert repr(module) == "TopKAttention(8, 4, heads=2, k=5)"
    before = module.lin_query.weight.clone()
    module.reset_parameters()
    assert not torch.equal(before, module.lin_query.weight)
    with pytest.raises(ValueError, match="k must be >= 1"):
        TopKAttention(8, 4, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        TopKAttention(8, 4, k=2.5)
    with pytest.raises(ValueError, match=r"batch must have shape \(3,\)"):
        module(torch.randn(3, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="x must have 8 columns"):
        module(torch.randn(3, 7))
    with pytest.raises(ValueError, match="topk must be >= 1"):
        BGFormer(8, heads=2, visual_graph="attention_topk", topk=0)
    with pytest.raises(ValueError, match="visual_graph must be one of"):
        DualSSA(8, heads=2, visual_graph="gat")


def test_dual_ssa_mixes_the_top_k_branch_with_the_semantic_one():
    torch.manual_seed(4)
    graph = build_batch_graph(torch.randn(10, 8, dtype=torch.float64),
                              torch.randint(0, 3, (10,)), k=3)
    module = DualSSA(8, heads=2, lam=0.3, visual_graph="attention_topk", k=4).double()
    visual = reference(module.visual, graph.x)
    semantic = branch_reference(module.semantic, graph.x, graph.semantic_edge_index)
    expected = F.linear(0.3 * visual + 0.7 * semantic, module.lin_out.weight, module.lin_out.bias)
    out = module(graph.x, None, graph.semantic_edge_index)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    alone = F.linear(visual, module.lin_out.weight, module.lin_out.bias)
    torch.testing.assert_close(module(graph.x), alone, atol=1e-10, rtol=1e-10)


def test_bgformer_needs_only_the_features_and_batches_graphs():
    torch.manual_seed(5)
    model = BGFormer(8, num_layers=2, heads=2, visual_graph="attention_topk", k=4).eval()
    assert repr(model) == ("BGFormer(8, num_layers=2, heads=2, visual_graph='attention_topk', "
                           "k=4)")
    graphs = [build_batch_graph(torch.randn(n, 8), torch.randint(0, 3, (n,)), k=2)
              for n in (6, 9)]
    x = graphs[0].x
    # Test time: x alone; given visual edges are not read.
    torch.testing.assert_close(model(x), model(x, graphs[0].visual_edge_index))
    torch.testing.assert_close(model(BatchGraph(x=x)), model(x))
    batched = model(Batch.from_data_list(graphs))
    torch.testing.assert_close(batched, torch.cat([model(g) for g in graphs]), atol=1e-5,
                               rtol=1e-4)


def test_batch_graph_loss_trains_without_building_a_knn_graph(monkeypatch):
    def no_knn(*args, **kwargs):
        raise AssertionError("the kNN graph was built")

    monkeypatch.setattr(batch_graph_module, "assemble_batch_graph", no_knn)
    torch.manual_seed(6)
    labels = torch.arange(4).repeat_interleave(3)
    features = (torch.randn(12, 16) + labels.view(-1, 1)).requires_grad_()
    bgformer = BGFormer(16, heads=4, visual_graph="attention_topk", k=5, lam=0.5)
    criterion = BatchGraphLoss(losses.MultiSimilarityLoss(), bgformer, alpha=0.3)
    loss = criterion(features, labels)
    same = labels.view(-1, 1) == labels.view(1, -1)
    semantic = (same & ~torch.eye(12, dtype=torch.bool)).nonzero().flip(1).t()  # j→i
    metric = losses.MultiSimilarityLoss()
    expected = 0.3 * metric(features, labels) + 0.7 * metric(
        bgformer(features, None, semantic), labels)
    torch.testing.assert_close(loss, expected)
    optimizer = torch.optim.SGD(bgformer.parameters(), lr=0.1)
    before = bgformer.layers[0].attn.visual.lin_query.weight.clone()
    loss.backward()
    optimizer.step()
    assert features.grad.abs().sum() > 0
    assert not torch.equal(before, bgformer.layers[0].attn.visual.lin_query.weight)


def test_method_passes_k_as_the_top_k():
    trunk = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU())
    method = build_method("bgformer", EmbeddingNet(trunk, 16, 8), 4, k=7, heads=2,
                          visual_graph="attention_topk")
    assert method.bgformer.visual_graph == "attention_topk" and method.bgformer.k == 7
    assert all(isinstance(layer.attn.visual, TopKAttention) and layer.attn.visual.k == 7
               for layer in method.bgformer.layers)
    loss = method(torch.randn(12, 10), torch.arange(4).repeat_interleave(3))
    loss.backward()
    assert torch.isfinite(loss)


def test_the_visual_k_has_one_name_from_the_method_to_the_attention():
    trunk = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU())
    method = build_method("bgformer", EmbeddingNet(trunk, 16, 8), 4, k=6, heads=2,
                          visual_graph="attention_topk")
    values = {method.visual_k, method.graph_loss.k, method.bgformer.k}
    for layer in method.bgformer.layers:
        values |= {layer.attn.k, layer.attn.visual.k}
    assert values == {6}


@pytest.mark.parametrize("cls", [BGFormer, DualSSA])
def test_topk_is_a_deprecated_name_of_k(cls):
    torch.manual_seed(0)
    new = cls(8, heads=2, visual_graph="attention_topk", k=4)
    with pytest.warns(DeprecationWarning, match=r"topk=...\) is deprecated.*now named k"):
        old = cls(8, heads=2, visual_graph="attention_topk", topk=4)
    assert old.k == 4 and repr(old) == repr(new)
    with pytest.warns(DeprecationWarning, match="topk is deprecated"):
        assert old.topk == 4
    old.load_state_dict(new.state_dict())  # strict: the same parameters and buffers
    x = torch.randn(6, 8)
    torch.testing.assert_close(old(x), new(x))
    with pytest.raises(TypeError, match="k=5 and topk=4: topk is the former name of k"):
        cls(8, heads=2, visual_graph="attention_topk", k=5, topk=4)


def test_cli_option_parses_and_reaches_the_method():
    args = build_parser().parse_args(["--method", "bgformer", "--visual-graph", "attention_topk",
                                      "--k", "12"])
    assert method_hparams(args)["visual_graph"] == "attention_topk"
    assert method_hparams(args)["k"] == 12
    assert method_hparams(build_parser().parse_args([]))["visual_graph"] == "knn"


@pytest.mark.parametrize("argv,fragments", [
    (["--visual-graph", "attention_topk", "--k", "0"], ("--k", "expected an integer >= 1")),
    (["--visual-graph", "attention_topk", "--k", "2.5"], ("--k", "'2.5'")),
    (["--visual-graph", "dynamic"], ("--visual-graph", "invalid choice: 'dynamic'")),
    (["--method", "plain", "--visual-graph", "attention_topk"],
     ("--visual-graph has no effect here", "--method bgformer")),
])
def test_cli_bad_values_are_one_line_errors(capsys, argv, fragments):
    assert_user_error(capsys, main([*argv, "--no-progress"]), *fragments)


def test_tiny_demo_run_with_the_top_k_visual_graph(tmp_path, capsys):
    # K = 40 exceeds the demo's 8 × 4 batch: full attention, which the kNN form would refuse.
    code = main(["--method", "bgformer", "--visual-graph", "attention_topk", "--k", "40",
                 "--epochs", "1", "--samples-per-class", "4", "--embedding-dim", "16",
                 "--graph-heads", "2", "--graph-layers", "1", "--out", str(tmp_path),
                 "--device", "cpu", "--no-augment", "--no-progress", "--select-on", "last"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.strip().splitlines()[-1].startswith("| bgformer |")
    assert '"visual_graph": "attention_topk"' in (tmp_path / "metrics.jsonl").read_text()


def projections(module: TopKAttention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    n, h, d = x.size(0), module.heads, module.out_channels
    return tuple(lin(x).detach().view(n, h, d)
                 for lin in (module.lin_query, module.lin_key, module.lin_value))


@pytest.mark.parametrize("with_batch", [False, True])
def test_returned_attention_weights_are_the_kept_ones(with_batch):
    torch.manual_seed(3)
    module = TopKAttention(6, 4, heads=3, k=4).double()
    x = torch.randn(11, 6, dtype=torch.float64)
    batch = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 0, 2, 2]) if with_batch else None
    with torch.no_grad():
        out, (edge_index, alpha) = module(x, batch, return_attention_weights=True)
        torch.testing.assert_close(out, module(x, batch), atol=0, rtol=0)
    query, key, _ = projections(module, x)
    expected = topk_weights_reference(query, key, 4, batch)
    assert edge_index.shape == (2, alpha.size(0), 3) and alpha.size(1) == 3
    assert (edge_index[1] == edge_index[1, :, :1]).all()  # one target per edge, all heads
    got = {}
    for e in range(alpha.size(0)):
        for h in range(3):
            source, target = int(edge_index[0, e, h]), int(edge_index[1, e, h])
            got.setdefault((target, h), {})[source] = float(alpha[e, h])
    assert got.keys() == expected.keys()
    for row, weights in expected.items():
        assert got[row].keys() == weights.keys(), row  # graph 2 has 2 nodes: K = 2 there
        for j, w in weights.items():
            assert abs(got[row][j] - w) < 1e-12
