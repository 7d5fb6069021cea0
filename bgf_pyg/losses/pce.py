r"""The pairwise cross-entropy (PCE) loss of Hyp-ViT, as BGFormer's authors train with it.

Ermolov et al., "Hyperbolic Vision Transformers: Combining Improvements in Metric Learning",
CVPR 2022 (``htdt/hyp_metric``, ``train.py :: contrastive_loss``); the same loss drives the BGFormer
first author's released training script (``SissiW/DyBGR``, ``train.py``), see
``docs/design.rst`` §8.

A batch holds P classes × m consecutive samples, each class once. Slot i of the batch is
:math:`Z_i = (z_{p,i})_{p}` (P × D). For every ordered pair of slots :math:`i \ne j`, the
positive of :math:`z_{p,i}` is :math:`z_{p,j}` and its negatives are every other class's sample in
slot j and in slot i; the loss is the sum over the pairs of the cross-entropy of

.. math::
    \big[\, s(Z_i, Z_j) / \tau \;\big\|\; s(Z_i, Z_i) / \tau - 10^9 I \,\big],
    \qquad \text{target: the diagonal,}

with :math:`s(x, y) = x^\top y` on the unit sphere (embeddings L2-normalised) or
:math:`s(x, y) = -d_c(x, y)`, the Poincaré distance of curvature :math:`c`, on the Poincaré ball
(embeddings clipped to norm ``clip_r`` and mapped by the exponential map at 0, as Hyp-ViT's
``ToPoincare(clip_r=...)`` head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import (
    check_features,
    check_labels,
    check_positive_float,
    check_positive_int,
    naming,
)

SPACES = ("sphere", "hyperbolic")
#: Logit offset that removes a sample's similarity to itself (Hyp-ViT's ``eye_mask``).
SELF_MASK = 1e9
#: Points are kept this far inside the ball's boundary (hyptorch's ``project``, float32).
BALL_EPS = 1e-3
#: Smallest norm / squared norm used in a division or a square root (zero vectors, self-distances).
MIN_NORM = 1e-15
#: Keeps ``artanh``'s argument below 1 (hyptorch's ``artanh`` clamp).
ARTANH_EPS = 1e-5


def to_poincare_ball(x: Tensor, c: float, clip_r: float | None) -> Tensor:
    r"""Clip ``x`` to norm ``clip_r`` (feature clipping), then map it onto the Poincaré ball of
    curvature ``c`` by :math:`\exp_0(u) = \tanh(\sqrt c \|u\|)\, u / (\sqrt c \|u\|)`, kept
    ``BALL_EPS`` inside the boundary."""
    norm = x.norm(dim=-1, keepdim=True).clamp_min(MIN_NORM)
    if clip_r is not None:
        scale = torch.clamp(clip_r / norm, max=1.0)
        x, norm = x * scale, norm * scale
    sqrt_c = c**0.5
    ball = torch.tanh(sqrt_c * norm) * x / (sqrt_c * norm)
    max_norm = (1.0 - BALL_EPS) / sqrt_c
    ball_norm = ball.norm(dim=-1, keepdim=True).clamp_min(MIN_NORM)
    return torch.where(ball_norm > max_norm, ball / ball_norm * max_norm, ball)


def poincare_distance(x: Tensor, y: Tensor, c: float) -> Tensor:
    r"""Pairwise Poincaré distances (N × M) of points on the ball of curvature ``c``:
    :math:`d_c(x, y) = \frac{2}{\sqrt c} \operatorname{artanh}(\sqrt c\, \|(-x) \oplus_c y\|)`.

    The norm of the Möbius sum is expanded in inner products, so no N × M × D tensor is formed:
    with :math:`a = -x`, :math:`a \oplus_c y = (A a + B y) / E`, :math:`A = 1 + 2c\langle a, y
    \rangle + c\|y\|^2`, :math:`B = 1 - c\|a\|^2`, :math:`E = 1 + 2c\langle a, y\rangle +
    c^2\|a\|^2\|y\|^2`.
    """
    ay = -(x @ y.t())
    a2 = x.pow(2).sum(-1, keepdim=True)
    y2 = y.pow(2).sum(-1).unsqueeze(0)
    coef_a = 1 + 2 * c * ay + c * y2
    coef_b = 1 - c * a2
    denom = 1 + 2 * c * ay + c**2 * a2 * y2
    num2 = coef_a.pow(2) * a2 + 2 * coef_a * coef_b * ay + coef_b.pow(2) * y2
    # The clamp keeps sqrt's gradient finite at d(x, x) = 0 (and absorbs rounding below 0).
    norm = num2.clamp_min(MIN_NORM).sqrt() / denom
    sqrt_c = c**0.5
    return 2 / sqrt_c * torch.atanh((sqrt_c * norm).clamp(max=1 - ARTANH_EPS))


class PairwiseCrossEntropyLoss(nn.Module):
    r"""Hyp-ViT's pairwise cross-entropy over the slots of a P × m batch (module docstring).

    Follows pytorch-metric-learning's convention: ``loss(embeddings, labels)`` takes raw
    embeddings (the head's output) and maps them to the sphere or the ball itself.

    Args:
        samples_per_class (int): m; a batch must be P ≥ 2 distinct classes × m consecutive samples
            (the class-balanced sampler's layout). (default: :obj:`9`, the authors' value)
        temperature (float): τ. (default: :obj:`0.2`)
        space (str): ``"sphere"`` (dot product of L2-normalised embeddings) or ``"hyperbolic"``
            (negative Poincaré distance). (default: :obj:`"sphere"`)
        c (float): curvature of the Poincaré ball (hyperbolic only). (default: :obj:`0.1`)
        clip_r (float or None): feature clipping radius before the exponential map (hyperbolic
            only; ``None``: no clipping). (default: :obj:`2.3`)

    **Shapes:** embeddings (P·m, D), labels (P·m,) → scalar.
    """

    def __init__(
        self,
        samples_per_class: int = 9,
        temperature: float = 0.2,
        space: str = "sphere",
        c: float = 0.1,
        clip_r: float | None = 2.3,
    ) -> None:
        super().__init__()
        self.samples_per_class = check_positive_int(samples_per_class, "samples_per_class")
        if samples_per_class < 2:
            raise ValueError("samples_per_class must be >= 2: the PCE loss pairs the samples of "
                             f"a class, got {samples_per_class}")
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.temperature = check_positive_float(temperature, "temperature")
        self.space = space
        self.c = check_positive_float(c, "c (the ball's curvature)")
        self.clip_r = None if clip_r is None else check_positive_float(clip_r, "clip_r")

    def check_layout(self, labels: Tensor) -> None:
        """Refuse a batch that is not P ≥ 2 distinct classes × ``samples_per_class`` consecutive
        samples (the loss would pair samples of different classes as positives)."""
        m = self.samples_per_class
        n = labels.numel()
        expected = (f"the PCE loss needs batches of P >= 2 distinct classes x {m} consecutive "
                    f"samples of each (the class-balanced sampler with samples_per_class={m})")
        if n % m != 0 or n < 2 * m:
            raise naming(ValueError(f"labels: {expected}; got a batch of {n} samples"),
                         "samples_per_class")
        rows = labels.view(n // m, m)
        if not bool((rows == rows[:, :1]).all()):
            got = labels[:2 * m].tolist()
            raise naming(ValueError(f"labels: {expected}; got labels {got}..."),
                         "samples_per_class")
        if rows[:, 0].unique().numel() != rows.size(0):
            raise ValueError(f"labels: {expected}; a class fills more than one group of {m}")

    def embed(self, embeddings: Tensor) -> Tensor:
        """Map raw embeddings to the unit sphere or the Poincaré ball."""
        if self.space == "sphere":
            return F.normalize(embeddings, dim=-1)
        return to_poincare_ball(embeddings, self.c, self.clip_r)

    def similarity(self, z: Tensor) -> Tensor:
        """All pairwise similarities s (N × N) of mapped embeddings."""
        if self.space == "sphere":
            return z @ z.t()
        return -poincare_distance(z, z, self.c)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_features(embeddings, "embeddings")
        check_labels(labels, embeddings.size(0), "labels")
        self.check_layout(labels)
        m = self.samples_per_class
        p = embeddings.size(0) // m
        # At least float32 even under mixed precision: the ball's distances lose their precision
        # in float16 (artanh near 1, the Möbius sum's cancellations).
        x = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
        with torch.autocast(x.device.type, enabled=False):
            s = self.similarity(self.embed(x)) / self.temperature
        # s4[i, j, a, b] = s(z[a, slot i], z[b, slot j]): all slot pairs at once.
        s4 = s.view(p, m, p, m).permute(1, 3, 0, 2)
        own = s4.diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # (m, P, P): slot i against itself
        own = own - SELF_MASK * torch.eye(p, dtype=s.dtype, device=s.device)
        logits = torch.cat([s4, own.unsqueeze(1).expand(m, m, p, p)], dim=-1)
        ce = (logits.logsumexp(dim=-1) - s4.diagonal(dim1=2, dim2=3)).mean(dim=-1)  # (m, m)
        pairs = ~torch.eye(m, dtype=torch.bool, device=s.device)  # ordered pairs i != j
        return ce[pairs].sum()

    def extra_repr(self) -> str:
        hyp = f", c={self.c}, clip_r={self.clip_r}" if self.space == "hyperbolic" else ""
        return (f"samples_per_class={self.samples_per_class}, temperature={self.temperature}, "
                f"space={self.space!r}{hyp}")
