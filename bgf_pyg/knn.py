"""Chunked cosine top-k: the one nearest-neighbour search of the package.

Both the batch graph's visual edges and retrieval metrics (Recall@K, MAP@R) need, for each query
row, the k most cosine-similar reference rows. Doing it in row chunks keeps memory at
O(chunk_size · N_ref) instead of O(N_query · N_ref), so N = 100,000 works on a laptop.

Tie rule (deterministic on every device, and kept by the faiss backend of :mod:`bgf_pyg.metrics`):
among equal similarities the lower reference index wins, both for which neighbours are selected and
for their order.

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
        sim = q[start : start + rows] @ r.t()
        if exclude_self:
            diag = torch.arange(sim.size(0), device=sim.device)
            sim[diag, diag + start] = float("-inf")
        values, index = select_with_ties(sim, k)
        out_values.append(values)
        out_index.append(index)
    if not out_values:
        empty = q.new_empty((0, k))
        return empty, empty.long()
    return torch.cat(out_values), torch.cat(out_index)
