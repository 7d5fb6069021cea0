r"""Query expansion / database-side augmentation: every item averaged with its kNN.

.. math::
    \mathbf{e}'_i = \operatorname{normalise}\Big(\sum_{j \in \mathcal{N}_k(i) \cup \{i\}}
    \max(s_{ij}, 0)^{\alpha}\, \mathbf{e}_j\Big), \qquad s_{ii} = 1,

with :math:`s_{ij}` the cosine similarity of the (unit) embeddings and :math:`\mathcal{N}_k(i)` the
``k`` most similar other items. :math:`0^0 = 1`: with ``alpha = 0`` every neighbour weighs 1, even
one at similarity ≤ 0 (the plain mean of the k neighbours and the item itself); with ``alpha > 0``
such a neighbour weighs 0. ``rounds`` repeats it on the refined embeddings' own kNN graph.

The aggregation is one sparse (N × N, N·k entries) matrix product over the kNN edge list; no
N × N matrix is ever formed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_features
from ..domains import positive_int
from ..knn import normalize_rows
from ..nn.kernels.sparse_cpu import csr_matrix
from .common import (
    Neighbors,
    RefinedGallery,
    check_alpha,
    check_k,
    check_setting,
    first_neighbors,
)


def expand(source: Tensor, target: Tensor, similarity: Tensor, index: Tensor,
           alpha: float) -> Tensor:
    """``normalise(target_i + Σ_j max(s_ij, 0)^α source[index_ij])`` for every row i of
    ``target`` (unit rows), as a sparse (Q × N) CSR product."""
    rows, k = index.shape
    weight = similarity.to(source.dtype).clamp(min=0).pow(alpha)  # torch: 0 ** 0 = 1
    crow = torch.arange(0, rows * k + 1, k, device=index.device)
    adjacency = csr_matrix(crow, index.reshape(-1), weight.reshape(-1), (rows, source.size(0)))
    return normalize_rows(target + adjacency @ source)


class QueryExpansion:
    r"""Training-free refinement on the kNN graph (see the module docstring for the formula).

    Args:
        k (int, optional): Neighbours of each item. (default: :obj:`10`)
        alpha (float, optional): Exponent :math:`\alpha \ge 0` of the similarity weights
            (``0``: plain mean). (default: :obj:`3.0`)
        rounds (int, optional): How often it is applied, each time on the previous round's
            embeddings and their own kNN graph. (default: :obj:`1`)

    :meth:`refine` is the transductive form (the whole set at once); :meth:`refine_gallery`
    also keeps what :meth:`refine_queries` (the inductive form) needs. Labels are never read.
    """

    name = "qe"

    def __init__(self, k: int = 10, alpha: float = 3.0, rounds: int = 1) -> None:
        self.k = positive_int.check(k, "k")
        self.alpha = check_alpha(alpha)
        self.rounds = positive_int.check(rounds, "rounds")

    def refine(self, emb: Tensor, *, neighbors: Neighbors | None = None,
               chunk_size: int | None = None) -> Tensor:
        """Refined (N, D) unit embeddings of the set ``emb`` (N, D)."""
        return self.refine_gallery(emb, neighbors=neighbors, chunk_size=chunk_size).embeddings

    @torch.no_grad()
    def refine_gallery(self, emb: Tensor, *, neighbors: Neighbors | None = None,
                       chunk_size: int | None = None) -> RefinedGallery:
        """:meth:`refine`, keeping every round's input for :meth:`refine_queries`.

        ``neighbors``: the first round's graph, ``(similarity, index)`` of a self-excluded
        search of ``emb`` at least ``k`` deep (:func:`bgf_pyg.knn.cosine_topk`), e.g. the one
        the evaluation already ran; without it the search runs here (in ``chunk_size`` rows).
        """
        check_features(emb, "emb", min_rows=2, purpose="to refine")
        check_k(self.k, emb.size(0) - 1)
        x = normalize_rows(emb)
        states = []
        for round_ in range(self.rounds):
            states.append(x)
            sim, index = first_neighbors(neighbors if round_ == 0 else None, x, None, self.k,
                                         chunk_size)
            x = expand(x, x, sim, index, self.alpha)
        return RefinedGallery(x, states, self.setting)

    @torch.no_grad()
    def refine_queries(self, query: Tensor, gallery: RefinedGallery, *,
                       neighbors: Neighbors | None = None,
                       chunk_size: int | None = None) -> Tensor:
        """Inductive form: each query row refined alone against ``gallery`` (from
        :meth:`refine_gallery`), which stays unchanged. In every round the query takes its ``k``
        nearest gallery items in that round's gallery representation and is expanded with them
        exactly as a gallery row is: a query's refinement is its row of the transductive
        refinement of gallery ∪ {query} in which the query is no gallery item's neighbour (for
        one round: its row of the transductive refinement, whatever the graph).
        ``neighbors``: the first round's (Q, ≥ k) query → gallery lists, if already searched.
        """
        first = gallery.states[0]
        check_features(query, "query", width=first.size(1), min_rows=1, purpose="to refine")
        check_k(self.k, first.size(0), "the gallery")
        if len(gallery.states) != self.rounds:
            raise ValueError(f"gallery was refined in {len(gallery.states)} round(s), this "
                             f"refinement has rounds={self.rounds}")
        check_setting(gallery, self.setting)
        q = normalize_rows(query, dtype=first.dtype)
        for round_, states in enumerate(gallery.states):
            sim, index = first_neighbors(neighbors if round_ == 0 else None, q, states, self.k,
                                         chunk_size)
            q = expand(states, q, sim, index, self.alpha)
        return q

    @property
    def setting(self) -> tuple:
        """What a refined gallery's states depend on."""
        return (self.name, ("k", self.k), ("alpha", self.alpha), ("rounds", self.rounds))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(k={self.k}, alpha={self.alpha:g}, rounds={self.rounds})"
