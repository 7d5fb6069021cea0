"""What every refinement shares: the refined gallery, the neighbour lists it reuses, its checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..knn import cosine_topk

#: ``(similarity, index)``, both (N, ≥ k), sorted by similarity descending: what
#: :func:`bgf_pyg.knn.cosine_topk` returns (and what the evaluation's own search found).
Neighbors = tuple[Tensor, Tensor]


@dataclass
class RefinedGallery:
    """A refined set and what an inductive query needs of it.

    Attributes:
        embeddings: (N, E) refined, L2-normalised embeddings (what retrieval compares).
        states: the set's representation at every stage of the refinement (a round's or a
            layer's input), each (N, ·): a query arriving later is refined against them.
        setting: what refined it (the refinement's ``setting``, e.g. QE's k, α and rounds):
            a query is refined only by the same setting (``None``: not recorded).
    """

    embeddings: Tensor
    states: list[Tensor]
    setting: tuple | None = None


def check_setting(gallery: RefinedGallery, setting: tuple) -> None:
    """``ValueError`` when ``gallery`` was refined with another setting than ``setting``: its
    states hold another k's (another α's, another model's) neighbourhoods."""
    if gallery.setting is not None and gallery.setting != setting:
        raise ValueError(f"gallery was refined with {gallery.setting}, these queries with "
                         f"{setting}; refine the gallery with the same refinement")


def check_k(k: int, candidates: int, what: str = "the set") -> int:
    """``k`` ≥ 1 and at most ``candidates`` (the other items of ``what``), else ``ValueError``."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int >= 1, got {type(k).__name__} {k!r}")
    if not 1 <= k <= candidates:
        raise ValueError(f"k must lie in [1, {candidates}] (smaller than {what} of "
                         f"{candidates + 1} items: a node's neighbours are other items), got {k}")
    return k


def check_alpha(alpha: float) -> float:
    """A finite exponent ≥ 0, else ``ValueError`` naming ``alpha``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float >= 0, got {type(alpha).__name__} {alpha!r}")
    if not 0.0 <= alpha < math.inf:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    return float(alpha)


def first_neighbors(
    neighbors: Neighbors | None,
    query: Tensor,
    reference: Tensor | None,
    k: int,
    chunk_size: int | None,
) -> Neighbors:
    """The ``k`` nearest references of each query row: the first ``k`` columns of ``neighbors``
    when given (a deeper search's first k are the k-search's: both order by similarity, then
    index), else a fresh search (``reference=None``: self-search, the row itself excluded)."""
    if neighbors is None:
        return cosine_topk(query, reference, k, exclude_self=reference is None,
                           chunk_size=chunk_size)
    if not (isinstance(neighbors, tuple) and len(neighbors) == 2
            and all(isinstance(t, Tensor) for t in neighbors)):
        raise TypeError("neighbors must be a (similarity, index) pair of tensors, as "
                        "bgf_pyg.knn.cosine_topk returns")
    sim, index = neighbors
    rows = query.size(0)
    if sim.shape != index.shape or sim.dim() != 2 or sim.size(0) != rows or sim.size(1) < k:
        raise ValueError(f"neighbors must hold ({rows}, >= {k}) similarities and indices (one "
                         f"row per item, at least k = {k} columns), got {tuple(sim.shape)} and "
                         f"{tuple(index.shape)}")
    if index.dtype != torch.long:
        raise TypeError(f"neighbors' index must be int64, got {index.dtype}")
    sim, index = sim[:, :k], index[:, :k]
    candidates = query.size(0) if reference is None else reference.size(0)
    if index.numel() and not (0 <= int(index.min()) and int(index.max()) < candidates):
        raise ValueError(f"neighbors' index must lie in [0, {candidates - 1}] (rows of "
                         f"{'the set' if reference is None else 'the gallery'}), got "
                         f"{int(index.min())}..{int(index.max())}: a search of another set?")
    if reference is None and bool((index == torch.arange(rows, device=index.device)[:, None])
                                  .any()):
        raise ValueError("neighbors must come from a self-excluded search (cosine_topk(..., "
                         "exclude_self=True)): an item is listed as its own neighbour")
    return sim, index
