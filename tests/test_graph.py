"""build_batch_graph and BatchGraph against brute-force re-statements."""

import pytest
import torch
from torch_geometric.data import Batch

from bgf_pyg import BatchGraph, build_batch_graph
from bgf_pyg.knn import cosine_topk
from tests.reference import cosine_reference


def edge_set(edge_index: torch.Tensor) -> set[tuple[int, int]]:
    return set(map(tuple, edge_index.t().tolist()))


def brute_force_knn(x: torch.Tensor, k: int) -> set[tuple[int, int]]:
    x = x.double()
    sim = (x / x.norm(dim=1, keepdim=True)) @ (x / x.norm(dim=1, keepdim=True)).t()
    edges = set()
    for i in range(x.size(0)):
        others = [j for j in range(x.size(0)) if j != i]
        others.sort(key=lambda j: (-float(sim[i, j]), j))
        edges |= {(j, i) for j in others[:k]}
    return edges


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_visual_edges_are_the_k_nearest_by_cosine(chunk_size):
    x = torch.randn(30, 8)
    graph = build_batch_graph(x, k=4, chunk_size=chunk_size)
    assert edge_set(graph.visual_edge_index) == brute_force_knn(x, 4)
    assert torch.equal(torch.bincount(graph.visual_edge_index[1]), torch.full((30,), 4))
    src, dst = graph.visual_edge_index
    cosine = torch.nn.functional.cosine_similarity(x[src], x[dst])
    torch.testing.assert_close(graph.visual_edge_weight, cosine)


def test_k_at_least_n_gives_the_complete_graph():
    graph = build_batch_graph(torch.randn(5, 3), k=50)
    expected = {(j, i) for i in range(5) for j in range(5) if i != j}
    assert edge_set(graph.visual_edge_index) == expected


def test_ties_go_to_the_lower_index():
    x = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]])
    graph = build_batch_graph(x, k=2)
    assert edge_set(graph.visual_edge_index) >= {(1, 0), (2, 0), (0, 1), (2, 1), (0, 2), (1, 2)}
    _, index = cosine_topk(x, k=2, exclude_self=True, chunk_size=1)
    assert index[3].tolist() == [0, 1]


def test_semantic_edges_join_every_same_label_pair():
    y = torch.randint(0, 4, (25,))
    graph = build_batch_graph(torch.randn(25, 3), y, k=3)
    expected = {(j, i) for i in range(25) for j in range(25) if i != j and y[i] == y[j]}
    assert edge_set(graph.semantic_edge_index) == expected
    assert graph.num_semantic_edges == len(expected)


def test_self_loops_are_added_to_both_edge_sets():
    y = torch.tensor([0, 0, 1, 2])
    graph = build_batch_graph(torch.randn(4, 3), y, k=2, loop=True)
    loops = {(i, i) for i in range(4)}
    assert loops <= edge_set(graph.visual_edge_index)
    assert loops <= edge_set(graph.semantic_edge_index)
    assert torch.equal(torch.bincount(graph.visual_edge_index[1]), torch.full((4,), 3))


def test_no_labels_gives_no_semantic_edges():
    graph = build_batch_graph(torch.randn(6, 3), k=2)
    assert graph.semantic_edge_index.shape == (2, 0)
    assert graph.validate()


def test_batching_offsets_both_edge_sets():
    graphs = [
        build_batch_graph(torch.randn(n, 3), torch.randint(0, 2, (n,)), k=2) for n in (4, 6)
    ]
    batch = Batch.from_data_list(graphs)
    assert batch.num_graphs == 2
    second = batch.get_example(1)
    assert torch.equal(second.visual_edge_index, graphs[1].visual_edge_index)
    assert torch.equal(second.semantic_edge_index, graphs[1].semantic_edge_index)
    assert batch.visual_edge_index[:, graphs[0].num_visual_edges :].min() >= 4
    assert isinstance(BatchGraph(), BatchGraph)  # every argument may be None


def test_validate_catches_out_of_range_edges():
    graph = BatchGraph(x=torch.randn(3, 2), visual_edge_index=torch.tensor([[0], [7]]))
    assert not graph.validate(raise_on_error=False)
    with pytest.raises(ValueError, match="visual_edge_index"):
        graph.validate()


@pytest.mark.parametrize(
    ("x", "y", "k", "match"),
    [
        (torch.randn(5, 3), None, 0, "k must be >= 1"),
        (torch.randn(5, 3), None, 2.5, "k must be an int"),
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), None, 1, "x contains NaN or inf"),
        (torch.tensor([[0.0, float("inf")], [1.0, 2.0]]), None, 1, "x contains NaN or inf"),
        (torch.randn(5), None, 1, "x must be a 2-D tensor"),
        (torch.randn(5, 3), torch.zeros(4, dtype=torch.long), 1, r"y must have shape \(5,\)"),
        (torch.randn(5, 3), torch.zeros(5), 1, "y must be an integer tensor"),
    ],
)
def test_bad_input_names_the_argument(x, y, k, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_batch_graph(x, y, k=k)


def test_large_graph_in_bounded_chunks():
    # 3,000 nodes in chunks of 50 rows: never more than 50 × 3,000 similarities at once.
    x = torch.randn(3000, 16)
    graph = build_batch_graph(x, k=5, chunk_size=50)
    assert graph.num_visual_edges == 15000
    reference = build_batch_graph(x, k=5)
    assert torch.equal(graph.visual_edge_index, reference.visual_edge_index)


@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("num_nodes", [0, 1])
def test_batch_graph_of_zero_or_one_node(num_nodes, loop):
    graph = build_batch_graph(torch.randn(num_nodes, 4), torch.zeros(num_nodes).long(), loop=loop)
    loops = [[i, i] for i in range(num_nodes)] if loop else []
    assert graph.visual_edge_index.t().tolist() == loops
    assert graph.semantic_edge_index.t().tolist() == loops
    assert graph.visual_edge_weight.tolist() == [1.0] * len(loops)
    graph.validate()


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
