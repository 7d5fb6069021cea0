"""The PCE loss against a float64 re-statement of Hyp-ViT's pairwise cross-entropy (one
``F.cross_entropy`` per ordered slot pair, Möbius addition written out vector by vector)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bgf_pyg.losses import PairwiseCrossEntropyLoss
from bgf_pyg.losses.pce import BALL_EPS, poincare_distance

TAU, C, CLIP_R = 0.2, 0.1, 2.3


def ref_ball(x: torch.Tensor, clip_r: float | None = CLIP_R) -> torch.Tensor:
    """Clip to ``clip_r``, then exp_0 on the ball of curvature C, then Hyp-ViT's projection to
    radius (1 - 1e-3) / sqrt(C)."""
    norm = x.norm(dim=1, keepdim=True)
    if clip_r is not None:
        x = x * torch.clamp(clip_r / norm, max=1.0)
    norm = x.norm(dim=1, keepdim=True)
    ball = torch.tanh(math.sqrt(C) * norm) * x / (math.sqrt(C) * norm)
    max_norm = (1 - 1e-3) / math.sqrt(C)
    ball_norm = ball.norm(dim=1, keepdim=True)
    return torch.where(ball_norm > max_norm, ball / ball_norm * max_norm, ball)


def ref_mobius_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ab, a2, b2 = a @ b, a @ a, b @ b
    return ((1 + 2 * C * ab + C * b2) * a + (1 - C * a2) * b) / (1 + 2 * C * ab + C**2 * a2 * b2)


def ref_similarity(x: torch.Tensor, y: torch.Tensor, space: str) -> torch.Tensor:
    if space == "sphere":
        return x @ y.t()
    out = torch.empty(len(x), len(y), dtype=x.dtype)
    for i in range(len(x)):
        for j in range(len(y)):
            v = ref_mobius_add(-x[i], y[j])
            # norm via a tiny floor: d(x, x) = 0 is masked anyway, but sqrt(0)'s gradient is not
            nrm = (v @ v + 1e-30).sqrt()
            # hyptorch's artanh clamps its argument to 1 - 1e-5 (reached only at the boundary)
            out[i, j] = -2 / math.sqrt(C) * torch.atanh((math.sqrt(C) * nrm).clamp(max=1 - 1e-5))
    return out


def ref_pce(emb: torch.Tensor, m: int, space: str, clip_r: float | None = CLIP_R) -> torch.Tensor:
    z = F.normalize(emb, dim=1) if space == "sphere" else ref_ball(emb, clip_r)
    z = z.view(-1, m, z.size(1))
    p = z.size(0)
    loss = emb.new_zeros(())
    for i in range(m):
        for j in range(m):
            if i == j:
                continue
            a, b = z[:, i], z[:, j]
            logits = torch.cat([ref_similarity(a, b, space) / TAU,
                                ref_similarity(a, a, space) / TAU - 1e9 * torch.eye(p)], dim=1)
            loss = loss + F.cross_entropy(logits, torch.arange(p))
    return loss


@settings(max_examples=6, deadline=None)
@given(p=st.integers(2, 4), m=st.integers(2, 4), space=st.sampled_from(["sphere", "hyperbolic"]),
       scale=st.sampled_from([0.3, 1.0, 5.0]), seed=st.integers(0, 2**16))
def test_pce_matches_reference_value_and_gradient(p, m, space, scale, seed):
    g = torch.Generator().manual_seed(seed)
    emb = (scale * torch.randn(p * m, 6, generator=g, dtype=torch.float64)).requires_grad_()
    labels = (10 + torch.randperm(p, generator=g)).repeat_interleave(m)  # any distinct ids
    loss = PairwiseCrossEntropyLoss(m, TAU, space, C, CLIP_R)(emb, labels)
    (grad,) = torch.autograd.grad(loss, emb)
    emb_ref = emb.detach().clone().requires_grad_()
    ref = ref_pce(emb_ref, m, space)
    (grad_ref,) = torch.autograd.grad(ref, emb_ref)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-7, atol=1e-9)


def test_pce_float32_batch_trains_without_nan():
    emb = torch.randn(12, 8, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(3)
    loss = PairwiseCrossEntropyLoss(3, space="hyperbolic")(emb, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


@pytest.mark.parametrize("labels,fragment", [
    ([0, 0, 1, 1, 2], "batch of 5 samples"),           # not a multiple of m
    ([0, 1, 0, 1, 2, 2], "got labels"),                 # not consecutive
    ([0, 0, 1, 1, 0, 0], "more than one group"),        # a class twice
    ([3, 3], "batch of 2 samples"),                     # a single class: no negative
])
def test_pce_refuses_other_layouts(labels, fragment):
    loss = PairwiseCrossEntropyLoss(samples_per_class=2)
    with pytest.raises(ValueError, match="samples_per_class=2") as err:
        loss(torch.randn(len(labels), 4), torch.tensor(labels))
    assert fragment in str(err.value)


def test_pce_bad_arguments():
    with pytest.raises(ValueError, match="samples_per_class must be >= 2"):
        PairwiseCrossEntropyLoss(samples_per_class=1)
    with pytest.raises(ValueError, match="space"):
        PairwiseCrossEntropyLoss(space="euclid")
    bad = [({"temperature": math.inf}, "temperature"), ({"temperature": 0.0}, "temperature"),
           ({"c": math.nan}, "curvature"), ({"clip_r": -1.0}, "clip_r")]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=f"{name}.* must be a finite number > 0"):
            PairwiseCrossEntropyLoss(**kwargs)
    with pytest.raises(TypeError, match="temperature must be a float"):
        PairwiseCrossEntropyLoss(temperature="0.2")


def test_pce_computes_in_float32_under_autocast():
    emb = torch.randn(8, 6)
    labels = torch.arange(2).repeat_interleave(4)
    loss_fn = PairwiseCrossEntropyLoss(4, space="hyperbolic")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(emb.bfloat16(), labels)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, loss_fn(emb.bfloat16().float(), labels))


@pytest.mark.parametrize(("space", "clip_r"),
                         [("sphere", CLIP_R), ("hyperbolic", CLIP_R), ("hyperbolic", None)])
def test_pce_huge_finite_rows_keep_their_direction(space, clip_r):
    """A float32 row whose plain norm overflows (> ~1.8e19) maps like the same direction at norm
    100 (beyond the clip radius and tanh's saturation): the same loss, finite gradients."""
    torch.manual_seed(0)
    emb, labels = torch.randn(9, 6), torch.arange(3).repeat_interleave(3)
    huge = {0: 1e25, 4: 3e30, 8: 1e20}
    big, moderate = emb.clone(), emb.clone()
    for row, scale in huge.items():
        big[row] = emb[row] * scale
        moderate[row] = emb[row] / emb[row].norm() * 100
    loss_fn = PairwiseCrossEntropyLoss(3, TAU, space, C, clip_r)
    big.requires_grad_()
    loss = loss_fn(big, labels)
    loss.backward()
    # float32 points on the projection radius: the distances' rounding is amplified there
    tol = 1e-4 if clip_r is None else 1e-5
    torch.testing.assert_close(loss, loss_fn(moderate, labels), rtol=tol, atol=tol)
    torch.testing.assert_close(loss, ref_pce(moderate.double(), 3, space, clip_r).float(),
                               rtol=tol, atol=tol)
    assert torch.isfinite(big.grad).all()


def test_pce_float16_zero_row_on_the_sphere_has_a_zero_gradient():
    torch.manual_seed(1)
    emb = torch.randn(8, 6).half()
    emb[2] = 0
    emb.requires_grad_()
    labels = torch.arange(2).repeat_interleave(4)
    loss = PairwiseCrossEntropyLoss(4, space="sphere")(emb, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
    assert torch.equal(emb.grad[2], torch.zeros(6, dtype=torch.float16))
    torch.testing.assert_close(loss, ref_pce(emb.detach().double(), 4, "sphere").float(),
                               rtol=1e-3, atol=1e-3)


def ref_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Hyp-ViT's vector form in float64: 2 / sqrt(c) artanh(sqrt(c) ||-x (+)_c y||)."""
    return -ref_similarity(x.double(), y.double(), "hyperbolic")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("radius", [0.5, 0.99, 1 - BALL_EPS])  # sqrt(c) ||x||
def test_poincare_distance_to_itself_is_zero_near_the_boundary(radius, dtype):
    torch.manual_seed(2)
    x = torch.randn(5, 6, dtype=torch.float64)
    x = (x / x.norm(dim=1, keepdim=True) * radius / math.sqrt(C)).to(dtype).requires_grad_()
    dist = poincare_distance(x, x, C)
    assert dist.diagonal().abs().max() < 1e-6
    tol = 1e-9 if dtype == torch.float64 else 1e-2  # float32 points near the boundary
    torch.testing.assert_close(dist.double(), ref_distance(x.detach(), x.detach()),
                               rtol=tol, atol=tol)
    dist.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_pce_saturated_batch_matches_the_vector_form():
    """Without clipping, large embeddings land on the projection radius; samples of a class that
    coincide there are at distance 0, as in Hyp-ViT's vector form."""
    torch.manual_seed(3)
    # Classes 3e-4 apart in direction: on the boundary that is a distance of a few units.
    base = torch.randn(1, 6, dtype=torch.float64)
    directions = base + 3e-4 * torch.randn(4, 6, dtype=torch.float64)
    emb = (40 * directions).repeat_interleave(3, dim=0)
    emb[1::3] += 4e-3 * torch.randn(4, 6, dtype=torch.float64)  # one sample per class moved
    labels = torch.arange(4).repeat_interleave(3)
    loss = PairwiseCrossEntropyLoss(3, TAU, "hyperbolic", C, clip_r=None)(emb, labels)
    torch.testing.assert_close(loss, ref_pce(emb, 3, "hyperbolic", clip_r=None),
                               rtol=1e-9, atol=1e-9)
