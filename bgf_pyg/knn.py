"""Chunked cosine top-k: the one nearest-neighbour search of the package.

Both the batch graph's visual edges and retrieval metrics (Recall@K, MAP@R) need, for each query
row, the k most cosine-similar reference rows. Doing it in row chunks keeps memory at
O(chunk_size · N_ref) instead of O(N_query · N_ref), so N = 100,000 works on a laptop.

Tie rule (deterministic on every device): among equal similarities the lower reference index wins,
both for which neighbours are selected and for their order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Default number of similarity entries (rows × columns) computed at once (64 Mi floats = 256 MiB).
DEFAULT_CHUNK_ELEMENTS = 1 << 26


def _rows_per_chunk(num_ref: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, chunk_size)
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(num_ref, 1))


def _select_with_ties(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row of ``sim``, ties at the k-th value resolved towards the lower index.

    Returns values and indices sorted by similarity (descending), then by index (ascending).
    """
    values, index = sim.topk(min(k + 1, sim.size(1)), dim=1)
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
    k: int = 10,
    *,
    exclude_self: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` most cosine-similar reference rows of every query row.

    Args:
        query: (Q, D) float tensor.
        reference: (R, D) float tensor; ``None`` searches ``query`` against itself.
        k: number of neighbours; must be ≤ the number of candidates (R, or R − 1 with
            ``exclude_self``).
        exclude_self: never return reference row ``i`` for query row ``i`` (for self-search).
        chunk_size: query rows per chunk (default: as many as fit 64 Mi similarity entries).

    Returns:
        ``(similarity, index)``, both (Q, k), sorted by similarity descending (ties: lower index
        first).
    """
    reference = query if reference is None else reference
    candidates = reference.size(0) - int(exclude_self)
    if k > candidates:
        raise ValueError(f"k must be <= {candidates} (the number of candidates), got {k}")
    q = F.normalize(query, dim=1)
    r = q if reference is query else F.normalize(reference, dim=1)
    rows = _rows_per_chunk(r.size(0), chunk_size)
    out_values, out_index = [], []
    for start in range(0, q.size(0), rows):
        sim = q[start : start + rows] @ r.t()
        if exclude_self:
            diag = torch.arange(sim.size(0), device=sim.device)
            sim[diag, diag + start] = float("-inf")
        values, index = _select_with_ties(sim, k)
        out_values.append(values)
        out_index.append(index)
    if not out_values:
        empty = query.new_empty((0, k))
        return empty, empty.long()
    return torch.cat(out_values), torch.cat(out_index)
