"""IntraBatchMPN against dense float64 re-statements of the original dvl-tum/intra_batch math."""

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from bgf_pyg.losses import LabelSmoothingCE
from bgf_pyg.nn import IntraBatchAttention, IntraBatchMPN
from bgf_pyg.nn.intra_batch import softmax_with_zero_logit

D, H = 8, 2


def _dense_attention(x, mask, wq, bq, wk, bk, wv, bv, wo, bo, heads, zero_logit=True):
    """Dense multi-head attention; mask[i, j] is True for an edge j -> i."""
    n, dim = x.shape
    d = dim // heads
    q = (x @ wq.T + bq).view(n, heads, d)
    k = (x @ wk.T + bk).view(n, heads, d)
    v = (x @ wv.T + bv).view(n, heads, d)
    s = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
    e = torch.exp(s) * mask  # zero where there is no edge
    denom = e.sum(-1, keepdim=True) + (1.0 if zero_logit else 0.0)
    a = e / denom.clamp_min(1e-300)  # an isolated node gets all-zero weights
    out = torch.einsum("hij,jhd->ihd", a, v).reshape(n, dim)
    return out @ wo.T + bo


def _layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _randomise(module: nn.Module) -> nn.Module:
    """Random float64 values for every parameter and buffer (positive running variances)."""
    module.double()
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point():
                t.normal_(0.0, 0.5)
    return module


class _RefAtt(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.q_linear, self.k_linear = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_linear, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim)


class _RefLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.att = _RefAtt(dim)
        self.linear1, self.linear2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)


class _RefGNN(nn.Module):
    """A stand-in with the parameter names of the original GNNReID."""

    def __init__(self, dim, num_layers, num_classes, cat=False):
        super().__init__()
        self.dim_red = nn.Linear(dim, dim)
        self.gnn_model = nn.Module()
        self.gnn_model.node_model = nn.Module()
        self.gnn_model.node_model.layers = nn.ModuleList(_RefLayer(dim) for _ in range(num_layers))
        width = dim * num_layers if cat else dim
        self.bottleneck = nn.Sequential(nn.BatchNorm1d(width))
        self.fc = nn.Sequential(nn.Linear(width, num_classes, bias=False))

    def dense_forward(self, x, mask, heads, cat=False):
        h = x @ self.dim_red.weight.T + self.dim_red.bias
        outs = []
        for lay in self.gnn_model.node_model.layers:
            a = lay.att
            m = _dense_attention(h, mask, a.q_linear.weight, a.q_linear.bias, a.k_linear.weight,
                                 a.k_linear.bias, a.v_linear.weight, a.v_linear.bias,
                                 a.out.weight, a.out.bias, heads)
            h = _layer_norm(h + m, lay.norm1.weight, lay.norm1.bias)
            f = torch.relu(h @ lay.linear1.weight.T + lay.linear1.bias)
            f = f @ lay.linear2.weight.T + lay.linear2.bias
            h = _layer_norm(h + f, lay.norm2.weight, lay.norm2.bias)
            outs.append(h)
        h = torch.cat(outs, -1) if cat else h
        bn = self.bottleneck[0]
        z = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        return z @ self.fc[0].weight.T, h


def _random_graph(n, isolated=0, p=0.4):
    """A random edge set (no duplicates) where node ``isolated`` has no in- or out-edges."""
    mask = torch.rand(n, n) < p
    mask[isolated, :] = False
    mask[:, isolated] = False
    dst, src = mask.nonzero().T
    return torch.stack([src, dst]), mask.double()


def _att_weights(att):
    lins = (att.lin_query, att.lin_key, att.lin_value, att.lin_out)
    return [t for lin in lins for t in (lin.weight, lin.bias)]


@pytest.mark.parametrize("zero_logit", [True, False])
def test_attention_matches_dense_on_sparse_graph(zero_logit):
    att = _randomise(IntraBatchAttention(D, heads=H, zero_logit=zero_logit)).eval()
    x = torch.randn(7, D, dtype=torch.float64)
    edge_index, mask = _random_graph(7)
    expected = _dense_attention(x, mask, *_att_weights(att), H, zero_logit=zero_logit)
    assert_close(att(x, edge_index), expected)


def test_isolated_node_gets_output_bias():
    att = _randomise(IntraBatchAttention(D, heads=H)).eval()
    edge_index, _ = _random_graph(6, isolated=2)
    out = att(torch.randn(6, D, dtype=torch.float64), edge_index)
    assert_close(out[2], att.lin_out.bias)


@pytest.mark.parametrize("zero_logit", [True, False])
def test_attention_matches_dense_on_complete_graph(zero_logit):
    att = _randomise(IntraBatchAttention(D, heads=H, zero_logit=zero_logit)).eval()
    x = torch.randn(5, D, dtype=torch.float64)
    src, dst = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    edge_index = torch.stack([src.flatten(), dst.flatten()])
    expected = _dense_attention(x, torch.ones(5, 5, dtype=torch.float64), *_att_weights(att), H,
                                zero_logit=zero_logit)
    assert_close(att(x, edge_index), expected)


def test_zero_logit_softmax_matches_formula_with_large_scores():
    index = torch.tensor([0, 0, 0, 1, 1, 3])
    src = torch.randn(6, 2) * 30  # large scores exercise the stable shift
    alpha = softmax_with_zero_logit(src, index, num_nodes=4)
    s = src.double()
    denom = 1 + torch.zeros(4, 2, dtype=torch.float64).index_add(0, index, s.exp())
    assert_close(alpha.double(), s.exp() / denom[index], rtol=1e-5, atol=1e-6)


def test_zero_logit_weights_sum_below_one():
    index = torch.tensor([0, 0, 0, 1, 1, 3])
    src = torch.randn(6, 2, dtype=torch.float64)
    sums = torch.zeros(4, 2, dtype=src.dtype).index_add(
        0, index, softmax_with_zero_logit(src, index, num_nodes=4)
    )[[0, 1, 3]]
    phantom = 1 / (1 + torch.zeros(4, 2, dtype=src.dtype).index_add(0, index, src.exp()))
    assert bool((sums < 1).all())
    assert_close(sums, 1 - phantom[[0, 1, 3]])


@pytest.mark.parametrize("num_layers,cat", [(1, False), (2, True)])
def test_full_mpn_matches_dense_in_eval(num_layers, cat):
    ref = _randomise(_RefGNN(D, num_layers, num_classes=5, cat=cat))
    mpn = IntraBatchMPN(D, num_layers=num_layers, heads=H, num_classes=5, cat=cat).double()
    mpn.load_reference_state_dict(ref.state_dict())
    x = torch.randn(6, D, dtype=torch.float64)
    logits, h = mpn.eval()(x)
    ref_logits, ref_h = ref.dense_forward(x, torch.ones(6, 6, dtype=torch.float64), H, cat=cat)
    assert_close(h, ref_h)
    assert_close(logits, ref_logits)


def test_cat_shapes_and_no_classifier():
    logits, h = IntraBatchMPN(D, num_layers=3, heads=H, num_classes=4, cat=True)(torch.randn(5, D))
    assert h.shape == (5, 3 * D) and logits.shape == (5, 4)
    logits, h = IntraBatchMPN(D, heads=H)(torch.randn(5, D))
    assert logits is None and h.shape == (5, D)


def test_none_edge_index_is_complete_graph_with_self_loops():
    mpn = IntraBatchMPN(D, heads=H).eval()
    x = torch.randn(4, D)
    src, dst = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    full = torch.stack([dst.flatten(), src.flatten()])  # a different edge order
    assert_close(mpn(x)[1], mpn(x, full)[1])


def test_bnneck_bias_frozen_and_classifier_init():
    mpn = IntraBatchMPN(64, heads=2, num_classes=300)
    assert not mpn.bottleneck.bias.requires_grad and mpn.classifier.bias is None
    assert mpn.classifier.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert_close(mpn.layers[0].attn.lin_query.bias, torch.zeros(64))


def test_load_reference_round_trip():
    ref = _randomise(_RefGNN(D, 2, num_classes=3))
    a = IntraBatchMPN(D, num_layers=2, heads=H, num_classes=3).double()
    b = IntraBatchMPN(D, num_layers=2, heads=H, num_classes=3).double()
    a.load_reference_state_dict(ref.state_dict())
    b.load_reference_state_dict(ref.state_dict())
    assert_close(a.bottleneck.running_var, ref.bottleneck[0].running_var)
    x = torch.randn(5, D, dtype=torch.float64)
    assert_close(a.eval()(x), b.eval()(x))


def test_load_reference_missing_key_is_named():
    sd = _RefGNN(D, 1, num_classes=3).state_dict()
    del sd["gnn_model.node_model.layers.0.att.k_linear.bias"]
    with pytest.raises(KeyError, match="layers.0.att.k_linear.bias"):
        IntraBatchMPN(D, heads=H, num_classes=3).load_reference_state_dict(sd)


def test_load_reference_unexpected_key_is_named():
    sd = _RefGNN(D, 1, num_classes=3).state_dict()
    sd["gnn_model.node_model.layers.1.norm1.weight"] = torch.ones(D)
    with pytest.raises(KeyError, match="layers.1.norm1.weight"):
        IntraBatchMPN(D, heads=H, num_classes=3).load_reference_state_dict(sd)


def test_load_reference_shape_mismatch_is_named():
    sd = _RefGNN(D, 1, num_classes=3).state_dict()
    with pytest.raises(ValueError, match="fc.0.weight"):
        IntraBatchMPN(D, heads=H, num_classes=4).load_reference_state_dict(sd)


def test_bad_inputs_name_the_argument():
    mpn = IntraBatchMPN(D, heads=H)
    with pytest.raises(ValueError, match="x"):
        mpn(torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="x"):
        mpn(torch.full((4, D), float("nan")))
    with pytest.raises(ValueError, match="edge_index"):
        mpn(torch.randn(4, D), torch.tensor([[0, 4], [1, 1]]))
    with pytest.raises(ValueError, match="heads"):
        IntraBatchMPN(D, heads=3)


def test_label_smoothing_ce_matches_dense():
    logits, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    t, eps = 0.2, 0.1
    target = (1 - eps) * torch.eye(5, dtype=torch.float64)[y] + eps / 5
    expected = -(target * torch.log_softmax(logits / t, dim=1)).sum(1).mean()
    assert_close(LabelSmoothingCE(t, eps)(logits, y), expected)
    with pytest.raises(ValueError, match="labels"):
        LabelSmoothingCE(t)(logits, torch.full((6,), 5))
