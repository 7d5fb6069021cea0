"""Chunked cosine top-k: the one nearest-neighbour search of the package.

Both the batch graph's visual edges and retrieval metrics (Recall@K, MAP@R) need, for each query
row, the k most cosine-similar reference rows. Doing it in row chunks keeps memory at
O(chunk_size · N_ref) instead of O(N_query · N_ref), so N = 100,000 works on a laptop.

Scores and ties: a matrix product's rounding depends on how it is blocked (the chunk size, the
BLAS kernel, faiss's own loops), so two similarities that are equal in exact arithmetic, e.g.
two rows orthogonal to the query, may come out as 0, 7.9e-9 and −6.3e-10. Ranking on such
scores would let the rounding pick the neighbours. So the product only *proposes* candidates:
every reference row within the product's rounding bound (:func:`rounding_bound`) of the k-th
best. The candidates are then scored canonically (:func:`canonical_scores`: float64 sums of
the exact float64 products of the normalised rows, the same arithmetic whatever proposed them)
and ranked on those scores; among equal scores the lower reference index wins, both for which
neighbours are selected and for their order. The faiss backend of :mod:`bgf_pyg.metrics`
ranks its candidates the same way, so both backends return the same neighbours.

Precision and zero rows: rows are normalised and compared in float32 (float64 stays float64), so a
float16/bfloat16 row never underflows to a 0/0 = NaN that would rank first in every list. A zero
row has cosine 0 to every row (itself included): it is neither near nor far from anything, and
it passes gradient 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import defaults
from .checks import check_features

#: Default number of similarity entries (rows × columns) computed at once (64 Mi floats = 256 MiB).
DEFAULT_CHUNK_ELEMENTS = 1 << 26


#: Entries of the pairs :func:`canonical_scores` gathers at once (1 MiB of float32).
CANONICAL_CHUNK_ELEMENTS = 1 << 18

#: Rows a search lists beyond the k needed before ranking them canonically (a row whose list
#: may end inside a run of near-equal scores lists every row of it).
TIE_MARGIN = 8

#: Rows with an L2 norm at most this count as zero rows: cosine 0 to everything, gradient 0.
NORM_EPS = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype cosine math runs in: float64 stays, every other float type becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled_rows(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(x / m, ‖x / m‖, m)`` per row, ``m`` = the row's largest absolute entry (detached; 1 for
    a zero row), so that ``‖x‖ = m · ‖x / m‖`` never overflows or underflows in the squares: a
    finite float32 row beyond ~1.8e19 has an infinite plain norm. Both outputs are (N, 1) but the
    first; the math runs in ``x``'s dtype."""
    scale = x.detach().abs().amax(dim=1, keepdim=True)
    scale = scale.masked_fill(scale == 0, 1.0)
    scaled = x / scale
    return scaled, torch.linalg.vector_norm(scaled, dim=1, keepdim=True), scale


def normalize_rows(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Rows of ``x`` scaled to unit L2 norm, computed in :func:`compute_dtype` (in half precision
    a norm clamp underflows to 0 and a zero row gives 0/0 = NaN). A zero row (norm ≤
    :data:`NORM_EPS`) stays zero and passes gradient 0: ``F.normalize``'s x / eps would pass one of
    about 1/eps = 10¹², which overflows a float16 gradient to inf. The norm is taken of the row
    divided by its largest entry (:func:`scaled_rows`), so a huge finite row is normalised too
    instead of becoming x / inf = 0.

    Returned in ``dtype`` (default: the compute dtype). Differentiable.
    """
    scaled, norm, scale = scaled_rows(x.to(compute_dtype(x.dtype)))
    zero = norm * scale <= NORM_EPS
    out = (scaled / norm.masked_fill(zero, 1.0)).masked_fill(zero, 0.0)
    return out if dtype is None else out.to(dtype)


def _rows_per_chunk(num_ref: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, chunk_size)
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(num_ref, 1))


def select_with_ties(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row of ``sim``, ties at the k-th value resolved towards the lower index.

    Returns values and indices sorted by similarity (descending), then by index (ascending).
    """
    values, index = sim.topk(min(k + 1, sim.size(1)), dim=1)
    if k == 0:
        return values[:, :0], index[:, :0]
    if values.size(1) > k:
        boundary_tie = values[:, k - 1] == values[:, k]
        values, index = values[:, :k], index[:, :k]
        rows = boundary_tie.nonzero().view(-1)
        if rows.numel() > 0:
            # Rare: re-select those rows exactly: every entry above the k-th value, then the
            # lowest-index entries equal to it.
            sub = sim[rows]
            kth = values[rows, k - 1 : k]
            above = sub > kth
            equal = sub == kth
            needed = k - above.sum(dim=1, keepdim=True)
            chosen = above | (equal & (equal.cumsum(dim=1) <= needed))
            sub_index = chosen.nonzero()[:, 1].view(-1, k)
            index[rows] = sub_index
            values[rows] = sub.gather(1, sub_index)
    # Order: by similarity descending, equal similarities by index ascending (two stable sorts).
    order = index.sort(dim=1, stable=True).indices
    index, values = index.gather(1, order), values.gather(1, order)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), index.gather(1, order)


@torch.no_grad()
def cosine_topk(
    query: Tensor,
    reference: Tensor | None = None,
    k: int = defaults.K,
    *,
    exclude_self: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` most cosine-similar reference rows of every query row.

    Args:
        query: (Q, D) float tensor (any float dtype: the search runs in float32, or float64).
        reference: (R, D) float tensor; ``None`` searches ``query`` against itself.
        k: number of neighbours, 0 ≤ k ≤ the number of candidates (R, or R − 1 with
            ``exclude_self``).
        exclude_self: never return reference row ``i`` for query row ``i`` (for self-search).
        chunk_size: query rows per chunk (default: as many as fit 64 Mi similarity entries).

    Returns:
        ``(similarity, index)``, both (Q, k), sorted by similarity descending (ties: lower index
        first); the similarity in the compute dtype (float32, or float64).
    """
    check_features(query, "query", finite=False)
    if reference is not None:
        check_features(reference, "reference", width=query.size(1), finite=False)
    reference = query if reference is None else reference
    candidates = max(reference.size(0) - int(exclude_self), 0)
    if not 0 <= k <= candidates:
        raise ValueError(
            f"k must lie in [0, {candidates}] (the number of candidate rows"
            f"{', self excluded' if exclude_self else ''}), got {k}"
        )
    q = normalize_rows(query)
    r = q if reference is query else normalize_rows(reference, dtype=q.dtype)
    rows = _rows_per_chunk(r.size(0), chunk_size)
    out_values, out_index = [], []
    for start in range(0, q.size(0), rows):
        own = None
        if exclude_self:
            own = torch.arange(start, min(start + rows, q.size(0)), device=q.device)
        values, index = search_rows(q[start : start + rows], r, k, own)
        out_values.append(values)
        out_index.append(index)
    if not out_values:
        empty = q.new_empty((0, k))
        return empty, empty.long()
    return torch.cat(out_values), torch.cat(out_index)


def rounding_bound(width: int, dtype: torch.dtype) -> float:
    """Largest difference between two computed cosines of the same pair of normalised rows of
    ``width`` entries in ``dtype``: one from a product summed in any order (a matrix product,
    faiss), one canonical (:func:`canonical_scores`). A sum of D products in any order is within
    γ_D = D·u / (1 − D·u) of the exact value (u the unit roundoff; Σ |qᵢrᵢ| ≤ ‖q‖‖r‖, 1 up to
    a few u for normalised rows: 1 % slack); the canonical score within u + γ_D(float64)."""

    def gamma(unit_roundoff: float) -> float:
        n = width * unit_roundoff
        return 1.01 * n / (1.0 - n)

    unit = torch.finfo(dtype).eps / 2
    return gamma(unit) + 1.01 * unit + gamma(2.0**-53)


def canonical_scores(q: Tensor, q_rows: Tensor, r: Tensor, r_rows: Tensor) -> Tensor:
    """Cosine of each pair of rows ``(q[q_rows[i]], r[r_rows[i]])``, (P,) in float64: the rows'
    products, each rounded once, summed row by row in float64. The same arithmetic whatever
    batch, chunk or search proposed the pair, so equal pairs score equally in every backend.
    Pairs are gathered in cache-sized chunks (a gathered (P, D) copy would be memory-bound)."""
    pairs = max(1, CANONICAL_CHUNK_ELEMENTS // max(q.size(1), 1))
    parts = [(q[q_rows[start : start + pairs]] * r[r_rows[start : start + pairs]])
             .sum(dim=1, dtype=torch.float64) for start in range(0, q_rows.numel(), pairs)]
    return torch.cat(parts) if parts else q.new_empty(0, dtype=torch.float64)


def rank_candidates(
    q: Tensor, r: Tensor, candidates: Tensor, scores: Tensor, k: int, own: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Top-``k`` of each normalised query row among its ``candidates`` (Q, C) reference rows,
    proposed with ``scores`` (Q, C) computed in any order in their dtype (within
    :func:`rounding_bound` of the canonical score: faiss's float32 scores for float64 rows
    take float32's bound), ranked as the canonical scores rank them, equal scores by lower
    index. Only scores closer than twice the bound to a neighbouring score can be ordered
    differently, so only those pairs are scored canonically (:func:`canonical_scores`); the
    others keep their order. ``own`` (Q,): each row's own reference index, never returned
    (faiss's "no result", ``-1``, neither). Returns ``(similarity, index)`` (Q, k), the
    similarity in ``q``'s dtype."""
    bound = max(rounding_bound(q.size(1), scores.dtype), rounding_bound(q.size(1), q.dtype))
    scores = scores.to(q.dtype).masked_fill(candidates < 0, float("-inf"))
    if own is not None:
        scores = scores.masked_fill(candidates == own.unsqueeze(1), float("-inf"))
    scores, order = scores.sort(dim=1, descending=True)
    candidates = candidates.gather(1, order)
    close = (scores[:, :-1] - scores[:, 1:]) <= 2 * bound
    unsure = torch.zeros_like(scores, dtype=torch.bool)
    unsure[:, :-1] |= close
    unsure[:, 1:] |= close
    keys = scores.to(torch.float64)
    rows, slots = unsure.nonzero(as_tuple=True)
    keys[rows, slots] = canonical_scores(q, rows, r, candidates[rows, slots])
    candidates, order = candidates.sort(dim=1)  # equal keys: lower index first
    values, position = select_with_ties(keys.gather(1, order), k)
    return values.to(q.dtype), candidates.gather(1, position)


def search_rows(q: Tensor, r: Tensor, k: int, own: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` of the normalised query rows ``q`` among all rows of ``r`` (``own``:
    each row's reference index to leave out): the product proposes the ``k +``
    :data:`TIE_MARGIN` best rows, or for a row whose list may end within twice the
    :func:`rounding_bound` of its k-th score every row that close, and :func:`rank_candidates`
    ranks them."""
    sim = q @ r.t()
    if own is not None:
        sim[torch.arange(sim.size(0), device=sim.device), own] = float("-inf")
    if k == 0 or sim.size(0) == 0:
        return select_with_ties(sim, k)
    scores, candidates = sim.topk(min(k + TIE_MARGIN, sim.size(1)), dim=1)
    values, index = rank_candidates(q, r, candidates, scores, k, own)
    if candidates.size(1) < sim.size(1):
        margin = 2 * rounding_bound(q.size(1), q.dtype)
        short = (scores[:, -1] >= scores[:, k - 1] - margin).nonzero().view(-1)
        if short.numel() > 0:  # long near-ties: list every row that close to the k-th score
            near = sim[short] >= scores[short, k - 1 : k] - margin
            scores, candidates = sim[short].topk(int(near.sum(dim=1).max()), dim=1)
            values[short], index[short] = rank_candidates(
                q[short], r, candidates, scores, k, None if own is None else own[short])
    return values, index
