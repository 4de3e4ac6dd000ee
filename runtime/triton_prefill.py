"""Triton prefill attention with a MoA plan: flash attention that skips key blocks no row sees.

Layout and semantics are `moa_plan.runtime.reference.reference_attention`'s: q [B, Hq, Lq, D],
k and v [B, Hkv, Lk, D], query row r at position Lk - Lq + r, query head h reads KV head
h // (Hq // Hkv) (no copies), and position i sees key j iff j <= i and (j < sink or
i - j < spans[h]). One program handles one (query block, batch * query head). Per program the
visible keys form at most two ranges, the sink [0, sink) and the union of the block's windows
[i_lo - span + 1, i_hi]; only key blocks meeting them are loaded, and only blocks where some
pair may be hidden (the sink/window edges, the diagonal, the end of the keys) pay for the mask.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _block_range(
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
def _prefill_kernel(
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
    acc, m_i, l_i = _block_range(
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
    acc, m_i, l_i = _block_range(
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
    acc, m_i, l_i = _block_range(
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
    acc, m_i, l_i = _block_range(
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
    acc, m_i, l_i = _block_range(
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


@triton.jit
def _paged_kernel(
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
    """``_prefill_kernel`` over vLLM's paged cache, many sequences at once: sequence s has query
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
    rows = off + offs_m
    i_lo = off + m0
    i_hi = tl.minimum(off + m0 + BLOCK_M, k_len) - 1

    q_ptrs = Q + (q_start + offs_m[:, None]).to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < q_len, other=0.0)
    bt = BT + s.to(tl.int64) * stride_bt
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # The same key ranges as _prefill_kernel: sink blocks, then the window blocks (masked at the edges).
    sink_end = tl.minimum(sink, i_hi + 1)
    sb_end = tl.cdiv(sink_end, BLOCK_N)
    sb_full = tl.minimum(tl.minimum(sink, i_lo + 1), k_len) // BLOCK_N
    sb_full = tl.minimum(sb_full, sb_end)
    acc, m_i, l_i = _block_range(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kb,
        stride_vb,
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
        bt,
        stride_kp,
        stride_vp,
        PAGE,
        True,
    )
    acc, m_i, l_i = _block_range(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kb,
        stride_vb,
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
        bt,
        stride_kp,
        stride_vp,
        PAGE,
        True,
    )
    win_lo = tl.maximum(i_lo - span + 1, 0)
    wb_lo = tl.maximum(win_lo // BLOCK_N, sb_end)
    wb_hi = tl.maximum(tl.cdiv(i_hi + 1, BLOCK_N), wb_lo)
    edge = i_hi - span
    wf_lo = tl.where(edge >= 0, edge // BLOCK_N + 1, 0)
    wf_lo = tl.minimum(tl.maximum(wf_lo, wb_lo), wb_hi)
    wf_hi = tl.minimum(i_lo + 1, k_len) // BLOCK_N
    wf_hi = tl.minimum(tl.maximum(wf_hi, wf_lo), wb_hi)
    acc, m_i, l_i = _block_range(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kb,
        stride_vb,
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
        bt,
        stride_kp,
        stride_vp,
        PAGE,
        True,
    )
    acc, m_i, l_i = _block_range(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kb,
        stride_vb,
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
        bt,
        stride_kp,
        stride_vp,
        PAGE,
        True,
    )
    acc, m_i, l_i = _block_range(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kb,
        stride_vb,
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
        bt,
        stride_kp,
        stride_vp,
        PAGE,
        True,
    )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + (q_start + offs_m[:, None]).to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < q_len)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_config(
    head_dim: int, dtype: torch.dtype, q_len: int, programs128: int = 1 << 30, sms: int = 132
) -> dict[str, int]:
    """Block sizes and warps for Hopper (H100/H200); small blocks for short inputs and the CPU."""
    if _interpreting():
        bm = max(16, min(64, triton.next_power_of_2(q_len)))
        return {"BLOCK_M": bm, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    big = head_dim * (4 if dtype == torch.float32 else 2)
    if big > 256:  # fp32 with D >= 128, or D = 256: keep shared memory in bounds
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    # 128-row query blocks (8 warps) once there are >= ~16 waves of them; below that, 64-row blocks
    # (4 warps) halve the tail of the last wave (H100 sweep: 4k at 50% density 0.226 -> 0.201 ms).
    if q_len <= 64 or programs128 < 16 * sms:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    if head_dim <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spans: torch.Tensor,
    sink: int,
    scale: float | None = None,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + plan mask) v, reading only key blocks inside sink + window.

    q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] with Lq <= Lk; spans int [Hq] (the layer's spans at
    N = Lk); returns [B, Hq, Lq, D] in q's dtype. `config` overrides the block sizes (tuning).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D [B, H, L, D]")
    batch, hq, q_len, d = q.shape
    _, hkv, k_len, _ = k.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if q_len > k_len:
        raise ValueError(f"more queries ({q_len}) than keys ({k_len})")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {d}")
    if spans.shape != (hq,):
        raise ValueError(f"spans must have shape ({hq},), got {tuple(spans.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if q_len == 0 or batch == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    spans = spans.to(device=q.device, dtype=torch.int32).contiguous()
    sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) if q.is_cuda else 132
    cfg = dict(default_config(d, q.dtype, q_len, triton.cdiv(q_len, 128) * batch * hq, sms))
    if config:
        cfg.update(config)
    grid = (triton.cdiv(q_len, cfg["BLOCK_M"]), batch * hq)
    _prefill_kernel[grid](
        q,
        k,
        v,
        out,
        spans,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        int(sink),
        q_len,
        k_len,
        scale * _LOG2E,
        hq,
        hq // hkv,
        HEAD_DIM=d,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        IEEE=q.dtype == torch.float32,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start: torch.Tensor,
    seq_lens: torch.Tensor,
    spans: torch.Tensor,
    sink: int,
    scale: float,
    out: torch.Tensor,
    max_query_len: int,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Plan attention over a paged cache (layouts: ``moa_plan.runtime.paged.paged_attention``);
    writes ``out`` [T, Hq, D] and returns it."""
    t, hq, d = query.shape
    hkv = key_cache.shape[2]
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {d}")
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1 or query.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("the last (head_dim) axis of query, out and the caches must be contiguous")
    num_seqs = seq_lens.shape[0]
    if t == 0 or num_seqs == 0 or max_query_len == 0:
        return out
    cfg = dict(default_config(d, query.dtype, max_query_len))
    if config:
        cfg.update(config)
    spans = spans.to(device=query.device, dtype=torch.int32).contiguous()
    grid = (triton.cdiv(max_query_len, cfg["BLOCK_M"]), num_seqs * hq)
    _paged_kernel[grid](
        query,
        key_cache,
        value_cache,
        out,
        spans,
        block_table,
        query_start,
        seq_lens,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        block_table.stride(0),
        spans.stride(0),
        int(sink),
        float(scale) * _LOG2E,
        hq,
        hq // hkv,
        key_cache.shape[1],
        HEAD_DIM=d,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        IEEE=query.dtype == torch.float32,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out
