"""Independent float64 re-statements of the math, written edge by edge, for the tests to compare
against. Nothing here imports the code under test."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def ssa_reference(
    query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor
) -> tuple[Tensor, dict[tuple[int, int], Tensor]]:
    """Structure-constrained attention, one target at a time.

    ``query`` (N_dst, H, d), ``key``/``value`` (N_src, H, d); ``edge_index`` (2, E) with j→i as
    column (j, i). Duplicate edges count once each. Returns the (N_dst, H, d) output and the weight
    of every edge position e as ``weights[e] = (H,)``.
    """
    query, key, value = query.double(), key.double(), value.double()
    num_dst, heads, dim = query.shape
    out = torch.zeros(num_dst, heads, dim, dtype=torch.float64)
    weights = {}
    for i in range(num_dst):
        positions = [e for e in range(edge_index.size(1)) if int(edge_index[1, e]) == i]
        if not positions:
            continue
        sources = [int(edge_index[0, e]) for e in positions]
        scores = torch.stack(
            [(query[i] * key[j]).sum(-1) / math.sqrt(dim) for j in sources]
        )  # (deg, H)
        scores = scores - scores.max(dim=0).values
        alpha = scores.exp() / scores.exp().sum(dim=0)
        for e, j, a in zip(positions, sources, alpha, strict=True):
            out[i] += a.unsqueeze(-1) * value[j]
            weights[e] = a
    return out, weights


def graph_norm_reference(
    x: Tensor, weight: Tensor, bias: Tensor, mean_scale: Tensor, eps: float = 1e-5
) -> Tensor:
    """GraphNorm (Cai et al. 2020) over all rows of ``x`` (one graph)."""
    shifted = x - mean_scale * x.mean(dim=0)
    var = (shifted**2).mean(dim=0)
    return weight * shifted / torch.sqrt(var + eps) + bias


def unit_rows(x: Tensor) -> Tensor:
    """float64 rows of unit norm; a zero row stays zero (cosine 0 to everything)."""
    x = x.double()
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, 1.0), 0.0)


def cosine_reference(query: Tensor, reference: Tensor | None = None) -> Tensor:
    """(Q, R) float64 cosine similarities, entry by entry."""
    q = unit_rows(query)
    r = q if reference is None else unit_rows(reference)
    return torch.tensor([[float((a * b).sum()) for b in r] for a in q], dtype=torch.float64)


def ranked_neighbours(sim: Tensor, exclude_self: bool) -> list[list[int]]:
    """For every row, all candidate columns by similarity descending, ties by lower index."""
    out = []
    for i, row in enumerate(sim.tolist()):
        cols = [j for j in range(len(row)) if not (exclude_self and j == i)]
        out.append(sorted(cols, key=lambda j, row=row: (-row[j], j)))
    return out


def retrieval_reference(emb: Tensor, labels: Tensor, ks: list[int]) -> dict[str, float]:
    """Recall@K, MAP@R and R-Precision (Musgrave et al. 2020) by brute force, query by query."""
    ranked = ranked_neighbours(cosine_reference(emb), exclude_self=True)
    y = labels.tolist()
    out = {}
    for k in ks:
        hits = [any(y[j] == y[i] for j in ranked[i][:k]) for i in range(len(y))]
        out[f"recall@{k}"] = sum(hits) / len(hits)
    aps, precisions = [], []
    for i in range(len(y)):
        r = sum(1 for j in range(len(y)) if j != i and y[j] == y[i])
        if r == 0:
            continue
        correct = [y[j] == y[i] for j in ranked[i][:r]]
        aps.append(sum(sum(correct[: n + 1]) / (n + 1) for n in range(r) if correct[n]) / r)
        precisions.append(sum(correct) / r)
    out["map@r"] = sum(aps) / len(aps)
    out["r_precision"] = sum(precisions) / len(precisions)
    return out


def proxygml_reference(
    x: Tensor, proxies: Tensor, y: Tensor, num_classes: int, n: int, r: float, lam: float
) -> Tensor:
    """The original YuehuaZhu/ProxyGML loss with the one-hot Y_p and the full top-k mask
    materialised; the softmax runs over the classes of the selected proxies (the original masks
    Z = 0, the same classes unless a sum is exactly 0, e.g. for a zero row)."""
    x, p = unit_rows(x), unit_rows(proxies)
    proxy_label = torch.arange(num_classes).repeat_interleave(n)
    y_p = torch.zeros(num_classes * n, num_classes, dtype=x.dtype)
    y_p[torch.arange(num_classes * n), proxy_label] = 1
    s = x @ p.T
    pos = (y[:, None] == proxy_label[None, :]).to(x.dtype)
    k = math.ceil(r * num_classes * n)
    idx = torch.topk(s + 1000 * pos, k, dim=1).indices
    mask = torch.zeros_like(s).scatter(1, idx, 1.0)
    z = (mask * s) @ y_p
    z_masked = torch.where(mask @ y_p > 0, z, torch.full_like(z, float("-inf")))
    loss = -(z[torch.arange(len(y)), y] - torch.logsumexp(z_masked, dim=1)).mean()
    if lam > 0:
        logits_p = (p @ p.T) @ y_p
        log_prob = logits_p - torch.logsumexp(logits_p, dim=1, keepdim=True)
        loss = loss - lam * log_prob[torch.arange(num_classes * n), proxy_label].mean()
    return loss


def topk_weights_reference(
    query: Tensor, key: Tensor, k: int, batch: Tensor | None = None
) -> dict[tuple[int, int], dict[int, float]]:
    """Dynamic top-K attention weights, one query row and head at a time: among the nodes of row
    i's graph (``batch``; all nodes when ``None``), i itself included, keep the ``k`` largest
    scores q_i·k_j/√d (ties: the lower index first; all of them when ``k`` ≥ the graph's size),
    softmax over those only. ``query``/``key`` (N, H, d); returns ``{(i, h): {j: weight}}``."""
    query, key = query.double(), key.double()
    num_nodes, heads, dim = query.shape
    graph = [0] * num_nodes if batch is None else batch.tolist()
    weights = {}
    for i in range(num_nodes):
        candidates = [j for j in range(num_nodes) if graph[j] == graph[i]]
        for h in range(heads):
            score = {j: float(query[i, h] @ key[j, h]) / math.sqrt(dim) for j in candidates}
            kept = sorted(candidates, key=lambda j: (-score[j], j))[:k]
            top = max(score[j] for j in kept)
            weight = {j: math.exp(score[j] - top) for j in kept}
            total = sum(weight.values())
            weights[i, h] = {j: w / total for j, w in weight.items()}
    return weights


def topk_attention_reference(
    query: Tensor, key: Tensor, value: Tensor, k: int, batch: Tensor | None = None
) -> Tensor:
    """Dynamic top-K attention (:func:`topk_weights_reference`) applied to ``value``;
    ``query``/``key``/``value`` (N, H, d); returns the (N, H, d) output."""
    value = value.double()
    out = torch.zeros(value.shape, dtype=torch.float64)
    for (i, h), weight in topk_weights_reference(query, key, k, batch).items():
        for j, w in weight.items():
            out[i, h] += w * value[j, h]
    return out
