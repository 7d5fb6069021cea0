"""The fused Triton SSA kernel (``attention_path="fused"``) against the float64 edge-by-edge
reference: forward, α, and the gradients of query/key/value and of the layer's parameters, for
several heads and degrees, with isolated nodes and attention dropout.

Without a GPU the kernels run in Triton's CPU interpreter, which must be switched on before
Triton is first imported: ``test_interpreted_in_subprocess`` re-runs this file in a fresh
process with ``TRITON_INTERPRET=1`` (so other test files never see the interpreter), and the
kernel tests here run directly only in that process or on a CUDA device. Sizes are tiny: the
interpreter executes every program in Python.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bgf_pyg.graph import knn_edges
from bgf_pyg.nn import BatchGraphConv, kernels
from bgf_pyg.nn.kernels import csr_attention
from tests.reference import ssa_reference

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

kernel_tests = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRETED or DEVICE == "cuda"),
    reason="needs Triton and CUDA or TRITON_INTERPRET=1 (test_interpreted_in_subprocess runs "
    "them on CPU)",
)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.skipif(INTERPRETED, reason="already the interpreter process")
def test_interpreted_in_subprocess():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", __file__],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # The five kernel tests and the two error tests ran (not skipped) in the interpreter.
    assert "7 passed" in result.stdout, result.stdout[-2000:]


def graphs():
    """(name, edge_index, num_src, num_dst): kNN layouts of degree 1 and 4 (sorted by target),
    and an unsorted random graph with duplicates and two targets without in-edges."""
    x = torch.randn(6, 3, dtype=torch.float64)
    random = torch.stack([torch.randint(0, 7, (19,)), torch.randint(0, 5, (19,))])
    return [
        ("knn1", knn_edges(x, 1)[0], 6, 6),
        ("knn4", knn_edges(x, 4, loop=True)[0], 6, 6),
        ("random", torch.cat([random, random[:, :2]], dim=1), 7, 7),
    ]


def reference(query, key, value, edge_index, grad):
    inputs = [t.detach().clone().requires_grad_(True) for t in (query, key, value)]
    out, alphas = ssa_reference(*inputs, edge_index)
    grads = torch.autograd.grad((out * grad).sum(), inputs)
    alpha = torch.stack([alphas[e] for e in range(edge_index.size(1))])
    return out, alpha, grads


@kernel_tests
@pytest.mark.parametrize("heads,channels", [(1, 2), (3, 5)])
def test_fused_equals_reference(heads, channels):
    from bgf_pyg.nn.kernels.fused_triton import fused_attention

    for _, edge_index, num_src, num_dst in graphs():
        query = torch.randn(num_dst, heads, channels, dtype=torch.float64)
        key, value = (torch.randn(num_src, heads, channels, dtype=torch.float64) for _ in "kv")
        inputs = [t.to(DEVICE).requires_grad_(True) for t in (query, key, value)]
        out, alpha = fused_attention(*inputs, edge_index.to(DEVICE))
        grad = torch.randn_like(out)
        grads = torch.autograd.grad((out * grad).sum(), inputs)
        ref_out, ref_alpha, ref_grads = reference(query, key, value, edge_index, grad.cpu())
        assert not out.isnan().any()
        torch.testing.assert_close(out.cpu(), ref_out.detach(), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(alpha.cpu(), ref_alpha, atol=1e-12, rtol=1e-10)
        isolated = torch.ones(num_dst, dtype=torch.bool)
        isolated[edge_index[1]] = False
        assert torch.equal(out[isolated.to(DEVICE)], torch.zeros_like(out[isolated.to(DEVICE)]))
        for got, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got.cpu(), ref, atol=1e-12, rtol=1e-10)


@kernel_tests
def test_fused_dropout_weight_equals_sparse_kernel():
    from bgf_pyg.nn.kernels.fused_triton import fused_attention

    _, edge_index, num_src, num_dst = graphs()[2]
    inputs = [torch.randn(n, 2, 3, dtype=torch.float64) for n in (num_dst, num_src, num_src)]
    weight = (torch.rand(edge_index.size(1), 2) > 0.5).double() * 2.0
    fused = [t.to(DEVICE).requires_grad_(True) for t in inputs]
    out, _ = fused_attention(*fused, edge_index.to(DEVICE), weight.to(DEVICE))
    sparse = [t.clone().requires_grad_(True) for t in inputs]
    ref, _ = csr_attention(*sparse, edge_index, weight)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-12, rtol=1e-10)
    grads = torch.autograd.grad((out * grad.to(DEVICE)).sum(), fused)
    ref_grads = torch.autograd.grad((ref * grad).sum(), sparse)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.cpu(), expected, atol=1e-12, rtol=1e-10)


@kernel_tests
def test_fused_conv_parameter_grads_equal_sparse():
    _, edge_index, num_nodes, _ = graphs()[1]
    x = torch.randn(num_nodes, 4, dtype=torch.float64)
    sparse = BatchGraphConv(4, 3, heads=2, root_weight=True, attention_path="sparse").double()
    fused = BatchGraphConv(4, 3, heads=2, root_weight=True, attention_path="fused").double()
    fused.load_state_dict(sparse.state_dict())
    fused = fused.to(DEVICE)
    results = []
    for conv, device in ((sparse, "cpu"), (fused, DEVICE)):
        inp = x.to(device).requires_grad_(True)
        out, (ei, _) = conv(inp, edge_index.to(device), return_attention_weights=True)
        out.pow(2).sum().backward()
        grads = [p.grad.cpu() for p in conv.parameters()]
        results.append((out.cpu(), ei.cpu(), inp.grad.cpu(), grads))
    (out, ei, x_grad, p_grads), (f_out, f_ei, f_x_grad, f_p_grads) = results
    torch.testing.assert_close(f_out, out, atol=1e-12, rtol=1e-10)
    assert torch.equal(f_ei, ei)
    torch.testing.assert_close(f_x_grad, x_grad, atol=1e-12, rtol=1e-10)
    for got, ref in zip(f_p_grads, p_grads, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)


@pytest.mark.skipif(INTERPRETED or not HAS_TRITON, reason="needs Triton, not interpreted")
def test_fused_on_cpu_without_interpreter_is_a_clear_error():
    conv = BatchGraphConv(4, 2, attention_path="fused")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        conv(torch.randn(3, 4), torch.tensor([[0, 1], [1, 2]]))


def test_fused_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "bgf_pyg.nn.kernels._triton_kernels", raising=False)
    monkeypatch.delattr(kernels, "_triton_kernels", raising=False)
    conv = BatchGraphConv(4, 2, attention_path="fused")
    with pytest.raises(ImportError, match="needs Triton"):
        conv(torch.randn(3, 4), torch.tensor([[0, 1], [1, 2]]))


def test_fused_rejects_edge_features():
    conv = BatchGraphConv(4, 2, edge_dim=3, attention_path="fused")
    with pytest.raises(ValueError, match="attention_path='fused'"):
        conv(torch.randn(3, 4), torch.tensor([[0, 1], [1, 2]]), torch.randn(2, 3))


@kernel_tests
def test_fused_nan_reaches_exactly_its_neighbourhood():
    from bgf_pyg.nn.kernels.fused_triton import fused_attention

    _, edge_index, num_src, num_dst = graphs()[2]
    query, key, value = (torch.randn(n, 2, 3, dtype=torch.float64)
                         for n in (num_dst, num_src, num_src))
    node = int(edge_index[0, 0])
    key[node, 1, 0] = float("nan")  # one head of one source's key
    out, _ = fused_attention(query.to(DEVICE), key.to(DEVICE), value.to(DEVICE),
                             edge_index.to(DEVICE))
    bad = (~torch.isfinite(out.cpu())).any(dim=(1, 2))
    expected = torch.zeros(num_dst, dtype=torch.bool)
    expected[edge_index[1, edge_index[0] == node]] = True
    assert torch.equal(bad, expected)
    assert torch.isfinite(out[:, 0]).all()  # the other head is untouched
