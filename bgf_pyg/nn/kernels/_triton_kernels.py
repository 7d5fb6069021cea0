"""Triton kernels of the fused SSA (see :mod:`.fused_triton`); imported only when Triton is.

Every program handles one (node, head) pair and streams that node's edges in blocks of
``BLOCK_E``, gathering the neighbours' rows itself: no per-edge feature tensor exists in memory.
Forward: online softmax (flash-attention's running max and normaliser) over a target's in-edges,
saving only the log-sum-exp. Backward recomputes the scores: ``_grad_query`` per target (its
in-edges), ``_grad_key_value`` per source over the transposed layout (its out-edges), so every
program writes only its own rows (no atomics, deterministic).
"""

import triton
import triton.language as tl


@triton.jit
def _scalar_zero(BLOCK_E: tl.constexpr, ACC: tl.constexpr):
    # A 0-d zero of the accumulator type: loop-carried scalars keep one type in compiled mode.
    return tl.sum(tl.zeros([BLOCK_E], ACC), 0)


@triton.jit
def _forward(
    Q, K, V, PTR, SRC, W, OUT, LSE, scale, H, D,
    HAS_W: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(Q + (i * H + h) * D + offs_d, mask=mask_d, other=0.0).to(ACC)
    start = tl.load(PTR + i)
    end = tl.load(PTR + i + 1)
    zero = _scalar_zero(BLOCK_E, ACC)
    peak = zero - 1e30  # finite: exp(peak - new_peak) stays defined before the first edge
    total = zero
    acc = tl.zeros([BLOCK_D], ACC)
    for block in range(start, end, BLOCK_E):
        offs_e = block + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        j = tl.load(SRC + offs_e, mask=mask_e, other=0)
        rows = (j[:, None] * H + h) * D + offs_d[None, :]
        mask = mask_e[:, None] & mask_d[None, :]
        k = tl.load(K + rows, mask=mask, other=0.0).to(ACC)
        score = tl.where(mask_e, tl.sum(k * q[None, :], 1) * scale, float("-inf"))
        new_peak = tl.maximum(peak, tl.max(score, 0))
        shrink = tl.exp(peak - new_peak)
        p = tl.exp(score - new_peak)
        total = total * shrink + tl.sum(p, 0)
        if HAS_W:
            p = p * tl.load(W + offs_e * H + h, mask=mask_e, other=0.0).to(ACC)
        v = tl.load(V + rows, mask=mask, other=0.0).to(ACC)
        acc = acc * shrink + tl.sum(p[:, None] * v, 0)
        peak = new_peak
    # A target without in-edges: total = 0, acc = 0 → zeros (its LSE is never read).
    total = tl.where(total > 0, total, 1.0)
    tl.store(OUT + (i * H + h) * D + offs_d, (acc / total).to(OUT.dtype.element_ty), mask=mask_d)
    tl.store(LSE + i * H + h, peak + tl.log(total))


@triton.jit
def _weights(
    Q, K, PTR, SRC, LSE, ALPHA, scale, H, D,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """α of every position of target i's in-edges, from the saved log-sum-exp."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(Q + (i * H + h) * D + offs_d, mask=mask_d, other=0.0).to(ACC)
    lse = tl.load(LSE + i * H + h)
    start = tl.load(PTR + i)
    end = tl.load(PTR + i + 1)
    for block in range(start, end, BLOCK_E):
        offs_e = block + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        j = tl.load(SRC + offs_e, mask=mask_e, other=0)
        rows = (j[:, None] * H + h) * D + offs_d[None, :]
        k = tl.load(K + rows, mask=mask_e[:, None] & mask_d[None, :], other=0.0).to(ACC)
        alpha = tl.exp(tl.sum(k * q[None, :], 1) * scale - lse)
        tl.store(ALPHA + offs_e * H + h, alpha, mask=mask_e)


@triton.jit
def _grad_query(
    Q, K, V, GOUT, LSE, DELTA, PTR, SRC, W, GQ, scale, H, D,
    HAS_W: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """dq_i = scale · Σ_e p_e (dp_e − δ_i) k_j over target i's in-edges, dp_e = w_e dO_i·v_j,
    δ_i = dO_i·O_i."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(Q + (i * H + h) * D + offs_d, mask=mask_d, other=0.0).to(ACC)
    g = tl.load(GOUT + (i * H + h) * D + offs_d, mask=mask_d, other=0.0).to(ACC)
    lse = tl.load(LSE + i * H + h)
    delta = tl.load(DELTA + i * H + h)
    start = tl.load(PTR + i)
    end = tl.load(PTR + i + 1)
    acc = tl.zeros([BLOCK_D], ACC)
    for block in range(start, end, BLOCK_E):
        offs_e = block + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        j = tl.load(SRC + offs_e, mask=mask_e, other=0)
        rows = (j[:, None] * H + h) * D + offs_d[None, :]
        mask = mask_e[:, None] & mask_d[None, :]
        k = tl.load(K + rows, mask=mask, other=0.0).to(ACC)
        v = tl.load(V + rows, mask=mask, other=0.0).to(ACC)
        p = tl.where(mask_e, tl.exp(tl.sum(k * q[None, :], 1) * scale - lse), 0.0)
        dp = tl.sum(v * g[None, :], 1)
        if HAS_W:
            dp = dp * tl.load(W + offs_e * H + h, mask=mask_e, other=0.0).to(ACC)
        acc += tl.sum((p * (dp - delta))[:, None] * k, 0)
    tl.store(GQ + (i * H + h) * D + offs_d, (acc * scale).to(GQ.dtype.element_ty), mask=mask_d)


@triton.jit
def _grad_key_value(
    Q, K, V, GOUT, LSE, DELTA, PTR_T, DST_T, POS_T, W, GK, GV, scale, H, D,
    HAS_W: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """dk_j = scale · Σ_e p_e (dp_e − δ_i) q_i and dv_j = Σ_e w_e p_e dO_i over source j's
    out-edges (the transposed layout: targets ``DST_T``, layout positions ``POS_T``)."""
    j = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    k = tl.load(K + (j * H + h) * D + offs_d, mask=mask_d, other=0.0).to(ACC)
    v = tl.load(V + (j * H + h) * D + offs_d, mask=mask_d, other=0.0).to(ACC)
    start = tl.load(PTR_T + j)
    end = tl.load(PTR_T + j + 1)
    acc_k = tl.zeros([BLOCK_D], ACC)
    acc_v = tl.zeros([BLOCK_D], ACC)
    for block in range(start, end, BLOCK_E):
        offs_e = block + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        i = tl.load(DST_T + offs_e, mask=mask_e, other=0)
        rows = (i[:, None] * H + h) * D + offs_d[None, :]
        mask = mask_e[:, None] & mask_d[None, :]
        q = tl.load(Q + rows, mask=mask, other=0.0).to(ACC)
        g = tl.load(GOUT + rows, mask=mask, other=0.0).to(ACC)
        lse = tl.load(LSE + i * H + h, mask=mask_e, other=0.0)
        delta = tl.load(DELTA + i * H + h, mask=mask_e, other=0.0)
        p = tl.where(mask_e, tl.exp(tl.sum(q * k[None, :], 1) * scale - lse), 0.0)
        dp = tl.sum(g * v[None, :], 1)
        weighted = p
        if HAS_W:
            pos = tl.load(POS_T + offs_e, mask=mask_e, other=0)
            w = tl.load(W + pos * H + h, mask=mask_e, other=0.0).to(ACC)
            dp = dp * w
            weighted = p * w
        acc_v += tl.sum(weighted[:, None] * g, 0)
        acc_k += tl.sum((p * (dp - delta))[:, None] * q, 0)
    out = (j * H + h) * D + offs_d
    tl.store(GK + out, (acc_k * scale).to(GK.dtype.element_ty), mask=mask_d)
    tl.store(GV + out, acc_v.to(GV.dtype.element_ty), mask=mask_d)
