"""Triton decode attention over MoA's flat, ragged, per-head static KV cache (flash-decoding).

Cache layout (LAYOUT.md, written by `moa_plan.runtime.cache`): k_cache/v_cache [B, S, D]; KV head
k owns slots [offset[k], offset[k] + cap[k]), the first n_sink[k] hold positions 0.., the rest
are a ring of ring[k] = cap[k] - n_sink[k] slots where position p >= n_sink[k] lives in slot
n_sink[k] + (p - n_sink[k]) % ring[k]. At total length n, query head h sees position p iff
p < sink or (n - 1) - p < spans[h].

What is read: per KV head, the valid sink slots plus the ring slots that hold the positions in
the largest window of its query heads, [max(n_sink, n - W), n). These form one "virtual" run of
L tokens (sink tokens, then window tokens in position order, wrapping around the ring once);
the run is split into equal chunks (split-K) so that batch x KV heads x chunks fills the GPU.
One program reads one chunk of one (batch, KV head) once for all G query heads of the group
(a [G, D] x [D, BLOCK_N] product), so every KV byte is read once per group. A second small
kernel merges the chunks' partial softmax states when there is more than one chunk.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _total_length(n_arg, N_PTR: tl.constexpr):
    """n, passed by value or (N_PTR, for CUDA graphs) as a pointer to a device integer."""
    if N_PTR:
        n = tl.load(n_arg).to(tl.int32)
    else:
        n = n_arg
    return n


@triton.jit
def _group_extent(SPANS, OFFSET, CAP, NSINK, kvh, n, GROUP, GROUP_P: tl.constexpr):
    """(slot base, ring size, sink tokens, first window position, window tokens) of KV head kvh."""
    g = tl.arange(0, GROUP_P)
    sp = tl.load(SPANS + kvh * GROUP + g, mask=g < GROUP, other=0)
    w = tl.max(sp, 0)
    base = tl.load(OFFSET + kvh)
    cap = tl.load(CAP + kvh)
    n_sink = tl.load(NSINK + kvh)
    ring = cap - n_sink
    ns_eff = tl.minimum(n_sink, n)
    p_lo = tl.maximum(n_sink, n - w)
    m = tl.minimum(tl.maximum(n - p_lo, 0), ring)
    p_lo = n - m
    return base, ring, n_sink, ns_eff, p_lo, m


@triton.jit(do_not_specialize=["n_arg", "chunk", "num_splits"])
def _decode_kernel(
    Q,
    K,
    V,
    OFFSET,
    CAP,
    NSINK,
    SPANS,
    O,
    M_PART,
    L_PART,
    O_PART,
    n_arg,
    sink,
    qk_scale,
    chunk,
    num_splits,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    stride_ob,
    stride_oh,
    HKV,
    GROUP,
    GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    N_PTR: tl.constexpr,
    IEEE: tl.constexpr,
):
    split = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // HKV
    kvh = pid % HKV
    n = _total_length(n_arg, N_PTR)
    base, ring, n_sink, ns_eff, p_lo, m = _group_extent(SPANS, OFFSET, CAP, NSINK, kvh, n, GROUP, GROUP_P)
    total = ns_eff + m
    c0 = split * chunk
    if c0 < total:
        c1 = tl.minimum(c0 + chunk, total)
        g = tl.arange(0, GROUP_P)
        heads = kvh * GROUP + g
        gmask = g < GROUP
        span = tl.load(SPANS + heads, mask=gmask, other=1)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
        ring_safe = tl.maximum(ring, 1)
        r_lo = (p_lo - n_sink) % ring_safe
        k_base = K + b * stride_kb
        v_base = V + b * stride_vb

        m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_P], tl.float32)
        acc = tl.zeros([GROUP_P, HEAD_DIM], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        for t0 in range(c0, c1, BLOCK_N):
            t = t0 + offs_n
            valid = t < c1
            in_sink = t < ns_eff
            u = t - ns_eff
            r = r_lo + u
            r = tl.where(r >= ring_safe, r - ring_safe, r)
            slot = base + tl.where(in_sink, t, n_sink + r)
            pos = tl.where(in_sink, t, p_lo + u)
            kt = tl.load(k_base + slot[None, :] * stride_ks + offs_d[:, None], mask=valid[None, :], other=0.0)
            if IEEE:
                qk = tl.dot(q, kt, input_precision="ieee")
            else:
                qk = tl.dot(q, kt)
            qk = qk * qk_scale
            seen = valid[None, :] & (
                in_sink[None, :] | (pos[None, :] < sink) | ((n - 1 - pos)[None, :] < span[:, None])
            )
            qk = tl.where(seen, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            vv = tl.load(v_base + slot[:, None] * stride_vs + offs_d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                acc = tl.dot(p.to(vv.dtype), vv, acc * alpha[:, None], input_precision="ieee")
            else:
                acc = tl.dot(p.to(vv.dtype), vv, acc * alpha[:, None])
            m_i = m_new

        if not SPLIT:
            l_safe = tl.where(l_i == 0.0, 1.0, l_i)
            out = acc / l_safe[:, None]
            tl.store(
                O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                out.to(O.dtype.element_ty),
                mask=gmask[:, None],
            )
        else:
            row = (b * HKV * GROUP + heads) * num_splits + split
            tl.store(M_PART + row, m_i, mask=gmask)
            tl.store(L_PART + row, l_i, mask=gmask)
            tl.store(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=gmask[:, None])


@triton.jit(do_not_specialize=["n_arg", "chunk", "num_splits"])
def _reduce_kernel(
    M_PART,
    L_PART,
    O_PART,
    O,
    OFFSET,
    CAP,
    NSINK,
    SPANS,
    n_arg,
    chunk,
    num_splits,
    stride_ob,
    stride_oh,
    HQ,
    GROUP,
    GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS_P: tl.constexpr,
    N_PTR: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // HQ
    h = pid % HQ
    n = _total_length(n_arg, N_PTR)
    base, ring, n_sink, ns_eff, p_lo, m = _group_extent(SPANS, OFFSET, CAP, NSINK, h // GROUP, n, GROUP, GROUP_P)
    active = tl.cdiv(ns_eff + m, chunk)
    s = tl.arange(0, SPLITS_P)
    smask = s < active
    row = pid * num_splits + s
    mp = tl.load(M_PART + row, mask=smask, other=float("-inf"))
    lp = tl.load(L_PART + row, mask=smask, other=0.0)
    m_max = tl.max(mp, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(mp - m_max)
    w = tl.where(smask, w, 0.0)
    l_tot = tl.sum(w * lp, 0)
    offs_d = tl.arange(0, HEAD_DIM)
    op = tl.load(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], mask=smask[:, None], other=0.0)
    acc = tl.sum(op * w[:, None], 0)
    l_tot = tl.where(l_tot == 0.0, 1.0, l_tot)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, (acc / l_tot).to(O.dtype.element_ty))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _max_cap(cap: torch.Tensor) -> int:
    """Largest per-head capacity, read to the host once per cap tensor (caps are static)."""
    cached = getattr(cap, "_moa_max_cap", None)
    if cached is None or cached[0] != cap._version:
        cached = (cap._version, int(cap.max().item()) if cap.numel() else 0)
        cap._moa_max_cap = cached
    return cached[1]


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(batch: int, hkv: int, max_tokens: int, block_n: int, sms: int) -> tuple[int, int]:
    """(number of splits, chunk tokens) along the cache.

    Enough programs for about four waves when batch x KV heads is small, and chunks of at most
    ~2048 tokens even when the batch alone fills the GPU: KV groups of a heterogeneous plan read up
    to 3x different lengths, and shorter chunks even out the work per program. Chunks are >= 2
    blocks. Chosen from interleaved H100 timings of five policies (evals/results/perf-notes.md).
    """
    blocks = max(1, triton.cdiv(max_tokens, block_n))
    fill = triton.cdiv(4 * sms, max(1, batch * hkv))
    balance = triton.cdiv(max_tokens, 2048)
    splits = max(1, min(max(fill, balance), triton.cdiv(blocks, 2), 128))
    chunk = triton.cdiv(blocks, splits) * block_n
    splits = triton.cdiv(max(1, max_tokens), chunk)
    return splits, chunk


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    offset: torch.Tensor,
    cap: torch.Tensor,
    n_sink: torch.Tensor,
    spans: torch.Tensor,
    sink: int,
    n: int | torch.Tensor,
    scale: float | None = None,
    *,
    max_cap: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """One decode step of every query head of one layer over the per-head cache: q [B, Hq, D] -> [B, Hq, D].

    `n` is the total length after this token's K/V was written (an int, or a 0-dim integer device
    tensor for CUDA graphs). `max_cap` (default: read once from `cap`) bounds the tokens per head
    when `n` is a tensor; `block_n` / `num_splits` override the tuning.
    """
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"q must be [B, Hq, D] and caches equal [B, S, D]; got {tuple(q.shape)}, "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    batch, hq, d = q.shape
    hkv = offset.shape[0]
    if k_cache.shape[0] != batch or k_cache.shape[2] != d:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)}")
    if hq % hkv or cap.shape != (hkv,) or n_sink.shape != (hkv,) or spans.shape != (hq,):
        raise ValueError("offset/cap/n_sink must be [Hkv] and spans [Hq], Hq a multiple of Hkv")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {d}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q and caches must share a dtype, got {q.dtype}, {k_cache.dtype}")
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    n_ptr = isinstance(n, torch.Tensor)
    if n_ptr:
        n_arg = n.reshape(()).to(device=q.device)
        bound = max_cap if max_cap is not None else _max_cap(cap)
    else:
        n_arg = int(n)
        if n_arg < 1:
            raise ValueError(f"n must be >= 1, got {n_arg}")
        bound = min(n_arg, max_cap if max_cap is not None else _max_cap(cap))
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    i32 = dict(device=q.device, dtype=torch.int32)
    offset, cap, n_sink, spans = (t.to(**i32).contiguous() for t in (offset, cap, n_sink, spans))

    if block_n is None:
        block_n = 32 if _interpreting() else (64 if d <= 128 else 32)
    if num_splits is None:
        splits, chunk = plan_splits(batch, hkv, bound, block_n, _sm_count(q.device))
    else:
        blocks = max(1, triton.cdiv(bound, block_n))
        chunk = triton.cdiv(blocks, max(1, num_splits)) * block_n
        splits = triton.cdiv(max(1, bound), chunk)
    group_p = max(16, triton.next_power_of_2(group))
    out = torch.empty((batch, hq, d), device=q.device, dtype=q.dtype)
    if splits > 1:
        m_part = torch.empty((batch * hq * splits,), device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        o_part = torch.empty((batch * hq * splits, d), device=q.device, dtype=torch.float32)
    else:
        m_part = l_part = o_part = out
    warps = 4
    stages = 1 if _interpreting() else 3
    both = dict(GROUP_P=group_p, HEAD_DIM=d, N_PTR=n_ptr)  # compile-time options of both kernels
    _decode_kernel[(splits, batch * hkv)](
        q,
        k_cache,
        v_cache,
        offset,
        cap,
        n_sink,
        spans,
        out,
        m_part,
        l_part,
        o_part,
        n_arg,
        int(sink),
        scale * _LOG2E,
        chunk,
        splits,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        hkv,
        group,
        **both,
        BLOCK_N=block_n,
        SPLIT=splits > 1,
        IEEE=q.dtype == torch.float32,
        num_warps=warps,
        num_stages=stages,
    )
    if splits > 1:
        _reduce_kernel[(batch * hq,)](
            m_part,
            l_part,
            o_part,
            out,
            offset,
            cap,
            n_sink,
            spans,
            n_arg,
            chunk,
            splits,
            out.stride(0),
            out.stride(1),
            hq,
            group,
            **both,
            SPLITS_P=max(2, triton.next_power_of_2(splits)),
            num_warps=4,
        )
    return out
