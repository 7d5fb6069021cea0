"""Property tests (hypothesis) of the core library against independent float64 re-statements
(``tests/reference.py``): the batch graph, every attention path of BatchGraphConv (isolated nodes,
duplicate edges, NaN features), BGFormer on batches, ProxyGMLLoss and the retrieval metrics.

Examples are derandomised (the same ones on every run) and few, so the file stays within its time
budget; features come from seeded ``torch.randn`` so that similarities have no near-ties between
float32 and float64 except the exact ones built on purpose (duplicate and zero rows).
"""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch_geometric.data import Batch

from bgf_pyg import build_batch_graph
from bgf_pyg.losses import ProxyGMLLoss
from bgf_pyg.metrics import evaluate_retrieval
from bgf_pyg.nn import BatchGraphConv, BGFormer
from tests.reference import (
    cosine_reference,
    proxygml_reference,
    retrieval_reference,
    ssa_reference,
)


def bounded(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def features(seed: int, num_nodes: int, dim: int, zero_rows: int = 0, duplicates: int = 0,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Seeded Gaussian rows; the first ``zero_rows`` set to 0, the last ``duplicates`` copies of
    earlier rows (exact cosine ties)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_nodes, dim, generator=gen, dtype=torch.float64)
    x[:zero_rows] = 0.0
    for i in range(max(num_nodes - duplicates, 1), num_nodes):
        x[i] = x[int(torch.randint(0, i, (1,), generator=gen))]
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# build_batch_graph


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


# ---------------------------------------------------------------------------------------------
# BatchGraphConv, every attention path


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
        assert conv._regular_sources(edge_index, None, n, n) is not None
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


# ---------------------------------------------------------------------------------------------
# BGFormer on a PyG Batch


@bounded(15)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    labelled=st.lists(st.booleans(), min_size=3, max_size=3),
    k=st.integers(1, 4), loop=st.booleans(), seed=st.integers(0, 2**16),
    semantic_branch=st.sampled_from(["attention", "propagation"]),
    path=st.sampled_from(["sparse", "dense", "auto"]),
)
def test_bgformer_batch_equals_each_graph_alone(sizes, labelled, k, loop, seed, semantic_branch,
                                                path):
    torch.manual_seed(seed)
    graphs = []
    for size, has_pairs in zip(sizes, labelled, strict=False):
        # Labels with same-label pairs, or all distinct (no semantic edge unless loop=True).
        y = torch.randint(0, 2, (size,)) if has_pairs else torch.arange(size)
        graphs.append(build_batch_graph(torch.randn(size, 8, dtype=torch.float64), y, k=k,
                                        loop=loop))
    model = BGFormer(8, heads=2, semantic_branch=semantic_branch, attention_path=path,
                     add_self_loops=not loop).double().eval()
    out = model(Batch.from_data_list(graphs))
    for part, graph in zip(out.split(sizes), graphs, strict=True):
        torch.testing.assert_close(part, model(graph), atol=1e-10, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# ProxyGMLLoss


@bounded(30)
@given(
    num_classes=st.integers(1, 6), n=st.integers(1, 3), r=st.floats(0.01, 1.0),
    lam=st.sampled_from([0.0, 0.3]), batch=st.integers(1, 8), seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
)
def test_proxygml_matches_the_dense_reference(num_classes, n, r, lam, batch, seed, dtype):
    torch.manual_seed(seed)
    crit = ProxyGMLLoss(num_classes, 6, proxies_per_class=n, r=r, weight_lambda=lam)
    if dtype == torch.float64:
        crit = crit.double()
    x = torch.randn(batch, 6).to(dtype).requires_grad_(True)
    y = torch.randint(0, num_classes, (batch,))
    proxies = crit.proxies.detach().double().requires_grad_(True)
    loss = crit(x, y)
    expected = proxygml_reference(x.detach().double().requires_grad_(True), proxies, y,
                                  num_classes, n, r, lam)
    exact = dtype == torch.float64
    tol = dict(atol=1e-10, rtol=1e-9) if exact else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.double(), expected, **tol)
    grad_p, = torch.autograd.grad(loss, crit.proxies)
    ref_p, = torch.autograd.grad(expected, proxies)
    torch.testing.assert_close(grad_p.double(), ref_p, **tol)


# ---------------------------------------------------------------------------------------------
# Retrieval metrics


@bounded(30)
@given(
    num_samples=st.integers(2, 20), dim=st.integers(1, 5), num_classes=st.integers(1, 5),
    zero_rows=st.integers(0, 2), seed=st.integers(0, 2**16),
    chunk_size=st.one_of(st.none(), st.integers(1, 7)),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
)
def test_metrics_match_brute_force(num_samples, dim, num_classes, zero_rows, seed, chunk_size,
                                   dtype):
    emb = features(seed, num_samples, dim, zero_rows, 0, dtype)
    labels = torch.randint(0, num_classes, (num_samples,),
                           generator=torch.Generator().manual_seed(seed + 1))
    if int(labels.unique(return_counts=True)[1].max()) < 2:
        labels[1] = labels[0]  # MAP@R needs one class with two samples
    ks = sorted({1, min(2, num_samples - 1), num_samples - 1})
    result = evaluate_retrieval(emb, labels, ks=ks, with_nmi=False, chunk_size=chunk_size)
    expected = retrieval_reference(emb, labels, ks)
    assert result == {key: result[key] for key in expected}
    for key, value in expected.items():
        assert math.isclose(result[key], value, abs_tol=1e-6), key
