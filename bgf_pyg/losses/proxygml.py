r"""ProxyGML: proxy-based graph metric learning.

Zhu, Yang, Zhang and Liu, `"Fewer is More: A Deep Graph Metric Learning Perspective Using Fewer
Proxies" <https://arxiv.org/abs/2010.13636>`_, NeurIPS 2020; original code ``YuehuaZhu/ProxyGML``
(``loss/ProxyGML.py :: ProxyGML``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bgf_pyg import defaults
from bgf_pyg.checks import check_features, check_labels
from bgf_pyg.domains import fraction, non_negative_float, positive_int
from bgf_pyg.knn import compute_dtype, normalize_rows

# Added to the positives' similarities before the top-k so that every positive proxy is kept; the
# original's value, kept so that the same proxies are selected (cosines lie in [-1, 1]).
_POSITIVE_BONUS = 1000.0


class ProxyGMLLoss(nn.Module):
    r"""The ProxyGML loss (Zhu et al., NeurIPS 2020), faithful to the original code.

    With :math:`N` proxies per class for :math:`C` classes (proxy :math:`j` has class
    :math:`\lfloor j / N \rfloor`), L2-normalised embeddings :math:`\hat{\mathbf{x}}` and proxies
    :math:`\hat{\mathbf{P}}`:

    .. math::
        \mathbf{S} = \hat{\mathbf{X}} \hat{\mathbf{P}}^\top, \qquad
        \mathcal{I}_i = \mathrm{top}_k\big(\mathbf{S}_i + 1000\,\mathbf{Pos}_i\big), \qquad
        Z_{ic} = \sum_{j \in \mathcal{I}_i,\ \lfloor j/N \rfloor = c} S_{ij},

    with :math:`k = \lceil r C N \rceil` (at most :math:`CN`), so every positive proxy enters the
    sub-graph while :math:`k \ge N`. Classes without a selected proxy are masked out of the
    softmax (:math:`\mathcal{C}_i` = the classes of the proxies in :math:`\mathcal{I}_i`):

    .. math::
        \mathcal{L}_s = -\frac{1}{B} \sum_i \log \frac{\exp(Z_{i y_i})}
        {\sum_{c \in \mathcal{C}_i} \exp(Z_{ic})}, \qquad
        \mathcal{L}_p = \mathrm{CE}\big((\hat{\mathbf{P}} \hat{\mathbf{P}}^\top) \mathbf{Y}_p,\
        \lfloor j / N \rfloor\big), \qquad \mathcal{L} = \mathcal{L}_s + \lambda \mathcal{L}_p,

    where :math:`\mathbf{Y}_p` is the :math:`CN \times C` one-hot proxy-label matrix. Neither
    :math:`\mathbf{Y}_p` nor a one-hot of the top-k is built: the :math:`B \times k` selected
    similarities are scatter-added into :math:`B \times C` class bins, so memory stays
    :math:`O(B \cdot CN)` (SOP: :math:`C = 11318`). :math:`\mathcal{L}_p` needs the
    :math:`CN \times CN` proxy Gram matrix and is computed only when :math:`\lambda > 0` (the
    original uses :math:`\lambda = 0` on SOP).

    Differences from the original: the original masks the classes with :math:`Z_{ic} = 0` (the
    same classes unless selected similarities sum to exactly 0) and computes
    :math:`-\log(p + 10^{-20})` with :math:`p = e^{Z} / (10^{-8} + \sum e^{Z})` (masked, no max
    subtraction); we use an exact log-softmax (``cross_entropy`` on logits masked to
    :math:`-\infty`), which differs by about :math:`10^{-8} / \sum_c e^{Z_{ic}}` per sample. The
    true class is always selected, so the loss is finite: a zero embedding row (cosine 0 to
    every proxy) gives :math:`\log |\mathcal{C}_i|`, where the original gives NaN. The
    embeddings are L2-normalised here (the original expects its network to do it; normalising
    twice changes nothing), in float32 for half-precision input and in float64 for float64
    input (the proxies are cast to it); the loss has that dtype. Proxies are stored as a
    :math:`(CN, D)` parameter (the original stores the transpose) with the same
    :math:`U(\pm 1/\sqrt{CN})` init. The original's second output :math:`\mathcal{L}_s` is not
    returned.

    Args:
        num_classes (int): number of training classes :math:`C`.
        embedding_dim (int): embedding width :math:`D`.
        proxies_per_class (int, optional): :math:`N`; 12 on CUB/Cars, 1 on SOP. (default: :obj:`12`)
        r (float, optional): fraction :math:`r \in (0, 1]` of proxies in each sample's sub-graph.
            (default: :obj:`0.05`)
        weight_lambda (float, optional): weight :math:`\lambda \ge 0` of the proxy regulariser; 0
            on SOP. (default: :obj:`0.3`)

    **Shapes:** embeddings :math:`(B, D)`, labels :math:`(B,)` in :math:`[0, C)` → scalar.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        proxies_per_class: int = defaults.PROXIES_PER_CLASS,
        r: float = defaults.PROXYGML_R,
        weight_lambda: float = defaults.PROXYGML_LAMBDA,
    ) -> None:
        super().__init__()
        self.num_classes = positive_int.check(num_classes, "num_classes")
        self.embedding_dim = positive_int.check(embedding_dim, "embedding_dim")
        self.proxies_per_class = positive_int.check(proxies_per_class, "proxies_per_class")
        self.r = fraction.check(r, "r")
        self.weight_lambda = non_negative_float.check(weight_lambda, "weight_lambda")
        num_proxies = num_classes * proxies_per_class
        self.k = min(math.ceil(r * num_proxies), num_proxies)
        self.proxies = nn.Parameter(torch.empty(num_proxies, embedding_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The original's kaiming_uniform_(a=sqrt(5)) on its (D, C*N) tensor has fan-in C*N.
        bound = 1.0 / math.sqrt(self.proxies.size(0))
        nn.init.uniform_(self.proxies, -bound, bound)

    def proxy_labels(self) -> Tensor:
        """Class of every proxy, ``arange(C * N) // N``."""
        return torch.arange(self.proxies.size(0), device=self.proxies.device).div(
            self.proxies_per_class, rounding_mode="floor"
        )

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_features(embeddings, "embeddings", width=self.embedding_dim, min_rows=1)
        check_labels(labels, embeddings.size(0), "labels", num_classes=self.num_classes)
        # Half-precision embeddings are compared in float32, float64 ones in float64 (with the
        # proxies cast to it), so any float dtype works and a zero row never gives 0/0.
        dtype = compute_dtype(torch.promote_types(embeddings.dtype, self.proxies.dtype))
        x = normalize_rows(embeddings, dtype=dtype)
        proxies = normalize_rows(self.proxies, dtype=dtype)
        proxy_labels = self.proxy_labels()

        sim = x @ proxies.t()  # (B, C*N)
        positive = (labels.unsqueeze(1) == proxy_labels.unsqueeze(0)).to(sim.dtype)
        index = (sim.detach() + _POSITIVE_BONUS * positive).topk(self.k, dim=1).indices
        # Z = W Y_p as a scatter of the B x k selected similarities into B x C class bins; the
        # softmax runs over the classes that received a selected proxy.
        bins = index.div(self.proxies_per_class, rounding_mode="floor")
        z = sim.new_zeros(sim.size(0), self.num_classes).scatter_add(1, bins, sim.gather(1, index))
        selected = torch.zeros_like(z, dtype=torch.bool).scatter_(1, bins, True)
        loss = F.cross_entropy(z.masked_fill(~selected, float("-inf")), labels)

        if self.weight_lambda > 0:
            gram = proxies @ proxies.t()  # (C*N, C*N)
            class_logits = gram.view(gram.size(0), self.num_classes, self.proxies_per_class).sum(-1)
            loss = loss + self.weight_lambda * F.cross_entropy(class_logits, proxy_labels)
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"proxies_per_class={self.proxies_per_class}, r={self.r}, "
            f"weight_lambda={self.weight_lambda}, k={self.k}"
        )
