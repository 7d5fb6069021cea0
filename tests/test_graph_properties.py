"""Property tests (hypothesis) of ``build_batch_graph`` against brute-force float64 k nearest
neighbours and same-label pairs (``tests/reference.py``), with zero and duplicate rows.

Examples are derandomised and few (``tests/strategies.py``), so the file stays within its time
budget.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from bgf_pyg import build_batch_graph
from tests.reference import cosine_reference
from tests.strategies import bounded, features


@bounded(40)
@given(
    seed=st.integers(0, 2**16), num_nodes=st.integers(0, 12), dim=st.integers(1, 5),
    k=st.integers(1, 14), loop=st.booleans(), num_classes=st.integers(1, 4),
    zero_rows=st.integers(0, 2), duplicates=st.integers(0, 2),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
)
def test_batch_graph_matches_brute_force(seed, num_nodes, dim, k, loop, num_classes, zero_rows,
                                         duplicates, dtype):
    x = features(seed, num_nodes, dim, zero_rows, duplicates, dtype)
    y = torch.randint(0, num_classes, (num_nodes,), generator=torch.Generator().manual_seed(seed))
    graph = build_batch_graph(x, y, k=k, loop=loop)
    graph.validate()
    cos = cosine_reference(x)
    degree = min(k, max(num_nodes - 1, 0))
    src, dst = graph.visual_edge_index
    weight = graph.visual_edge_weight.double()
    assert graph.visual_edge_weight.dtype == dtype and torch.isfinite(weight).all()
    tol = 2e-3 if dtype == torch.float16 else 1e-6
    for i in range(num_nodes):
        mine = (dst == i).nonzero().view(-1)
        sources, weights = src[mine].tolist(), weight[mine]
        if loop:
            assert sources[0] == i and weights[0] == 1.0
            sources, weights = sources[1:], weights[1:]
        assert len(sources) == degree == len(set(sources)) and i not in sources
        torch.testing.assert_close(weights, cos[i, sources], atol=tol, rtol=0)
        rest = [j for j in range(num_nodes) if j != i and j not in sources]
        if sources and rest:  # the k most similar: nothing left out is more similar
            assert float(cos[i, sources].min()) >= float(cos[i, rest].max()) - 1e-6
        assert bool((weights[:-1] >= weights[1:] - tol).all())  # sorted, most similar first
    expected = {(j, i) for i in range(num_nodes) for j in range(num_nodes)
                if y[i] == y[j] and (loop or i != j)}
    assert set(map(tuple, graph.semantic_edge_index.t().tolist())) == expected
    assert graph.num_semantic_edges == len(expected)
