"""The Triton prefill kernel of a MoA plan over contiguous K/V (launched by ``triton_prefill``).

One program handles one (query block, batch * query head); ``triton_common.plan_rows`` runs flash
attention over the sink and window key blocks, masking only where some pair may be hidden, and is
shared with the paged kernel (``triton_paged_kernel``). K and V come as pointers (LAYOUT POINTERS) or as
tensor descriptors (LAYOUT DESCRIPTORS, TMA loads on Hopper; the strides arguments are then unused).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moa_plan.runtime.triton_common import DESCRIPTORS, plan_rows


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
    LAYOUT: tl.constexpr,
):
    # Last query blocks first: their windows are never clipped at 0, so the longest programs start
    # first and the short ones fill the tail of the last wave.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b32 = pid_bh // HQ
    b = b32.to(tl.int64)  # 64-bit batch offsets: B x Hq x N x D passes 2^31 at batch 32+, 16k
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
    if LAYOUT == DESCRIPTORS:
        keys = (K, V, b32, kvh)
    else:
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        keys = (k_base, v_base, stride_kn, stride_vn, K, 0, 0, 1)  # contiguous: no block table
    out = plan_rows(q, keys, rows, i_lo, i_hi, span, sink, k_len, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, IEEE, LAYOUT)

    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < q_len)
