"""ProxyGMLLoss against a dense float64 re-statement of the original YuehuaZhu/ProxyGML loss
(``tests.reference.proxygml_reference``)."""

import math

import pytest
import torch
from torch.testing import assert_close

from bgf_pyg.losses import ProxyGMLLoss
from tests.reference import proxygml_reference


@pytest.mark.parametrize("num_classes,n,r,lam", [(6, 4, 0.3, 0.3), (10, 2, 0.05, 0.0),
                                                 (25, 3, 0.05, 0.3)])
def test_value_and_gradients_match_dense(num_classes, n, r, lam):
    crit = ProxyGMLLoss(num_classes, 10, proxies_per_class=n, r=r, weight_lambda=lam).double()
    x = torch.randn(8, 10, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, num_classes, (8,))
    proxies = crit.proxies.detach().clone().requires_grad_(True)
    loss = crit(x, y)
    expected = proxygml_reference(x, proxies, y, num_classes, n, r, lam)
    assert_close(loss, expected)
    gx, gp = torch.autograd.grad(loss, (x, crit.proxies))
    ex, ep = torch.autograd.grad(expected, (x, proxies))
    assert_close(gx, ex)
    assert_close(gp, ep)


def test_positives_always_in_subgraph():
    # k = N: the sub-graph holds exactly the N positives, even when x points away from them, so
    # only the true class survives the mask and the loss is 0.
    crit = ProxyGMLLoss(10, 16, proxies_per_class=3, r=0.1, weight_lambda=0.0)
    assert crit.k == 3
    y = torch.tensor([0, 4, 7])
    x = -crit.proxies.detach().view(10, 3, 16)[y].sum(1)
    assert crit(x, y).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("num_classes,n,r", [(100, 12, 0.05), (98, 12, 0.05), (11318, 1, 0.05),
                                             (3, 2, 1.0)])
def test_k_is_ceil_r_c_n(num_classes, n, r):
    crit = ProxyGMLLoss(num_classes, 4, proxies_per_class=n, r=r)
    assert crit.k == min(math.ceil(r * num_classes * n), num_classes * n)


def test_r_one_is_plain_ce_over_all_classes():
    crit = ProxyGMLLoss(5, 8, proxies_per_class=3, r=1.0, weight_lambda=0.0).double()
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    s = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(
        crit.proxies.detach(), dim=1).T
    z = s.view(6, 5, 3).sum(-1)
    expected = -(z[torch.arange(6), y] - torch.logsumexp(z, dim=1)).mean()
    assert_close(crit(x, y), expected)


def test_sop_like_large_class_count_runs():
    crit = ProxyGMLLoss(11318, 32, proxies_per_class=1, weight_lambda=0.0)
    x = torch.randn(4, 32, requires_grad=True)
    loss = crit(x, torch.tensor([0, 5, 11317, 5]))
    loss.backward()
    assert torch.isfinite(loss) and crit.k == 566
    assert int((crit.proxies.grad.abs().sum(1) > 0).sum()) <= 4 * 566


def test_proxy_layout_and_init():
    crit = ProxyGMLLoss(7, 5, proxies_per_class=4)
    assert crit.proxies.shape == (28, 5)
    assert float(crit.proxies.abs().max()) <= 1 / math.sqrt(28)
    assert crit.proxy_labels().tolist() == [c for c in range(7) for _ in range(4)]


def test_batch_of_one():
    crit = ProxyGMLLoss(4, 6, proxies_per_class=2)
    assert torch.isfinite(crit(torch.randn(1, 6), torch.tensor([3])))


def test_labels_out_of_range():
    with pytest.raises(ValueError, match="labels"):
        ProxyGMLLoss(4, 6)(torch.randn(3, 6), torch.tensor([0, 1, 4]))


def test_wrong_embedding_width():
    with pytest.raises(ValueError, match="embeddings"):
        ProxyGMLLoss(4, 6)(torch.randn(3, 5), torch.tensor([0, 1, 2]))


def test_nan_embedding():
    x = torch.randn(3, 6)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="embeddings"):
        ProxyGMLLoss(4, 6)(x, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_proxygml_takes_every_float_dtype_and_a_zero_row(dtype):
    torch.manual_seed(3)
    crit = ProxyGMLLoss(5, 6, proxies_per_class=2, r=0.3, weight_lambda=0.3)
    x = torch.randn(6, 6).to(dtype)
    x[2] = 0.0
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    x.requires_grad_(True)
    loss = crit(x, y)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(loss)
    loss.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    # Non-zero rows against the float64 re-statement of the original (zero rows tie everywhere,
    # so the proxies they select depend on the tie order; they are checked below).
    keep = torch.tensor([0, 1, 3, 4, 5])
    expected = proxygml_reference(x.detach()[keep].double(), crit.proxies.detach().double(),
                                  y[keep], 5, 2, 0.3, 0.3)
    torch.testing.assert_close(crit(x.detach()[keep], y[keep]).double(), expected,
                               atol=1e-5, rtol=1e-5)


def test_proxygml_zero_row_is_uniform_over_the_selected_classes():
    crit = ProxyGMLLoss(4, 5, proxies_per_class=3, r=1.0, weight_lambda=0.0)
    loss = crit(torch.zeros(1, 5), torch.tensor([2]))
    assert loss.item() == pytest.approx(math.log(4))  # Z = 0 for all 4 classes: log 4
