"""Metric-learning losses: ProxyGML, the intra-batch method's label-smoothed CE, Hyp-ViT's
pairwise cross-entropy (BGFormer's authors' loss), and :class:`BatchGraphLoss`, which adds the
batch graph and BGFormer to any of them."""

from .batch_graph import BatchGraphLoss
from .label_smoothing import LabelSmoothingCE
from .pce import PairwiseCrossEntropyLoss
from .proxygml import ProxyGMLLoss

__all__ = ["BatchGraphLoss", "LabelSmoothingCE", "PairwiseCrossEntropyLoss", "ProxyGMLLoss"]
