"""Fused SSA for ``attention_path="fused"``: Triton kernels that never materialise per-edge
features (see :mod:`._triton_kernels`), with a recomputing backward.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set
before Triton is first imported; slow, meant for tests). Triton is optional: it is imported only
when this path is asked for. The returned α is computed by a separate pass and carries no
gradient.

``attention_path="auto"`` does not pick this path: no GPU measurement of it exists yet (issue
#12 asks for one on an H100 before ``auto`` may choose it).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

from ...knn import compute_dtype
from .csr import csr_layout, from_layout, to_layout, transpose_layout

#: Edges a program streams per step; a power of two (Triton block shapes are).
BLOCK_EDGES = 16


def _kernels():
    """The Triton kernels module, or a clear error when Triton is missing."""
    try:
        from . import _triton_kernels
    except ImportError as error:
        raise ImportError(
            "attention_path='fused' needs Triton (pip install triton, or bgf_pyg[fused]); "
            "use attention_path='sparse' without it"
        ) from error
    return _triton_kernels


def check_fused_device(tensor: Tensor) -> None:
    """The fused kernels run on CUDA, or on CPU only under ``TRITON_INTERPRET=1``."""
    if tensor.device.type == "cuda":
        return
    if tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(
        f"attention_path='fused' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got "
        f"a {tensor.device.type} tensor; use attention_path='sparse' or 'auto' there"
    )


def fused_attention(
    query: Tensor, key: Tensor, value: Tensor, edge_index: Tensor, weight: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """As :func:`~bgf_pyg.nn.kernels.csr_attention` (same arguments and results), computed by
    the fused Triton kernels; α is detached."""
    kernels = _kernels()
    check_fused_device(query)
    key, value = key.to(query.dtype), value.to(query.dtype)
    return _FusedSSA.apply(kernels, query, key, value, edge_index, weight)


def _launch_args(query: Tensor, kernels) -> dict:
    tl = kernels.tl
    return {
        "BLOCK_E": BLOCK_EDGES,
        "BLOCK_D": max(16, 1 << (query.size(2) - 1).bit_length()),
        "ACC": tl.float64 if query.dtype == torch.float64 else tl.float32,
    }


class _FusedSSA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, query, key, value, edge_index, weight):
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        num_dst, heads, channels = query.shape
        layout = csr_layout(edge_index, num_dst)
        acc_dtype = compute_dtype(query.dtype)
        mask = None if weight is None else to_layout(weight, layout.order).to(acc_dtype)
        mask = mask.contiguous() if mask is not None else None
        out = torch.empty_like(query)
        lse = query.new_empty(num_dst, heads, dtype=acc_dtype)
        alpha = query.new_empty(edge_index.size(1), heads, dtype=acc_dtype)
        scale = 1.0 / math.sqrt(channels)
        grid = (num_dst, heads)
        launch = _launch_args(query, kernels)
        kernels._forward[grid](
            query, key, value, layout.ptr, layout.source, mask if mask is not None else lse,
            out, lse, scale, heads, channels, HAS_W=mask is not None, **launch,
        )
        kernels._weights[grid](
            query, key, layout.ptr, layout.source, lse, alpha, scale, heads, channels, **launch
        )
        ctx.kernels = kernels
        ctx.save_for_backward(query, key, value, out, lse, edge_index, mask)
        ctx.mark_non_differentiable(alpha)
        return out, from_layout(alpha.to(query.dtype), layout.order)

    @staticmethod
    def backward(ctx, grad_out, _grad_alpha):
        query, key, value, out, lse, edge_index, mask = ctx.saved_tensors
        kernels = ctx.kernels
        num_dst, heads, channels = query.shape
        layout = csr_layout(edge_index, num_dst)
        order_t, ptr_t, dst_t = transpose_layout(layout, key.size(0))
        grad_out = grad_out.contiguous()
        delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1).contiguous()
        grad_q, grad_k, grad_v = (torch.empty_like(t) for t in (query, key, value))
        scale = 1.0 / math.sqrt(channels)
        launch = _launch_args(query, kernels)
        weight = mask if mask is not None else lse
        kernels._grad_query[(num_dst, heads)](
            query, key, value, grad_out, lse, delta, layout.ptr, layout.source, weight, grad_q,
            scale, heads, channels, HAS_W=mask is not None, **launch,
        )
        kernels._grad_key_value[(key.size(0), heads)](
            query, key, value, grad_out, lse, delta, ptr_t, dst_t, order_t, weight, grad_k,
            grad_v, scale, heads, channels, HAS_W=mask is not None, **launch,
        )
        return None, grad_q, grad_k, grad_v, None, None
