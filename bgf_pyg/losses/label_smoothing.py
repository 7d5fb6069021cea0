"""The classification loss of the intra-batch method."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from bgf_pyg.checks import check_features, check_labels
from bgf_pyg.domains import positive_float, probability


class LabelSmoothingCE(nn.Module):
    r"""Temperature-scaled, label-smoothed cross-entropy, as ``CrossEntropyLabelSmooth`` of
    ``dvl-tum/intra_batch`` (Seidenschwarz et al., ICML 2021) applied to ``logits / T``:

    .. math::
        \mathcal{L} = \frac{1}{B} \sum_i \sum_c -\Big((1 - \epsilon)\,[c = y_i] +
        \frac{\epsilon}{C}\Big) \log \mathrm{softmax}(\mathbf{z}_i / T)_c.

    The intra-batch method sums it over the backbone's and the MPN's logits; the original's
    temperatures are CUB 0.2, Cars 0.111, SOP 0.605, In-Shop 0.186.

    Args:
        temperature (float, optional): :math:`T > 0`. (default: :obj:`1.0`)
        epsilon (float, optional): smoothing :math:`\epsilon \in [0, 1]`. (default: :obj:`0.1`)
    """

    def __init__(self, temperature: float = 1.0, epsilon: float = 0.1) -> None:
        super().__init__()
        self.temperature = positive_float.check(temperature, "temperature")
        self.epsilon = probability.check(epsilon, "epsilon")

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        check_features(logits, "logits", min_rows=1)
        check_labels(labels, logits.size(0), "labels", num_classes=logits.size(1))
        return F.cross_entropy(logits / self.temperature, labels, label_smoothing=self.epsilon)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, epsilon={self.epsilon}"
