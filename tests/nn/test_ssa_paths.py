"""``kernels.ssa``: every attention path, asked for by name, against a dense float64 reference on
fresh random inputs (regular kNN graphs, irregular degrees with duplicates and targets without
in-edges, bipartite, input self-loops replaced by added ones, edge features); the ``auto`` and
``sparse`` rules; clear errors where a named path cannot run; and the PyG behaviour that keeps
``BatchGraphConv``'s hook check (its fused route skips ``message`` hooks)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.utils import to_torch_csr_tensor

from bgf_pyg.graph import knn_edges
from bgf_pyg.nn import BatchGraphConv
from bgf_pyg.nn.kernels.ssa import PATHS, Route, select_path, ssa_attention

HEADS, DIM = 2, 3
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
FUSED_RUNS = HAS_TRITON and (DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not HAS_TRITON or FUSED_RUNS, reason="no Triton, or the fused tests run here")
def test_fused_path_interpreted_in_subprocess():
    """Without a GPU the fused path runs in Triton's CPU interpreter, which must be switched on
    before Triton is first imported: a fresh process runs this file's fused reference tests."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", __file__,
         "-k", "test_every_path_equals_the_dense_reference and fused"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{len(SHAPES)} passed" in result.stdout, result.stdout[-2000:]


def dense_reference(query, key, value, edge_index, add_self_loops, edge=None):
    """Out (N_dst, H, d) and α per edge of ``edge_index'`` (input edges, loops replaced when
    ``add_self_loops``), from the (N_dst, N_src) edge-count matrix A: α_ij ∝ A_ij exp(s_ij).
    ``edge`` (E, H, d) adds per-pair features to keys and values (graphs without duplicates)."""
    query, key, value = query.double(), key.double(), value.double()
    num_dst, num_src = query.size(0), key.size(0)
    src, dst = edge_index
    if add_self_loops:
        keep = src != dst
        src, dst = src[keep], dst[keep]
        loops = torch.arange(min(num_src, num_dst))
        src, dst = torch.cat([src, loops]), torch.cat([dst, loops])
    count = torch.zeros(num_dst, num_src, dtype=torch.float64)
    count.index_put_((dst, src), torch.ones(len(src), dtype=torch.float64), accumulate=True)
    pair = torch.zeros(num_dst, num_src, HEADS, DIM, dtype=torch.float64)
    if edge is not None:
        pair[dst, src] = edge.double()
    keys = key.unsqueeze(0) + pair  # (N_dst, N_src, H, d)
    score = (query.unsqueeze(1) * keys).sum(-1) / math.sqrt(DIM)  # (N_dst, N_src, H)
    score = score.masked_fill(count.unsqueeze(-1) == 0, -math.inf)
    peak = score.amax(dim=1, keepdim=True).nan_to_num(neginf=0.0)
    weight = count.unsqueeze(-1) * (score - peak).exp()
    weight = weight / weight.sum(dim=1, keepdim=True).clamp(min=1e-300)
    out = (weight.unsqueeze(-1) * (value.unsqueeze(0) + pair)).sum(dim=1)
    alpha = weight[dst, src] / count[dst, src].unsqueeze(-1)
    return out, torch.stack([src, dst]), alpha


def graph(shape):
    """(edge_index, num_src, num_dst, add_self_loops) of one test shape."""
    x = torch.randn(10, 4)
    if shape == "knn":
        return knn_edges(x, 3)[0], 10, 10, True
    if shape == "knn_loops":
        return knn_edges(x, 3, loop=True)[0], 10, 10, False
    if shape == "irregular":  # duplicates, input loops, two targets without in-edges
        edge_index = torch.stack([torch.randint(0, 10, (25,)), torch.randint(0, 8, (25,))])
        extra = torch.cat([edge_index[:, :4], torch.arange(3).repeat(2, 1)], dim=1)
        return torch.cat([edge_index, extra], dim=1), 10, 10, False
    if shape == "irregular_looped":
        edge_index = torch.stack([torch.randint(0, 10, (25,)), torch.randint(0, 10, (25,))])
        return edge_index, 10, 10, True
    if shape == "bipartite":  # 7 sources, 4 targets, 2 in-edges each from sources 4-6, + loops
        edge_index = torch.stack([torch.randint(4, 7, (8,)), torch.arange(4).repeat_interleave(2)])
        return edge_index, 7, 4, True
    raise AssertionError(shape)


SHAPES = ["knn", "knn_loops", "irregular", "irregular_looped", "bipartite"]
REGULAR = {"knn", "knn_loops", "bipartite"}


def inputs(num_src, num_dst, device="cpu"):
    return [torch.randn(n, HEADS, DIM, dtype=torch.float64, device=device)
            for n in (num_dst, num_src, num_src)]


# The regular path takes regular layouts only (its refusal of others is tested below).
CASES = [(path, shape) for path in PATHS for shape in SHAPES
         if path != "regular" or shape in REGULAR]


@pytest.mark.parametrize(("path", "shape"), CASES)
def test_every_path_equals_the_dense_reference(path, shape):
    if path == "fused" and not FUSED_RUNS:
        pytest.skip("needs Triton and CUDA (or TRITON_INTERPRET=1)")
    torch.manual_seed(SHAPES.index(shape) + 10 * PATHS.index(path))
    edge_index, num_src, num_dst, loops = graph(shape)
    device = DEVICE if path == "fused" else "cpu"
    query, key, value = inputs(num_src, num_dst, device)
    out, (ei, alpha) = ssa_attention(query, key, value, edge_index.to(device), path=path,
                                     add_self_loops=loops, need_weights=True)
    ref, ref_ei, ref_alpha = dense_reference(query.cpu(), key.cpu(), value.cpu(), edge_index,
                                             loops)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-10, rtol=1e-10)
    assert torch.equal(ei.cpu(), ref_ei)
    torch.testing.assert_close(alpha.cpu(), ref_alpha, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("path", ["regular", "edges", "sparse", "auto"])
def test_edge_features_equal_the_dense_reference(path):
    torch.manual_seed(3)
    edge_index, num_src, num_dst, _ = graph("knn")
    query, key, value = inputs(num_src, num_dst)
    edge = torch.randn(edge_index.size(1), HEADS, DIM, dtype=torch.float64)
    out, (ei, alpha) = ssa_attention(query, key, value, edge_index, edge=edge, path=path,
                                     need_weights=True)
    ref, _, ref_alpha = dense_reference(query, key, value, edge_index, False, edge)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    assert torch.equal(ei, edge_index)
    torch.testing.assert_close(alpha, ref_alpha, atol=1e-10, rtol=1e-10)


def test_no_weights_unless_asked_and_the_same_output():
    edge_index, num_src, num_dst, loops = graph("irregular_looped")
    query, key, value = inputs(num_src, num_dst)
    for path in ("dense", "csr", "regular", "edges"):
        if path == "regular":
            edge_index, num_src, num_dst, loops = graph("knn")
            query, key, value = inputs(num_src, num_dst)
        out, weights = ssa_attention(query, key, value, edge_index, path=path,
                                     add_self_loops=loops)
        assert weights is None
        again, _ = ssa_attention(query, key, value, edge_index, path=path,
                                 add_self_loops=loops, need_weights=True)
        torch.testing.assert_close(out, again, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    ("shape", "dtype", "edge_features", "path", "expected"),
    [
        ("knn", torch.float64, False, "auto", "dense"),  # 100 pairs ≤ 12 · 40 edges
        ("knn", torch.float64, False, "sparse", "csr"),  # CPU float: the sparse-matrix kernel
        ("knn", torch.bfloat16, False, "sparse", "regular"),  # no CPU kernel for bfloat16
        ("knn", torch.float64, True, "auto", "regular"),  # edge features: never dense
        ("knn_loops", torch.bfloat16, False, "sparse", "regular"),
        ("irregular", torch.bfloat16, False, "sparse", "edges"),
        ("irregular", torch.float64, True, "auto", "edges"),
    ],
)
def test_choosing_rules(shape, dtype, edge_features, path, expected):
    edge_index, num_src, num_dst, loops = graph(shape)
    query = torch.zeros(num_dst, HEADS, DIM, dtype=dtype)
    loops = loops and not edge_features
    route = select_path(query, edge_index, num_src, path=path, edge_features=edge_features,
                        add_self_loops=loops)
    assert route.path == expected
    assert (route.source is not None) == (expected == "regular")


def test_auto_takes_the_sparse_choice_on_large_sparse_graphs():
    edge_index = torch.stack([torch.arange(4096).repeat(2), torch.arange(4096).roll(1).repeat(2)])
    route = select_path(torch.zeros(4096, 1, 1), edge_index, 4096, path="auto")
    assert route.path == "csr"


@pytest.mark.parametrize(
    ("shape", "path", "edge", "loops", "dtype", "match"),
    [
        ("knn", "fast", False, False, torch.float64, "path must be one of"),
        ("knn", "fused", True, False, torch.float64, "path='fused' takes no edge features"),
        ("knn", "dense", True, False, torch.float64, "path='dense' takes no edge features"),
        ("knn", "csr", True, False, torch.float64, "path='csr' takes no edge features"),
        ("knn", "csr", False, False, torch.bfloat16, "path='csr' runs on CPU float32/float64"),
        ("irregular", "regular", False, False, torch.float64, "path='regular' needs the same"),
        ("knn_loops", "regular", False, True, torch.float64, "path='regular' needs the same"),
        ("knn", "edges", True, True, torch.float64, "add_self_loops=True takes no edge"),
    ],
)
def test_a_path_that_cannot_run_is_refused(shape, path, edge, loops, dtype, match):
    edge_index, num_src, num_dst, _ = graph(shape)
    query, key, value = (t.to(dtype) for t in inputs(num_src, num_dst))
    edge = torch.randn(edge_index.size(1), HEADS, DIM, dtype=dtype) if edge else None
    with pytest.raises(ValueError, match=match):
        ssa_attention(query, key, value, edge_index, edge=edge, path=path, add_self_loops=loops)


def test_conv_names_attention_path_in_its_errors():
    x = torch.randn(10, 4)
    edge_index, *_ = graph("irregular")
    with pytest.raises(ValueError, match="attention_path='regular' needs the same"):
        BatchGraphConv(4, 3, attention_path="regular")(x, edge_index)
    with pytest.raises(ValueError, match="attention_path must be one of"):
        BatchGraphConv(4, 3, attention_path="csr")  # its CPU kernel runs under "sparse"


@pytest.mark.parametrize("path", ["auto", "sparse", "dense", "regular", "edges"])
@pytest.mark.parametrize("edge_dim", [None, 2])
def test_conv_on_every_path_equals_the_dense_reference(path, edge_dim):
    torch.manual_seed(5)
    x = torch.randn(10, 4, dtype=torch.float64)
    edge_index, _ = knn_edges(x, 3)
    loops = edge_dim is None  # loops' edge features are means of the others: not in the reference
    conv = BatchGraphConv(4, DIM, heads=HEADS, edge_dim=edge_dim, add_self_loops=loops,
                          attention_path=path).double()
    edge_attr = None if edge_dim is None else torch.randn(edge_index.size(1), 2,
                                                          dtype=torch.float64)
    out, (ei, alpha) = conv(x, edge_index, edge_attr, return_attention_weights=True)
    shape = (-1, HEADS, DIM)
    query, key, value = (lin(x).view(shape) for lin in (conv.lin_query, conv.lin_key,
                                                        conv.lin_value))
    edge = None if edge_attr is None else conv.lin_edge(edge_attr).view(shape)
    ref, ref_ei, ref_alpha = dense_reference(query, key, value, edge_index, loops, edge)
    torch.testing.assert_close(out, ref.reshape(10, -1), atol=1e-10, rtol=1e-10)
    assert torch.equal(ei, ref_ei)
    torch.testing.assert_close(alpha, ref_alpha, atol=1e-10, rtol=1e-10)


def test_a_route_is_run_without_choosing_again():
    edge_index, num_src, num_dst, _ = graph("knn")
    query, key, value = inputs(num_src, num_dst)
    route = select_path(query, edge_index, num_src, path="regular")
    out, _ = ssa_attention(query, key, value, edge_index, path=route)
    ref, _ = ssa_attention(query, key, value, edge_index, path=Route("edges"))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_pyg_fused_route_skips_message_hooks():
    """Why ``BatchGraphConv._observed`` reads the hook dictionaries: had its fast paths gone into
    ``message_and_aggregate``, PyG's ``propagate`` would still take that route with a ``message``
    hook registered (AttentionExplainer's), so the hook would never see α. Outside explain
    mode PyG fuses whenever the layer implements it and the adjacency is sparse."""

    class Fusing(MessagePassing):
        def forward(self, x, edge_index):
            return self.propagate(edge_index, x=x)

        def message(self, x_j):
            return x_j

        def message_and_aggregate(self, adj_t, x):
            return adj_t @ x

    layer, seen = Fusing(aggr="add"), []
    layer.register_message_forward_hook(lambda module, inputs, out: seen.append(out))
    edge_index = torch.tensor([[0, 1, 2], [1, 2, 0]])
    x = torch.randn(3, 2)
    adj_t = to_torch_csr_tensor(edge_index.flip(0), size=(3, 3))
    torch.testing.assert_close(layer(x, adj_t), layer(x, edge_index))
    assert len(seen) == 1  # only the edge-list call ran message; the sparse one fused
