"""The Triton prefill kernel of a MoA plan over contiguous K/V (launched by ``triton_prefill``).

One program handles one (query block, batch * query head); ``block_range`` runs flash attention
over one range of key blocks, masking only where some pair may be hidden, and is shared with the
paged kernel (``triton_paged_kernel``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_range(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    offs_d,
    rows,
    lo_blk,
    hi_blk,
    span,
    sink,
    k_len,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,
    IEEE: tl.constexpr,
    BT,
    stride_kp,
    stride_vp,
    PAGE,
    PAGED: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) with key blocks [lo_blk, hi_blk).

    PAGED (vLLM's paged cache, ``moa_plan.runtime.paged``): key position j lives in page
    BT[j // PAGE] at row j % PAGE; strides ``stride_kn``/``stride_vn`` are then the page strides.
    """
    offs_n = tl.arange(0, BLOCK_N)
    for blk in range(lo_blk, hi_blk):
        cols = blk * BLOCK_N + offs_n
        if PAGED:
            page = tl.load(BT + cols // PAGE, mask=cols < k_len, other=0).to(tl.int64)
            k_ptrs = k_base + page[None, :] * stride_kn + (cols % PAGE)[None, :] * stride_kp + offs_d[:, None]
            v_ptrs = v_base + page[:, None] * stride_vn + (cols % PAGE)[:, None] * stride_vp + offs_d[None, :]
        else:
            k_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]
            v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]
        if MASK:
            kt = tl.load(k_ptrs, mask=cols[None, :] < k_len, other=0.0)
        else:
            kt = tl.load(k_ptrs)
        if IEEE:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        if MASK:
            qk = qk * qk_scale
            diff = rows[:, None] - cols[None, :]
            seen = (diff >= 0) & ((cols[None, :] < sink) | (diff < span)) & (cols[None, :] < k_len)
            qk = tl.where(seen, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_use[:, None])
        else:  # scale folded into one FMA per score (fp32), as in the Triton fused-attention tutorial
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASK:
            vv = tl.load(v_ptrs, mask=cols[:, None] < k_len, other=0.0)
        else:
            vv = tl.load(v_ptrs)
        if IEEE:
            acc = tl.dot(p.to(vv.dtype), vv, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(vv.dtype), vv, acc)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def prefill_kernel(
    Q,
    K,
    V,
    O,
    SPANS,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    sink,
    q_len,
    k_len,
    qk_scale,
    HQ,
    GROUP,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    # Last query blocks first: their windows are never clipped at 0, so the longest programs start
    # first and the short ones fill the tail of the last wave.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kvh = h // GROUP
    span = tl.load(SPANS + h)

    off = k_len - q_len
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = off + offs_m  # absolute positions of the query rows
    i_lo = off + m0
    i_hi = tl.minimum(off + m0 + BLOCK_M, k_len) - 1

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < q_len, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Sink part: keys [0, min(sink, i_hi + 1)); blocks ending before min(sink, i_lo + 1) need no mask.
    sink_end = tl.minimum(sink, i_hi + 1)
    sb_end = tl.cdiv(sink_end, BLOCK_N)
    sb_full = tl.minimum(tl.minimum(sink, i_lo + 1), k_len) // BLOCK_N
    sb_full = tl.minimum(sb_full, sb_end)
    acc, m_i, l_i = block_range(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        offs_d,
        rows,
        0,
        sb_full,
        span,
        sink,
        k_len,
        qk_scale,
        BLOCK_N,
        False,
        IEEE,
        K,
        0,
        0,
        1,
        False,
    )
    acc, m_i, l_i = block_range(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        offs_d,
        rows,
        sb_full,
        sb_end,
        span,
        sink,
        k_len,
        qk_scale,
        BLOCK_N,
        True,
        IEEE,
        K,
        0,
        0,
        1,
        False,
    )

    # Window part: keys [max(0, i_lo - span + 1), i_hi], after the sink blocks.
    win_lo = tl.maximum(i_lo - span + 1, 0)
    wb_lo = tl.maximum(win_lo // BLOCK_N, sb_end)
    wb_hi = tl.maximum(tl.cdiv(i_hi + 1, BLOCK_N), wb_lo)
    # Unmasked blocks: every row sees every key (j0 > i_hi - span and j0 + BLOCK_N - 1 <= i_lo).
    edge = i_hi - span
    wf_lo = tl.where(edge >= 0, edge // BLOCK_N + 1, 0)
    wf_lo = tl.minimum(tl.maximum(wf_lo, wb_lo), wb_hi)
    wf_hi = tl.minimum(i_lo + 1, k_len) // BLOCK_N
    wf_hi = tl.minimum(tl.maximum(wf_hi, wf_lo), wb_hi)
    acc, m_i, l_i = block_range(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        offs_d,
        rows,
        wb_lo,
        wf_lo,
        span,
        sink,
        k_len,
        qk_scale,
        BLOCK_N,
        True,
        IEEE,
        K,
        0,
        0,
        1,
        False,
    )
    acc, m_i, l_i = block_range(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        offs_d,
        rows,
        wf_lo,
        wf_hi,
        span,
        sink,
        k_len,
        qk_scale,
        BLOCK_N,
        False,
        IEEE,
        K,
        0,
        0,
        1,
        False,
    )
    acc, m_i, l_i = block_range(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        offs_d,
        rows,
        wf_hi,
        wb_hi,
        span,
        sink,
        k_len,
        qk_scale,
        BLOCK_N,
        True,
        IEEE,
        K,
        0,
        0,
        1,
        False,
    )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < q_len)
