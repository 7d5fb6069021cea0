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
from torch import Tensor, nn

from .. import defaults
from ..checks import check_features, check_labels, naming
from ..domains import positive_float, positive_int
from ..knn import normalize_rows, scaled_rows

SPACES = ("sphere", "hyperbolic")
#: Logit offset that removes a sample's similarity to itself (Hyp-ViT's ``eye_mask``).
SELF_MASK = 1e9
#: Points are kept this far inside the ball's boundary (hyptorch's ``project``, float32).
BALL_EPS = 1e-3
#: Smallest norm used in a division or a square root (zero vectors).
MIN_NORM = 1e-15
#: Keeps ``artanh``'s argument below 1 (hyptorch's ``artanh`` clamp).
ARTANH_EPS = 1e-5
#: Pairs whose expanded squared distance is below this fraction of ``‖x‖² + ‖y‖²`` have lost
#: about ``log10(1 / NEAR_PAIR)`` digits to cancellation: they are recomputed exactly.
NEAR_PAIR = 1e-2


def to_poincare_ball(x: Tensor, c: float, clip_r: float | None) -> Tensor:
    r"""Clip ``x`` to norm ``clip_r`` (feature clipping), then map it onto the Poincaré ball of
    curvature ``c`` by :math:`\exp_0(u) = \tanh(\sqrt c \|u\|)\, u / (\sqrt c \|u\|)`, kept
    ``BALL_EPS`` inside the boundary.

    Computed as :math:`(x/m) \tanh(\sqrt c \min(\|x\|, r)) / (\sqrt c \|x/m\|)` with
    :math:`m` the row's largest entry (:func:`~bgf_pyg.knn.scaled_rows`), so that a huge finite row
    keeps its direction instead of overflowing its norm (NaN with clipping, 0 without)."""
    scaled, scaled_norm, scale = scaled_rows(x)
    scaled_norm = scaled_norm.clamp_min(MIN_NORM)  # a zero row: exp_0's derivative, the identity
    norm = scaled_norm * scale
    if clip_r is not None:
        norm = norm.clamp(max=clip_r)
    sqrt_c = c**0.5
    ball = torch.tanh(sqrt_c * norm) * scaled / (sqrt_c * scaled_norm)
    max_norm = (1.0 - BALL_EPS) / sqrt_c
    ball_norm = ball.norm(dim=-1, keepdim=True).clamp_min(MIN_NORM)
    return torch.where(ball_norm > max_norm, ball / ball_norm * max_norm, ball)


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    r"""Pairwise :math:`\|x_i - y_j\|^2` (N × M) by the matmul expansion
    :math:`\|x\|^2 + \|y\|^2 - 2\langle x, y\rangle`, with the pairs where that expansion
    cancels (below :data:`NEAR_PAIR` of :math:`\|x\|^2 + \|y\|^2`, e.g. a point and itself)
    recomputed from exact differences: a matmul's speed, no N × M × D tensor, and
    :math:`\|x - x\|^2 = 0` exactly."""
    scale = x.pow(2).sum(-1, keepdim=True) + y.pow(2).sum(-1).unsqueeze(0)
    sq = (scale - 2 * (x @ y.t())).clamp_min(0)
    near_x, near_y = (sq < NEAR_PAIR * scale).nonzero(as_tuple=True)
    exact = (x[near_x] - y[near_y]).pow(2).sum(-1)
    return sq.index_put((near_x, near_y), exact)


def poincare_distance(x: Tensor, y: Tensor, c: float) -> Tensor:
    r"""Pairwise Poincaré distances (N × M) of points on the ball of curvature ``c``:
    :math:`d_c(x, y) = \frac{2}{\sqrt c} \operatorname{artanh}(\sqrt c\, \|(-x) \oplus_c y\|)`.

    Computed from the identity :math:`\|(-x) \oplus_c y\|^2 = \|x - y\|^2 / (c\|x - y\|^2 +
    (1 - c\|x\|^2)(1 - c\|y\|^2))` with :func:`squared_distances`: near the boundary the Möbius
    sum divides by :math:`(1 - c\|x\|^2)^2`, which turns any rounding (or a floor kept for the
    gradient) in an expanded numerator into a visible distance of a point to itself. Here
    :math:`d_c(x, x) = 0` (up to a 1e-15 floor), with a finite gradient.
    """
    sq = squared_distances(x, y)
    x_conf = 1 - c * x.pow(2).sum(-1, keepdim=True)
    y_conf = 1 - c * y.pow(2).sum(-1).unsqueeze(0)
    # The floor keeps sqrt's gradient finite at d(x, x) = 0.
    norm = (sq / (c * sq + x_conf * y_conf)).clamp_min(MIN_NORM**2).sqrt()
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
        temperature: float = defaults.TEMPERATURE,
        space: str = "sphere",
        c: float = 0.1,
        clip_r: float | None = 2.3,
    ) -> None:
        super().__init__()
        self.samples_per_class = positive_int.check(samples_per_class, "samples_per_class")
        if samples_per_class < 2:
            raise ValueError("samples_per_class must be >= 2: the PCE loss pairs the samples of "
                             f"a class, got {samples_per_class}")
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.temperature = positive_float.check(temperature, "temperature")
        self.space = space
        self.c = positive_float.check(c, "c (the ball's curvature)")
        self.clip_r = None if clip_r is None else positive_float.check(clip_r, "clip_r")

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
            # Not F.normalize: its x / eps gives a zero row a gradient that overflows float16.
            return normalize_rows(embeddings, dtype=embeddings.dtype)
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
