"""Refining a retrieval set on its kNN graph at test time.

The originals drop their graph module at test time, but a test set is still a graph: its kNN
graph. Two refinements map (N, D) inputs to refined unit embeddings that the metrics of
:mod:`bgf_pyg.metrics` consume unchanged:

- :class:`QueryExpansion` (``"qe"``): training-free query expansion / database-side
  augmentation, a similarity-weighted mean of each item and its k nearest neighbours;
- :class:`BGFormerRefinement` (``"bgformer"``): the trained BGFormer's visual branch on the kNN
  graph of the backbone features, then the model's head.

Each has a *transductive* form (``refine`` / ``refine_gallery``: the whole set at once, the usual
protocol of re-ranking papers) and an *inductive* one (``refine_queries``: a query arriving alone
is refined against its k nearest items of an already refined gallery, which stays unchanged).
Neither reads labels. Both take ``neighbors=``, the ``(similarity, index)`` lists of a search
already run (the evaluation's own, :func:`bgf_pyg.knn.cosine_topk`), so refining costs no second
N × N pass.
"""

from .common import Neighbors, RefinedGallery
from .learned import BGFormerRefinement
from .qe import QueryExpansion

#: Names of ``--refine``: no refinement, query expansion, the learned refinement.
REFINEMENTS = ("none", QueryExpansion.name, BGFormerRefinement.name)

__all__ = ["REFINEMENTS", "BGFormerRefinement", "Neighbors", "QueryExpansion", "RefinedGallery"]
