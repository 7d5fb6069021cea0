"""BatchGraphConv's fast paths (regular kNN layout, dense, auto) equal its generic sparse path,
and the layer compiles without graph breaks."""

import copy
import shutil

import pytest
import torch

from bgf_pyg.graph import knn_edges
from bgf_pyg.nn import BatchGraphConv

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
    assert conv._regular_sources(edge_index, edge_attr, NUM_NODES, NUM_NODES) is not None
    out, ei, alpha, grads = run(conv, x, edge_index, edge_attr=edge_attr)

    # Reversed edge order is not sorted by target: the generic scatter-softmax path runs.
    reverse = edge_index.flip(1)
    assert conv._regular_sources(reverse, edge_attr, NUM_NODES, NUM_NODES) is None
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
    assert conv._regular_sources(edge_index, None, NUM_NODES, NUM_NODES) is None
    without_loops = edge_index[:, edge_index[0] != edge_index[1]]
    torch.testing.assert_close(conv(x, edge_index), conv(x, without_loops))


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
    assert other._use_dense(edge_index, None, NUM_NODES, NUM_NODES)  # 100 pairs, ≥ 37 edges
    out, ei, alpha, grads = run(other, x, edge_index)
    ref_out, ref_ei, ref_alpha, ref_grads = run(sparse, x, edge_index)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    assert torch.equal(ei, ref_ei)
    torch.testing.assert_close(alpha, ref_alpha, atol=1e-10, rtol=1e-10)
    assert_grads_close(grads, ref_grads)


def test_auto_picks_sparse_for_large_sparse_graphs():
    conv = BatchGraphConv(CHANNELS, OUT, attention_path="auto")
    edge_index = torch.zeros(2, 10 * 4096, dtype=torch.long)
    assert not conv._use_dense(edge_index, None, 4096, 4096)
    assert conv._use_dense(edge_index[:, :640], None, 64, 64)


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
