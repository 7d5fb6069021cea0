"""Graph neural network modules."""

from .intra_batch import IntraBatchAttention, IntraBatchMPN

__all__ = [
    "IntraBatchAttention",
    "IntraBatchMPN",
]
