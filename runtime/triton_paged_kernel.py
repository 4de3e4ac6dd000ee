"""The Triton prefill kernel of a MoA plan over a paged KV cache (vLLM's layout; launched by
``triton_prefill.paged_attention``): the same key-block skipping as the contiguous kernel, with
keys read through a block table.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moa_plan.runtime.triton_common import PAGED, plan_rows


@triton.jit
def paged_kernel(
    Q,
    K,
    V,
    O,
    SPANS,
    BT,
    QSTART,
    SEQLEN,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kp,
    stride_kh,
    stride_vb,
    stride_vp,
    stride_vh,
    stride_bt,
    stride_sp,
    sink,
    qk_scale,
    HQ,
    GROUP,
    PAGE,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    """``prefill_kernel`` over vLLM's paged cache, many sequences at once: sequence s has query
    rows QSTART[s] .. QSTART[s+1]-1 (the last ones of its SEQLEN[s] positions, already in the
    cache), its pages in row s of BT and its spans (at N = SEQLEN[s]) in row s of SPANS."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    s = pid_bh // HQ
    h = pid_bh % HQ
    q_start = tl.load(QSTART + s)
    q_len = tl.load(QSTART + s + 1) - q_start
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    k_len = tl.load(SEQLEN + s)
    kvh = h // GROUP
    span = tl.load(SPANS + s * stride_sp + h)
    off = k_len - q_len
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = off + offs_m  # absolute positions of the query rows
    i_lo = off + m0
    i_hi = tl.minimum(off + m0 + BLOCK_M, k_len) - 1

    q_ptrs = Q + (q_start + offs_m[:, None]).to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < q_len, other=0.0)
    bt = BT + s.to(tl.int64) * stride_bt
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    keys = (k_base, v_base, stride_kb, stride_vb, bt, stride_kp, stride_vp, PAGE)
    out = plan_rows(q, keys, rows, i_lo, i_hi, span, sink, k_len, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, IEEE, PAGED)

    o_ptrs = O + (q_start + offs_m[:, None]).to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < q_len)
