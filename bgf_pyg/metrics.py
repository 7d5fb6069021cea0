"""Retrieval and clustering metrics: Recall@K, MAP@R, R-Precision, NMI.

Every kNN metric reads the labels of each query's nearest neighbours by cosine similarity (the
query itself excluded), found by the package's one chunked search :func:`bgf_pyg.knn.cosine_topk`,
so 60,000 × 60,000 (SOP) never holds the full similarity matrix. :func:`evaluate_retrieval` computes
all of them from a single search.

Definitions: Recall@K as in the DML literature (a hit when any of the K neighbours shares the
query's class); MAP@R and R-Precision as Musgrave et al., "A Metric Learning Reality Check", ECCV
2020 (R = the number of *other* samples of the query's class; queries with R = 0 are left out),
matching pytorch-metric-learning's ``AccuracyCalculator``; NMI as the original intra-batch /
ProxyGML code (KMeans into #classes clusters, ``n_init=10``, arithmetic NMI), with a fixed seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bgf_pyg.checks import check_features, check_labels
from bgf_pyg.knn import (
    DEFAULT_CHUNK_ELEMENTS,
    cosine_topk,
    normalize_rows,
    rank_candidates,
    rounding_bound,
    search_rows,
)

BACKENDS = ("torch", "faiss", "auto")


def _check_retrieval_inputs(
    emb: Tensor, labels: Tensor, name: str = "emb", labels_name: str = "labels"
) -> None:
    check_features(emb, name, min_rows=2, purpose="for retrieval")
    check_labels(labels, emb.size(0), labels_name)


def _check_ks(ks: Sequence[int], candidates: int) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1 or max(ks) > candidates:
        raise ValueError(f"ks must be non-empty integers in [1, {candidates}], got {ks}")
    return ks


#: Candidates faiss returns beyond the k needed (a row whose list may end inside a tie block,
#: or within the rounding bound of its k-th score, is searched again by the torch rule).
FAISS_TIE_MARGIN = 8


def _faiss_topk(query: Tensor, reference: Tensor, k: int, exclude_self: bool) -> Tensor:
    """Exact inner-product search of the normalised embeddings with faiss: (Q, k) indices, the
    same as :func:`~bgf_pyg.knn.cosine_topk`'s.

    faiss proposes ``k + FAISS_TIE_MARGIN`` candidates, ranked as the torch search ranks its own
    (:func:`~bgf_pyg.knn.rank_candidates`: canonical scores, equal scores by reference index).
    That is the torch answer when the list provably holds every row that can rank in the top
    k: when its last score lies below the k-th by more than twice the rounding bound of faiss's
    float32 products (:func:`~bgf_pyg.knn.rounding_bound`). Rows where it cannot be proven (long
    tie blocks) are searched exactly by :func:`~bgf_pyg.knn.search_rows`."""
    import faiss

    q = normalize_rows(query)
    r = q if reference is query else normalize_rows(reference, dtype=q.dtype)
    q, r = q.cpu(), r.cpu()
    index = faiss.IndexFlatIP(r.size(1))
    index.add(r.float().numpy())
    depth = min(k + int(exclude_self) + FAISS_TIE_MARGIN, r.size(0))
    found_scores, found = (torch.from_numpy(a) for a in index.search(q.float().numpy(), depth))
    found = found.long()
    own = torch.arange(q.size(0)) if exclude_self else None
    if own is not None:  # the query itself is no candidate: its slot is dropped from the list
        found_scores = found_scores.masked_fill(found == own.unsqueeze(1), float("-inf"))
    listed_scores = found_scores
    found_scores = found_scores.sort(dim=1, descending=True).values
    listed = depth - int(exclude_self)  # real candidates per row (self dropped, when listed)
    margin = 2 * rounding_bound(r.size(1), torch.float32)
    sure = found_scores[:, listed - 1] < found_scores[:, k - 1] - margin
    if depth == r.size(0):
        sure[:] = True  # faiss listed every row
    result = torch.empty(q.size(0), k, dtype=torch.long)
    sure_rows, unsure_rows = sure.nonzero().view(-1), (~sure).nonzero().view(-1)
    if sure_rows.numel():
        result[sure_rows] = rank_candidates(q[sure_rows], r, found[sure_rows],
                                            listed_scores[sure_rows], k,
                                            None if own is None else own[sure_rows])[1]
    rows = max(1, DEFAULT_CHUNK_ELEMENTS // r.size(0))
    for chunk in unsure_rows.split(rows):
        result[chunk] = search_rows(q[chunk], r, k, None if own is None else own[chunk])[1]
    return result


def _use_faiss(backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    try:
        import faiss  # noqa: F401
    except ImportError:
        if backend == "faiss":
            raise ImportError("backend='faiss' needs faiss (pip install faiss-cpu)") from None
        return False
    return True


def _neighbour_labels(
    query: Tensor,
    query_labels: Tensor,
    k: int,
    reference: Tensor | None = None,
    reference_labels: Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "torch",
) -> Tensor:
    """Labels (Q, k) of each query's k nearest references; self-search excludes the query."""
    self_search = reference is None
    reference = query if self_search else reference
    reference_labels = query_labels if self_search else reference_labels
    if _use_faiss(backend):
        index = _faiss_topk(query, reference, k, exclude_self=self_search)
    else:
        index = cosine_topk(query, reference, k, exclude_self=self_search, chunk_size=chunk_size)[1]
    return reference_labels.to(index.device)[index]


def _recall_from_neighbours(hits: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Recall@K from a (Q, ≥max K) boolean matrix of same-class neighbours."""
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def _map_and_r_precision(hits: Tensor, labels: Tensor) -> tuple[float, float]:
    """MAP@R and R-Precision from a (N, ≥max R) boolean matrix of same-class neighbours."""
    _, inverse, counts = labels.unique(return_inverse=True, return_counts=True)
    r = (counts[inverse] - 1).to(hits.device)
    keep = r > 0
    if not bool(keep.any()):
        raise ValueError("MAP@R and R-Precision need a class with at least 2 samples, got none")
    hits, r = hits[keep].float(), r[keep]
    rank = torch.arange(1, hits.size(1) + 1, device=hits.device)
    within_r = rank.unsqueeze(0) <= r.unsqueeze(1)
    hits = hits * within_r
    precision_at_i = hits.cumsum(dim=1) / rank
    map_r = ((precision_at_i * hits).sum(dim=1) / r).mean().item()
    r_prec = (hits.sum(dim=1) / r).mean().item()
    return map_r, r_prec


def _max_r(labels: Tensor) -> int:
    return int(labels.unique(return_counts=True)[1].max()) - 1


def recall_at_k(
    emb: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    chunk_size: int | None = None,
    backend: str = "torch",
) -> dict[int, float]:
    """Recall@K: the fraction of samples whose K cosine nearest neighbours (self excluded) contain
    a sample of the same class.

    Args:
        emb: (N, D) embeddings. labels: (N,) integer classes. ks: the K values (each ≤ N − 1).
        chunk_size: query rows per similarity chunk (see :func:`bgf_pyg.knn.cosine_topk`).
        backend: ``"torch"`` (default), ``"faiss"``, or ``"auto"`` (faiss when installed).

    Returns:
        ``{K: recall}``.
    """
    _check_retrieval_inputs(emb, labels)
    ks = _check_ks(ks, emb.size(0) - 1)
    nn_labels = _neighbour_labels(emb, labels, max(ks), chunk_size=chunk_size, backend=backend)
    return _recall_from_neighbours(nn_labels == labels.to(nn_labels.device).unsqueeze(1), ks)


def _map_r_and_r_precision(
    emb: Tensor, labels: Tensor, chunk_size: int | None, backend: str
) -> tuple[float, float]:
    _check_retrieval_inputs(emb, labels)
    k = max(_max_r(labels), 1)
    nn_labels = _neighbour_labels(emb, labels, k, chunk_size=chunk_size, backend=backend)
    return _map_and_r_precision(nn_labels == labels.to(nn_labels.device).unsqueeze(1), labels)


def map_at_r(
    emb: Tensor, labels: Tensor, *, chunk_size: int | None = None, backend: str = "torch"
) -> float:
    """MAP@R (Musgrave et al. 2020): for each query with R ≥ 1 other samples of its class, the mean
    over its top R neighbours of precision@i at every correct neighbour i (0 at the wrong ones)."""
    return _map_r_and_r_precision(emb, labels, chunk_size, backend)[0]


def r_precision(
    emb: Tensor, labels: Tensor, *, chunk_size: int | None = None, backend: str = "torch"
) -> float:
    """R-Precision (Musgrave et al. 2020): the fraction of same-class samples among each query's top
    R neighbours, R = the number of other samples of its class (queries with R = 0 left out)."""
    return _map_r_and_r_precision(emb, labels, chunk_size, backend)[1]


def nmi(emb: Tensor, labels: Tensor, seed: int = 0) -> float:
    """Normalized mutual information between ``labels`` and a KMeans clustering of the L2-normalised
    embeddings into as many clusters as classes (``n_init=10``, ``random_state=seed``)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    _check_retrieval_inputs(emb, labels)
    x = normalize_rows(emb.detach(), dtype=torch.float32).cpu().numpy()
    y = labels.cpu().numpy()
    num_clusters = len(set(y.tolist()))
    clusters = KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit_predict(x)
    return float(normalized_mutual_info_score(y, clusters))


def recall_at_k_query_gallery(
    query_emb: Tensor,
    query_labels: Tensor,
    gallery_emb: Tensor,
    gallery_labels: Tensor,
    ks: Sequence[int] = (1, 10, 20, 30, 40),
    *,
    chunk_size: int | None = None,
    backend: str = "torch",
) -> dict[int, float]:
    """Recall@K of query samples searched against a separate gallery (In-Shop protocol): a hit when
    any of the K gallery samples most cosine-similar to the query shares its class.

    A single query is enough: its neighbours come from the gallery. The protocol reports
    Recall@K alone, as the In-Shop papers do; NMI, which clusters the query set, is not computed
    (it is undefined for a single query).
    """
    check_features(query_emb, "query_emb", min_rows=1, purpose="for retrieval")
    check_labels(query_labels, query_emb.size(0), "query_labels")
    check_features(gallery_emb, "gallery_emb", width=query_emb.size(1), min_rows=1,
                   purpose="to search")
    check_labels(gallery_labels, gallery_emb.size(0), "gallery_labels")
    ks = _check_ks(ks, gallery_emb.size(0))
    nn_labels = _neighbour_labels(
        query_emb, query_labels, max(ks), gallery_emb, gallery_labels, chunk_size, backend
    )
    return _recall_from_neighbours(nn_labels == query_labels.to(nn_labels.device).unsqueeze(1), ks)


def retrieval_depth(labels: Tensor, ks: Sequence[int], num_items: int) -> int:
    """How deep :func:`evaluate_retrieval` searches: ``max(max(ks), largest class count − 1)``
    (``ks`` checked against the ``num_items − 1`` candidates)."""
    return max(max(_check_ks(ks, num_items - 1)), _max_r(labels))


def evaluate_retrieval(
    emb: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    with_nmi: bool = True,
    *,
    chunk_size: int | None = None,
    backend: str = "torch",
    seed: int = 0,
    neighbors: tuple[Tensor, Tensor] | None = None,
) -> dict[str, float]:
    """Recall@K, MAP@R, R-Precision (and NMI) from one chunked top-k search.

    The search depth is :func:`retrieval_depth` (``max(max(ks), largest class count − 1)``), so
    memory stays at O(chunk_size · N + N · depth). ``neighbors``: that search already run,
    ``(similarity, index)`` of :func:`bgf_pyg.knn.cosine_topk` (self excluded, at least that
    deep), e.g. shared with a refinement (:mod:`bgf_pyg.refine`) that reuses its first k columns.

    Returns:
        ``{"recall@K": ..., "map@r": ..., "r_precision": ..., "nmi": ...}`` (``"nmi"`` only with
        ``with_nmi``).
    """
    _check_retrieval_inputs(emb, labels)
    depth = retrieval_depth(labels, ks, emb.size(0))
    ks = [int(k) for k in ks]
    if neighbors is None:
        nn_labels = _neighbour_labels(emb, labels, depth, chunk_size=chunk_size, backend=backend)
    else:
        index = neighbors[1]
        if index.dim() != 2 or index.size(0) != emb.size(0) or index.size(1) < depth:
            raise ValueError(f"neighbors must hold ({emb.size(0)}, >= {depth}) indices (a "
                             f"self-excluded search at least {depth} deep), got "
                             f"{tuple(index.shape)}")
        nn_labels = labels.to(index.device)[index[:, :depth]]
    hits = nn_labels == labels.to(nn_labels.device).unsqueeze(1)
    out = {f"recall@{k}": v for k, v in _recall_from_neighbours(hits, ks).items()}
    out["map@r"], out["r_precision"] = _map_and_r_precision(hits, labels)
    if with_nmi:
        out["nmi"] = nmi(emb, labels, seed=seed)
    return out
