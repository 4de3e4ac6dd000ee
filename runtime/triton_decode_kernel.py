"""Triton kernels of MoA decode attention (launched by ``triton_decode``; layout and reading order
described there).

``_decode_kernel``: one program = one split-K chunk of one (batch row, KV head), for all G query heads
of the group. With several chunks the partial softmax states (m, l, acc) go to scratch rows and are
merged either by ``_reduce_kernel`` (a second launch) or, with ``FUSED``, inside the same launch: each
program bumps a per-(row, KV head) arrival counter after writing its partials, and the program that
arrives last merges the group's chunks and resets the counter to 0 for the next launch (so CUDA graph
replays need no memset). Counters are shared by launches on one stream, never by concurrent ones.
With ``PDL`` the decode grid lets the merge launch at once and ``_reduce_kernel`` waits on-device
(``gdc_wait``) before it reads the partials. ``LAYOUT``: GATHER (pointer loads, slot per key) or
DESCRIPTORS (TMA tiles over runs of consecutive slots, ``_run``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moa_plan.runtime.triton_common import GATHER


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


@triton.jit
def _softmax_step(
    state, q, kt, vv, valid, always, pos, span, n, sink, qk_scale, IEEE: tl.constexpr, ZERO_HIDDEN: tl.constexpr
):
    """Online-softmax update of state = (acc, m_i, l_i) with one block of keys kt [D, BLOCK_N] and values
    vv [BLOCK_N, D] at positions pos: head g sees a valid key if `always` (a sink slot), pos < sink or
    n - 1 - pos < span[g]. ZERO_HIDDEN: values of invalid keys were loaded unmasked (whole TMA tiles)
    and are zeroed here, so slots outside the run may hold anything (even NaN)."""
    acc, m_i, l_i = state
    if IEEE:
        qk = tl.dot(q, kt, input_precision="ieee")
    else:
        qk = tl.dot(q, kt)
    qk = qk * qk_scale
    seen = valid[None, :] & (always[None, :] | (pos[None, :] < sink) | ((n - 1 - pos)[None, :] < span[:, None]))
    qk = tl.where(seen, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if ZERO_HIDDEN:
        vv = tl.where(valid[:, None], vv, 0.0)
    if IEEE:
        acc = tl.dot(p.to(vv.dtype), vv, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(vv.dtype), vv, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _run(
    state, q, keys, lo, hi, slot0, pos0, always_below, span, n, sink, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Fold virtual tokens [lo, hi) into state; their slots (slot0, slot0 + 1, ...) and positions
    (pos0, ...) are consecutive, so a block is one contiguous [BLOCK_N, D] tile of the cache, one TMA
    load per tensor. Positions below always_below are sink slots, always seen."""
    desc_k, desc_v, b = keys
    offs_n = tl.arange(0, BLOCK_N)
    for i0 in range(0, hi - lo, BLOCK_N):
        valid = i0 + offs_n < hi - lo
        pos = pos0 + i0 + offs_n
        kt = desc_k.load([b, slot0 + i0, 0]).reshape(BLOCK_N, HEAD_DIM).T
        vv = desc_v.load([b, slot0 + i0, 0]).reshape(BLOCK_N, HEAD_DIM)
        state = _softmax_step(state, q, kt, vv, valid, pos < always_below, pos, span, n, sink, qk_scale, IEEE, True)
    return state


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
    COUNTER,
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
    FUSED: tl.constexpr,
    LAYOUT: tl.constexpr,
    PDL: tl.constexpr,
    GROUP_M: tl.constexpr = 1,
    SPLITS_B: tl.constexpr = 1,
):
    if PDL:  # let the merge launch now: it waits (gdc_wait) for this grid's partials before reading them
        tl.extra.cuda.gdc_launch_dependents()
    split = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)  # 64-bit batch offsets (large batches of long caches)
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

        m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_P], tl.float32)
        acc = tl.zeros([GROUP_P, HEAD_DIM], tl.float32)
        state = (acc, m_i, l_i)
        if LAYOUT == GATHER:
            k_base = K + b * stride_kb
            v_base = V + b * stride_vb
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
                vv = tl.load(v_base + slot[:, None] * stride_vs + offs_d[None, :], mask=valid[:, None], other=0.0)
                state = _softmax_step(state, q, kt, vv, valid, in_sink, pos, span, n, sink, qk_scale, IEEE, False)
        else:
            # TMA (DESCRIPTORS): the chunk's tokens in at most three runs of consecutive slots (sink
            # slots, the ring from r_lo to its end, the ring from its start after the wrap), each read
            # as whole [BLOCK_N, D] tiles.
            keys = (K, V, b.to(tl.int32))
            first = ns_eff + ring - r_lo  # virtual index where the ring wraps
            lo = c0
            hi = tl.minimum(c1, ns_eff)
            state = _run(
                state, q, keys, lo, hi, base + lo, lo, ns_eff, span, n, sink, qk_scale, HEAD_DIM, BLOCK_N, IEEE
            )
            lo = tl.maximum(c0, ns_eff)
            hi = tl.minimum(c1, first)
            state = _run(
                state, q, keys, lo, hi, base + n_sink + r_lo + lo - ns_eff, p_lo + lo - ns_eff, 0,
                span, n, sink, qk_scale, HEAD_DIM, BLOCK_N, IEEE,
            )  # fmt: skip
            lo = tl.maximum(c0, first)
            state = _run(
                state, q, keys, lo, c1, base + n_sink + lo - first, p_lo + lo - ns_eff, 0,
                span, n, sink, qk_scale, HEAD_DIM, BLOCK_N, IEEE,
            )  # fmt: skip
        acc, m_i, l_i = state

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
            if FUSED:
                tl.debug_barrier()  # every thread's partials are written before the arrival is published
                arrived = tl.atomic_add(COUNTER + pid, 1, sem="acq_rel", scope="gpu")
                active = tl.cdiv(total, chunk)
                if arrived == active - 1:  # the last chunk of this (row, KV head) to finish merges them all
                    gm = tl.arange(0, GROUP_M)  # the group's heads only (GROUP_P pads them to 16 for tl.dot)
                    mheads = kvh * GROUP + gm
                    _merge_chunks(
                        M_PART,
                        L_PART,
                        O_PART,
                        O,
                        (b * HKV * GROUP + mheads) * num_splits,
                        active,
                        gm < GROUP,
                        O + b * stride_ob + mheads[:, None] * stride_oh + offs_d[None, :],
                        HEAD_DIM,
                        GROUP_M,
                        SPLITS_B,
                    )
                    tl.store(COUNTER + pid, 0)


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
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // HQ).to(tl.int64)
    h = pid % HQ
    n = _total_length(n_arg, N_PTR)
    base, ring, n_sink, ns_eff, p_lo, m = _group_extent(SPANS, OFFSET, CAP, NSINK, h // GROUP, n, GROUP, GROUP_P)
    active = tl.cdiv(ns_eff + m, chunk)
    if PDL:  # launched early (programmatic dependent launch): wait for the decode grid's partials
        tl.extra.cuda.gdc_wait()
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


@triton.jit
def _merge_chunks(
    M_PART, L_PART, O_PART, O, first, active, gmask, out_ptrs,
    HEAD_DIM: tl.constexpr, GROUP_M: tl.constexpr, SPLITS_B: tl.constexpr,
):  # fmt: skip
    """Merge the partial states of chunks 0..active-1 (rows first + s) of GROUP_M heads into out_ptrs,
    SPLITS_B chunks of every head per step, all their loads issued at once (a loop over chunks one by
    one waited on memory once per chunk: the fused merge measured 6-7 us slower than the second
    launch on an H200). Loads bypass L1 (.cg): the partials were written by other programs."""
    offs_d = tl.arange(0, HEAD_DIM)
    s = tl.arange(0, SPLITS_B)
    m_run = tl.full([GROUP_M], float("-inf"), tl.float32)
    l_run = tl.zeros([GROUP_M], tl.float32)
    acc = tl.zeros([GROUP_M, HEAD_DIM], tl.float32)
    for s0 in range(0, active, SPLITS_B):
        live = gmask[:, None] & (s0 + s[None, :] < active)
        rows = first[:, None] + s0 + s[None, :]
        mp = tl.load(M_PART + rows, mask=live, other=float("-inf"), cache_modifier=".cg")
        lp = tl.load(L_PART + rows, mask=live, other=0.0, cache_modifier=".cg")
        op = tl.load(
            O_PART + rows[:, :, None] * HEAD_DIM + offs_d[None, None, :],
            mask=live[:, :, None],
            other=0.0,
            cache_modifier=".cg",
        )
        m_new = tl.maximum(m_run, tl.max(mp, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.where(live, tl.math.exp2(mp - m_use[:, None]), 0.0)
        alpha = tl.math.exp2(m_run - m_use)
        l_run = l_run * alpha + tl.sum(w * lp, 1)
        acc = acc * alpha[:, None] + tl.sum(op * w[:, :, None], 1)
        m_run = m_new
    l_run = tl.where(l_run == 0.0, 1.0, l_run)
    tl.store(out_ptrs, (acc / l_run[:, None]).to(O.dtype.element_ty), mask=gmask[:, None])
