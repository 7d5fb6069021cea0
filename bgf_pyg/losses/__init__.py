"""Metric-learning losses: ProxyGML and the intra-batch method's label-smoothed CE."""

from .label_smoothing import LabelSmoothingCE
from .proxygml import ProxyGMLLoss

__all__ = ["LabelSmoothingCE", "ProxyGMLLoss"]
