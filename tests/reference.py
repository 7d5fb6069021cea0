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
