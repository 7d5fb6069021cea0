"""Graph neural network modules."""

from .attention_stats import AttentionEntropy, attention_entropy
from .bgformer import BGFormer, BGFormerLayer, DualSSA
from .conv import BatchGraphConv
from .intra_batch import IntraBatchAttention, IntraBatchMPN
from .label_propagation import SameLabelPropagation
from .projection import ProjectedGraph
from .topk_attention import TopKAttention

__all__ = [
    "BatchGraphConv",
    "TopKAttention",
    "DualSSA",
    "BGFormerLayer",
    "BGFormer",
    "ProjectedGraph",
    "IntraBatchAttention",
    "IntraBatchMPN",
    "SameLabelPropagation",
    "AttentionEntropy",
    "attention_entropy",
]
