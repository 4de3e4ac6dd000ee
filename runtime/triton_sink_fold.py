"""Fold the sink columns into a banded attention output (the second half of ``cudnn_band_prefill``).

A MoA head sees key j from query position i iff j <= i and (j < sink or i - j < span). A banded
attention (cuDNN's sliding window) computes the ``i - j < span`` part and returns, per row, the
output o and the natural-log log-sum-exp of its scores. The sink keys it left out are
j < min(sink, i - span + 1); this kernel scores them and merges the two softmax states in place:
o <- (o e^lse + sum_j e^s_j v_j) / (e^lse + sum_j e^s_j). Rows that miss no sink key are not
written. A pass may fold only some heads and read their statistics where the band calls left them
(``rows``): the band path's calls write them in per-call blocks, and the fold reads those blocks
in place instead of after a gather into head order. One program = one block of query rows of one
(batch, listed head); a block that misses no sink key returns at once, so the pass costs ~3 row
reads/writes only where sinks are missing.
Sink keys are read in blocks of at most 64 (an online-softmax loop), and never past the last row's
missing ones, so a plan with a large sink neither overflows registers nor reads beyond the keys.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moa_plan.runtime.triton_common import head_strides
from moa_plan.runtime.triton_interpreter import check_interpreter, interpreting

_LOG2E = 1.4426950408889634


@triton.jit
def _sink_fold_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    ROWS,
    SPANS,
    n_rows,
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
    GROUP,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = (tl.program_id(1) // n_rows).to(tl.int64)
    row = tl.program_id(1) % n_rows
    h = tl.load(ROWS + row * 3).to(tl.int32)  # (query head, its statistics' offset, their batch stride)
    lse_at = LSE + tl.load(ROWS + row * 3 + 1) + b * tl.load(ROWS + row * 3 + 2)
    kvh = h // GROUP
    span = tl.load(SPANS + h)
    off = k_len - q_len  # position of query row 0
    last = tl.minimum((pid_m + 1) * BLOCK_M, q_len) - 1
    most = tl.minimum(sink, off + last - span + 1)  # the block's last row misses the most sink keys
    if most > 0:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        missing = tl.minimum(sink, off + offs_m - span + 1)  # sink keys j < missing are outside the band
        rows = (offs_m < q_len) & (missing > 0)
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
            mask=rows[:, None],
            other=0.0,
        )
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
        # the band's state: its max is taken as lse (base 2), so its weight starts at 1
        m_i = tl.load(lse_at + offs_m, mask=rows, other=0.0) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
        acc = tl.load(o_ptrs, mask=rows[:, None], other=0.0).to(tl.float32)
        for j0 in range(0, most, BLOCK_J):  # sink keys in blocks: any sink size fits in registers
            offs_j = j0 + tl.arange(0, BLOCK_J)
            jmask = offs_j < most
            kk = tl.load(
                K + b * stride_kb + kvh * stride_kh + offs_j[:, None] * stride_kn + offs_d[None, :],
                mask=jmask[:, None],
                other=0.0,
            )
            vv = tl.load(
                V + b * stride_vb + kvh * stride_vh + offs_j[:, None] * stride_vn + offs_d[None, :],
                mask=jmask[:, None],
                other=0.0,
            )
            if IEEE:
                s = tl.dot(q, tl.trans(kk), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kk))
            s = tl.where(offs_j[None, :] < missing[:, None], s * qk_scale, float("-inf"))  # base-2 scores
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = tl.dot(p.to(vv.dtype), vv, acc * alpha[:, None], input_precision="ieee")
            else:
                acc = tl.dot(p.to(vv.dtype), vv, acc * alpha[:, None])
            m_i = m_new
        tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=rows[:, None])


def head_rows(hq: int, q_len: int, device) -> torch.Tensor:
    """The ``rows`` table of every head of a contiguous [B, Hq, Lq] statistics tensor (built on
    the device: a table copied from the host would wait for the GPU)."""
    h = torch.arange(hq, device=device, dtype=torch.int64)
    return torch.stack([h, h * q_len, torch.full_like(h, hq * q_len)], 1)


def fold_sink(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    spans: torch.Tensor,
    sink: int,
    scale: float | None = None,
    *,
    rows: torch.Tensor | None = None,
    block_m: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """Merge the sink keys a band left out into ``out`` (in place) and return it.

    q, out [B, Hq, Lq, D] (any strides, last axis contiguous); k, v [B, Hkv, Lk, D]; lse float32:
    natural-log log-sum-exp of each row's band scores (scale included), a contiguous [B, Hq, Lq]
    or, with ``rows``, any flat buffer; rows int64 [n, 3]: the heads to fold, each as (query head,
    element offset of its batch-0 row-0 statistic in lse, the batch stride of its statistics);
    spans [Hq]: the band of head h is i - j < spans[h] (a span >= Lk means the band is the whole
    causal row: nothing to fold). Query row r is at position Lk - Lq + r. ``block_m`` (query rows
    per program, default 64) and ``num_warps`` override the launch (``tools/prefill_sweep.py``).
    """
    batch, hq, q_len, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    if out.shape != q.shape:
        raise ValueError(f"out must be {tuple(q.shape)}, got {tuple(out.shape)}")
    if rows is None:
        if lse.shape != (batch, hq, q_len) or not lse.is_contiguous():
            raise ValueError(f"lse must be a contiguous [{batch}, {hq}, {q_len}] without rows")
        rows = head_rows(hq, q_len, q.device)
    elif rows.dim() != 2 or rows.shape[1] != 3 or rows.dtype != torch.int64 or lse.dtype != torch.float32:
        raise ValueError("rows must be an int64 [n, 3] table and lse float32")
    if sink <= 0 or q_len == 0 or batch == 0 or rows.shape[0] == 0:
        return out
    if any(t.stride(-1) != 1 for t in (q, k, v, out)):
        raise ValueError("the last (head_dim) axis of q, k, v and out must be contiguous")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    spans = spans.to(device=q.device, dtype=torch.int32).contiguous()
    block_m = block_m or (32 if interpreting() else 64)
    check_interpreter()
    _sink_fold_kernel[(triton.cdiv(q_len, block_m), batch * rows.shape[0])](
        q,
        k,
        v,
        out,
        lse,
        rows.contiguous(),
        spans,
        rows.shape[0],
        *head_strides(q, k, v, out),
        int(sink),
        q_len,
        k_len,
        scale * _LOG2E,
        hq // hkv,
        HEAD_DIM=d,
        BLOCK_M=block_m,
        BLOCK_J=min(64, max(16, triton.next_power_of_2(min(int(sink), k_len)))),
        IEEE=q.dtype == torch.float32,
        num_warps=num_warps,
    )
    return out
