"""The target-sorted (CSR) layout of a (2, E) edge list, as the attention kernels read it."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class CSRLayout(NamedTuple):
    """Edges grouped by target: edge ``order[p]`` of the input is position ``p`` of the layout
    (``order`` is ``None`` when the input is already sorted by target)."""

    order: Optional[Tensor]
    ptr: Tensor  # (N_dst + 1,): the in-edges of target i are positions ptr[i]:ptr[i + 1]
    source: Tensor  # (E,) source of each position
    target: Tensor  # (E,) target of each position


def csr_layout(edge_index: Tensor, num_dst: int) -> CSRLayout:
    """Group the edges of ``edge_index`` (j→i as column (j, i)) by target, keeping the input order
    within a target (a stable sort, skipped when already sorted: kNN graphs are)."""
    source, target = edge_index[0], edge_index[1]
    order = None
    if target.numel() > 1 and not bool((target[1:] >= target[:-1]).all()):
        order = torch.argsort(target, stable=True)
        source, target = source[order], target[order]
    return CSRLayout(order, _ptr(target, num_dst), source, target)


def to_layout(values: Tensor, order: Optional[Tensor]) -> Tensor:
    """Rows of ``values`` (input edge order) in layout order."""
    return values if order is None else values.index_select(0, order)


def from_layout(values: Tensor, order: Optional[Tensor]) -> Tensor:
    """Rows of ``values`` (layout order) back in input edge order."""
    if order is None:
        return values
    return torch.empty_like(values).index_copy_(0, order, values)


def transpose_layout(layout: CSRLayout, num_src: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(order, ptr, col)`` of the layout's transpose: positions grouped by source, position
    ``order[p]`` of the layout first; ``col`` holds their targets."""
    order = torch.argsort(layout.source, stable=True)
    return order, _ptr(layout.source, num_src), layout.target.index_select(0, order)


def _ptr(index: Tensor, size: int) -> Tensor:
    """CSR row pointer (``size`` + 1,) of the sorted-or-not group ids ``index``."""
    ptr = torch.zeros(size + 1, dtype=torch.long, device=index.device)
    torch.cumsum(torch.bincount(index, minlength=size), 0, out=ptr[1:])
    return ptr
