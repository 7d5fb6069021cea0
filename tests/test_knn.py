"""``cosine_topk`` and ``normalize_rows``: empty and out-of-range k, zero rows in every float
dtype (cosine 0, zero gradient), and huge finite rows."""

import pytest
import torch

from bgf_pyg.knn import cosine_topk, normalize_rows
from tests.reference import cosine_reference


def test_cosine_topk_k_zero_and_clear_bound():
    values, index = cosine_topk(torch.randn(3, 2), k=0, exclude_self=True)
    assert values.shape == index.shape == (3, 0)
    with pytest.raises(ValueError, match=r"k must lie in \[0, 2\] .*self excluded.*got 3"):
        cosine_topk(torch.randn(3, 2), k=3, exclude_self=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_zero_row_has_cosine_zero_in_every_dtype(dtype):
    torch.manual_seed(0)
    x = torch.randn(12, 6)
    x[4] = 0.0
    sim, index = cosine_topk(x.to(dtype), k=11, exclude_self=True)
    assert torch.isfinite(sim).all()
    reference = cosine_reference(x.to(dtype))
    # The zero row ranks where cosine 0 ranks, and as a query all its neighbours tie at 0, so
    # they come in index order.
    assert index[4].tolist() == [j for j in range(12) if j != 4]
    assert torch.equal(sim[4], torch.zeros(11, dtype=sim.dtype))
    for i in range(12):
        torch.testing.assert_close(sim[i].double(), reference[i, index[i]], atol=1e-2, rtol=0)


def test_normalize_rows_zero_row_is_zero_with_zero_gradient():
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(normalize_rows(x), x / x.norm(dim=1, keepdim=True))
    assert torch.autograd.gradcheck(normalize_rows, (x.requires_grad_(True),))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        z = torch.zeros(2, 4, dtype=dtype, requires_grad=True)
        out = normalize_rows(z)
        assert out.dtype == torch.float32 and torch.equal(out, torch.zeros(2, 4))
        (out * torch.randn(2, 4)).sum().backward()
        assert torch.equal(z.grad, torch.zeros_like(z))


def test_normalize_rows_of_huge_finite_rows_keeps_their_direction():
    """A float32 row beyond ~1.8e19 has an infinite plain norm (x / inf = 0 before)."""
    x = torch.randn(4, 5, dtype=torch.float64)
    big = (x * torch.tensor([[1e20], [3e30], [1.0], [1e-6]], dtype=torch.float64)).float()
    big.requires_grad_()
    out = normalize_rows(big)
    torch.testing.assert_close(out, (x / x.norm(dim=1, keepdim=True)).float())
    (out * torch.randn(4, 5)).sum().backward()
    assert torch.isfinite(big.grad).all()
