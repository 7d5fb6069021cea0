"""Property attacks on TopKAttention, against the float64 re-statement of
``tests/reference.py``: relabelling the nodes permutes the output, K ≥ N is full attention,
identical nodes get identical outputs, a batch vector in any order (with graph ids left
unused) equals each graph alone, and gradients stay finite on duplicate and zero rows."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from bgf_pyg.nn import TopKAttention
from tests.nn.test_topk_attention import reference
from tests.strategies import bounded, features

EXACT = {"atol": 1e-12, "rtol": 1e-12}
shapes = st.tuples(st.integers(0, 2**16), st.integers(1, 14), st.integers(1, 16),
                   st.integers(1, 3))


def module_for(seed: int, k: int, heads: int, chunk_size: int | None = None) -> TopKAttention:
    torch.manual_seed(seed)
    return TopKAttention(5, 3, heads=heads, k=k, chunk_size=chunk_size).double()


@bounded(20)
@given(shapes)
def test_relabelling_the_nodes_permutes_the_output(drawn):
    """Tie-free scores: node i's K are found by value, so the node order does not matter."""
    seed, n, k, heads = drawn
    module, x = module_for(seed, k, heads), features(seed, n, 5)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(module(x[order]), module(x)[order], **EXACT)
    torch.testing.assert_close(module(x), reference(module, x), **EXACT)


@bounded(15)
@given(shapes, st.integers(0, 5))
def test_k_at_least_the_graph_is_full_attention(drawn, extra):
    seed, n, _, heads = drawn
    x = features(seed, n, 5)
    full = module_for(seed, n + extra, heads)
    with torch.no_grad():
        q, key, v = (lin(x).view(n, heads, 3).transpose(0, 1)
                     for lin in (full.lin_query, full.lin_key, full.lin_value))
        dense = ((q @ key.transpose(1, 2)) / 3 ** 0.5).softmax(-1) @ v
    torch.testing.assert_close(full(x), dense.transpose(0, 1).reshape(n, -1), **EXACT)


@bounded(15)
@given(shapes, st.integers(1, 4))
def test_identical_nodes_get_identical_outputs(drawn, duplicates):
    """Exact score ties: a copy of a node has the copy's scores, so the same K (the lower index
    wins ties in both rows) and the same output; the reference agrees on who wins."""
    seed, n, k, heads = drawn
    x = features(seed, n + duplicates, 5, duplicates=duplicates)
    module = module_for(seed, k, heads)
    out = module(x)
    torch.testing.assert_close(out, reference(module, x), **EXACT)
    for i in range(n, n + duplicates):
        twin = int(next(j for j in range(i) if torch.equal(x[j], x[i])))
        torch.testing.assert_close(out[i], out[twin], **EXACT)


@bounded(15)
@given(shapes, st.lists(st.sampled_from([0, 1, 2, 5, -3, 10**12]), min_size=1, max_size=30),
       st.integers(1, 4))
def test_a_batch_in_any_order_equals_each_graph_alone(drawn, graph_of, chunk):
    """Interleaved nodes, graph ids left unused (empty graphs), negative or huge ids (a
    ``bincount`` of the ids allocated the largest id's length and crashed), chunked rows."""
    seed, _, k, heads = drawn
    batch = torch.tensor(graph_of)
    x = features(seed, len(graph_of), 5)
    module = module_for(seed, k, heads, chunk_size=chunk)
    out = module(x, batch)
    for graph in batch.unique():
        nodes = (batch == graph).nonzero().flatten()
        torch.testing.assert_close(out[nodes], module(x[nodes]), **EXACT)


@bounded(10)
@given(shapes, st.integers(0, 3), st.integers(0, 3))
def test_gradients_are_finite_on_duplicate_and_zero_rows(drawn, zero_rows, duplicates):
    seed, n, k, heads = drawn
    x = features(seed, n + zero_rows + duplicates, 5, zero_rows=zero_rows,
                 duplicates=duplicates).requires_grad_()
    module = module_for(seed, k, heads)
    module(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())
