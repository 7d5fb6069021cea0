"""Property tests (hypothesis) of every attention path of BatchGraphConv against the float64
edge-by-edge reference (``tests/reference.py``): isolated nodes, duplicate edges, NaN features.

Examples are derandomised and few (``tests/strategies.py``), so the file stays within its time
budget.
"""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from bgf_pyg.nn import BatchGraphConv
from tests.nn.routes import layer_route
from tests.reference import ssa_reference
from tests.strategies import bounded


@st.composite
def conv_cases(draw):
    path = draw(st.sampled_from(["sparse", "dense", "auto", "knn"]))
    num_nodes = draw(st.integers(1, 8))
    add_self_loops = draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if path == "knn":  # the regular layout: every target k in-edges, sorted by target
        degree = draw(st.integers(0, 4))
        sources = torch.randint(0, num_nodes, (num_nodes, degree), generator=gen)
        if add_self_loops:  # the fast path takes loop-free input only
            if num_nodes == 1:
                sources = sources[:, :0]
            else:
                shift = torch.randint(1, num_nodes, sources.shape, generator=gen)
                sources = (torch.arange(num_nodes).view(-1, 1) + shift) % num_nodes
        target = torch.arange(num_nodes).repeat_interleave(sources.size(1))
        edge_index = torch.stack([sources.reshape(-1), target])
    else:  # random order, duplicates, self-loops and isolated targets
        isolated = draw(st.integers(0, num_nodes - 1))
        num_edges = draw(st.integers(0, 24))
        edge_index = torch.stack([
            torch.randint(0, num_nodes, (num_edges,), generator=gen),
            torch.randint(0, num_nodes - isolated, (num_edges,), generator=gen),
        ])
        edge_index = torch.cat([edge_index, edge_index[:, : draw(st.integers(0, 4))]], dim=1)
    nan_node = draw(st.one_of(st.none(), st.integers(0, num_nodes - 1)))
    return dict(
        path=path, edge_index=edge_index, num_nodes=num_nodes, add_self_loops=add_self_loops,
        nan_node=nan_node, bad_value=draw(st.sampled_from([math.nan, math.inf, -math.inf])),
        heads=draw(st.integers(1, 3)), channels=draw(st.integers(1, 3)),
        concat=draw(st.booleans()), root_weight=draw(st.booleans()), seed=draw(st.integers(0, 99)),
    )


def effective_edges(edge_index: torch.Tensor, num_nodes: int, add_self_loops: bool):
    """The edges attention runs over: with added loops, existing loops go and i→i comes last."""
    if not add_self_loops:
        return edge_index
    kept = edge_index[:, edge_index[0] != edge_index[1]]
    return torch.cat([kept, torch.arange(num_nodes).repeat(2, 1)], dim=1)


@bounded(60)
@given(case=conv_cases())
def test_every_attention_path_matches_the_edge_by_edge_reference(case):
    torch.manual_seed(case["seed"])
    n, edge_index = case["num_nodes"], case["edge_index"]
    x = torch.randn(n, 5, dtype=torch.float64)
    if case["nan_node"] is not None:
        x[case["nan_node"], 0] = case["bad_value"]
    x.requires_grad_(True)
    path = case["path"]
    conv = BatchGraphConv(
        5, case["channels"], heads=case["heads"], concat=case["concat"],
        add_self_loops=case["add_self_loops"], root_weight=case["root_weight"],
        attention_path="sparse" if path == "knn" else path,
    ).double()
    if path == "knn":
        assert layer_route(conv, x, edge_index, path="regular").source is not None
    out, (ei, alpha) = conv(x, edge_index, return_attention_weights=True)

    expected_ei = effective_edges(edge_index, n, case["add_self_loops"])
    assert torch.equal(ei, expected_ei)
    h, d = case["heads"], case["channels"]
    q, k, v = (lin(x).view(-1, h, d) for lin in (conv.lin_query, conv.lin_key, conv.lin_value))
    ref, ref_weights = ssa_reference(q, k, v, expected_ei)
    ref = ref.reshape(n, -1) if case["concat"] else ref.mean(dim=1)
    if case["root_weight"]:
        ref = ref + conv.lin_skip(x)
    # Non-finite exactly where the reference is: the rows whose neighbourhood holds the bad node.
    finite = torch.isfinite(out)
    assert torch.equal(finite, torch.isfinite(ref))
    torch.testing.assert_close(out[finite], ref[finite], atol=1e-10, rtol=1e-9)
    if math.isnan(case["bad_value"]):  # with NaN input the weights are NaN as in the reference
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9, equal_nan=True)
        for e, weight in ref_weights.items():
            torch.testing.assert_close(alpha[e], weight, atol=1e-10, rtol=1e-9, equal_nan=True)
    if case["nan_node"] is None:
        probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        anchor = 0.0 * x.sum()  # keeps x in the graph when no output depends on it
        grad, = torch.autograd.grad((out * probe).sum() + anchor, x, retain_graph=True)
        ref_grad, = torch.autograd.grad((ref * probe).sum() + anchor, x)
        torch.testing.assert_close(grad, ref_grad, atol=1e-9, rtol=1e-8)
