"""The CPU sparse-matrix SSA kernel against the float64 edge-by-edge reference: output, α and
the gradients of query, key and value, on graphs in any edge order with duplicates and isolated
nodes; and BatchGraphConv's use of it."""

import pytest
import torch

from bgf_pyg.nn import BatchGraphConv
from bgf_pyg.nn.kernels import csr_attention, csr_attention_supported
from tests.nn.routes import layer_route
from tests.reference import ssa_reference


def random_graph(num_src: int, num_dst: int, num_edges: int) -> torch.Tensor:
    """Unsorted random edges with a duplicate and no edge into the last target."""
    edge_index = torch.stack([
        torch.randint(0, num_src, (num_edges,)), torch.randint(0, num_dst - 1, (num_edges,))
    ])
    return torch.cat([edge_index, edge_index[:, :1]], dim=1)


def reference_with_grads(query, key, value, edge_index, grad, weight=None):
    """Reference output, α (E, H) and the gradients of (out · grad).sum()."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (query, key, value)]
    if weight is None:
        out, alphas = ssa_reference(*inputs, edge_index)
    else:  # dropout's multiplier acts on α in the sum only
        out = torch.zeros_like(grad)
        _, alphas = ssa_reference(*inputs, edge_index)
        for e, a in alphas.items():
            out = out.index_add(0, edge_index[1, e:e + 1], (a * weight[e]).view(1, -1, 1)
                                * inputs[2][edge_index[0, e]].unsqueeze(0))
    alpha = torch.stack([alphas[e] for e in range(edge_index.size(1))])
    grads = torch.autograd.grad((out * grad).sum(), inputs)
    return out.detach(), alpha.detach(), grads


@pytest.mark.parametrize("heads,channels", [(1, 3), (3, 4)])
@pytest.mark.parametrize("dropout", [False, True])
def test_csr_attention_equals_reference(heads, channels, dropout):
    num_src, num_dst, num_edges = 6, 5, 17
    edge_index = random_graph(num_src, num_dst, num_edges)
    query = torch.randn(num_dst, heads, channels, dtype=torch.float64, requires_grad=True)
    key, value = (
        torch.randn(num_src, heads, channels, dtype=torch.float64, requires_grad=True)
        for _ in range(2)
    )
    weight = None
    if dropout:
        weight = (torch.rand(num_edges + 1, heads) > 0.3).double() / 0.7
    out, alpha = csr_attention(query, key, value, edge_index, weight)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad((out * grad).sum(), (query, key, value))
    ref_out, ref_alpha, ref_grads = reference_with_grads(
        query, key, value, edge_index, grad, weight
    )
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(alpha, ref_alpha, atol=1e-12, rtol=1e-10)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # no in-edges: zeros, no NaN
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)


def test_csr_attention_gradient_through_alpha():
    edge_index = random_graph(5, 5, 12)
    inputs = [torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def both(q, k, v):
        out, alpha = csr_attention(q, k, v, edge_index)
        return out, alpha

    assert torch.autograd.gradcheck(both, inputs)


def test_csr_attention_supports_only_cpu_float():
    assert csr_attention_supported(torch.zeros(1), torch.zeros(1, dtype=torch.float64))
    assert not csr_attention_supported(torch.zeros(1, dtype=torch.bfloat16))


def test_conv_uses_kernel_and_equals_reference():
    x = torch.randn(8, 6, dtype=torch.float64)
    edge_index = random_graph(8, 8, 20)
    conv = BatchGraphConv(6, 4, heads=2, root_weight=True, attention_path="sparse").double()
    assert layer_route(conv, x, edge_index).path == "csr"
    out, (ei, alpha) = conv(x, edge_index, return_attention_weights=True)
    shape = (-1, 2, 4)
    with torch.no_grad():  # ei: the edges with the layer's self-loops
        ref, alphas = ssa_reference(
            conv.lin_query(x).view(shape), conv.lin_key(x).view(shape),
            conv.lin_value(x).view(shape), ei,
        )
        ref = ref.reshape(8, -1) + conv.lin_skip(x)
    assert ei.size(1) == 20 + 1 - int((edge_index[0] == edge_index[1]).sum()) + 8
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(alpha, torch.stack([alphas[e] for e in range(ei.size(1))]))


def test_csr_attention_with_more_edges_than_node_pairs():
    # 9 edges among 2 × 2 pairs: sampled_addmm refuses the pattern, the scores are gathered.
    edge_index = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 1, 1, 1, 1]])
    inputs = [torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    out, alpha = csr_attention(*inputs, edge_index)
    ref, alphas = ssa_reference(*(t.detach() for t in inputs), edge_index)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(alpha, torch.stack([alphas[e] for e in range(9)]))
    assert torch.autograd.gradcheck(lambda *t: csr_attention(*t, edge_index), inputs)
