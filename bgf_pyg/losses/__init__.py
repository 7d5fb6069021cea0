"""Metric-learning losses: ProxyGML, the intra-batch method's label-smoothed CE, Hyp-ViT's
pairwise cross-entropy (BGFormer's authors' loss), :class:`BatchGraphLoss`, which adds the
batch graph and BGFormer to any of them, and the registry of the losses ``plain`` and
``bgformer`` train with (:data:`LOSSES`)."""

from .batch_graph import BatchGraphLoss
from .label_smoothing import LabelSmoothingCE
from .pce import PairwiseCrossEntropyLoss
from .proxygml import ProxyGMLLoss
from .registry import LOSSES, LossEntry, build_metric_loss, refuses_one_class

__all__ = ["LOSSES", "BatchGraphLoss", "LabelSmoothingCE", "LossEntry", "PairwiseCrossEntropyLoss",
           "ProxyGMLLoss", "build_metric_loss", "refuses_one_class"]
