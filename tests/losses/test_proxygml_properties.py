"""Property tests (hypothesis) of ProxyGMLLoss against its dense float64 re-statement
(``tests/reference.py``): value and proxy gradients in every float dtype.

Examples are derandomised and few (``tests/strategies.py``), so the file stays within its time
budget.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from bgf_pyg.losses import ProxyGMLLoss
from tests.reference import proxygml_reference
from tests.strategies import bounded


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
