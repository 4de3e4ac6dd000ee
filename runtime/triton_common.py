"""The @triton.jit pieces shared by the two prefill kernels (contiguous K/V in ``triton_prefill_kernel``,
vLLM's paged cache in ``triton_paged_kernel``): the online-softmax loop over a range of key blocks with
the plan's span/sink mask, and the sink + window key ranges of one block of query rows; the key-layout
constants the decode kernel shares; the device facts the launchers ask (``sm_count``, ``hopper``, ``device_index``) and
TMA descriptors (``tma_descriptors``).

Where keys live is one tuple ``keys`` read by the ``LAYOUT`` it names (a compile-time constant):
POINTERS (0), ``(k_base, v_base, stride_kn, stride_vn, BT, stride_kp, stride_vp, PAGE)``: key position j is
row j of k_base/v_base (strides ``stride_kn``/``stride_vn``; the last four are unused); PAGED (1), the same
tuple, key j lives in page BT[j // PAGE] at row j % PAGE (``stride_kn``/``stride_vn`` are then the page
strides, ``stride_kp``/``stride_vp`` the row strides); DESCRIPTORS (2), ``(desc_k, desc_v, b, kvh)``: tensor
descriptors of K and V [B, Hkv, Lk, D] with blocks [1, 1, BLOCK_N, D], loaded by the TMA unit on Hopper
(fewer registers and address instructions than pointer loads; rows past Lk come back as zeros).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

POINTERS = tl.constexpr(0)
PAGED = tl.constexpr(1)
DESCRIPTORS = tl.constexpr(2)
GATHER = tl.constexpr(3)  # decode only: every key's slot computed on its own (ring arithmetic per token)


@triton.jit
def block_range(
    state,
    q,
    keys,
    view,
    lo_blk,
    hi_blk,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,
    IEEE: tl.constexpr,
    LAYOUT: tl.constexpr,
):
    """Online-softmax update of state = (acc, m_i, l_i) with key blocks [lo_blk, hi_blk), for the query
    rows of view = (absolute row positions, span, sink, k_len): row i sees key j iff j <= i, j < k_len and
    (j < sink or i - j < span).

    MASK: some (row, key) pair of a block may be hidden (past the causal edge, outside the window and
    the sink, or past k_len); unmasked blocks skip the mask and fold the scale into the exponent.
    """
    acc, m_i, l_i = state
    rows, span, sink, k_len = view
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    for blk in range(lo_blk, hi_blk):
        cols = blk * BLOCK_N + offs_n
        if LAYOUT == DESCRIPTORS:
            desc_k, desc_v, b, kvh = keys
            kt = desc_k.load([b, kvh, blk * BLOCK_N, 0]).reshape(BLOCK_N, HEAD_DIM).T
        else:
            k_base, v_base, stride_kn, stride_vn, BT, stride_kp, stride_vp, PAGE = keys
            if LAYOUT == PAGED:
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
        if LAYOUT == DESCRIPTORS:
            vv = desc_v.load([b, kvh, blk * BLOCK_N, 0]).reshape(BLOCK_N, HEAD_DIM)
        elif MASK:
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
def plan_rows(
    q,
    keys,
    rows,
    i_lo,
    i_hi,
    span,
    sink,
    k_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    LAYOUT: tl.constexpr,
):
    """Attention output [BLOCK_M, HEAD_DIM] (fp32) of the query block q at absolute positions ``rows``
    (i_lo, the first; i_hi, the last below k_len), reading only the key blocks inside sink + window;
    a row that sees no key gives 0."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    state = (acc, m_i, l_i)
    view = (rows, span, sink, k_len)

    # Sink part: keys [0, min(sink, i_hi + 1)); blocks ending before min(sink, i_lo + 1) need no mask.
    sink_end = tl.minimum(sink, i_hi + 1)
    sb_end = tl.cdiv(sink_end, BLOCK_N)
    sb_full = tl.minimum(tl.minimum(sink, i_lo + 1), k_len) // BLOCK_N
    sb_full = tl.minimum(sb_full, sb_end)
    state = block_range(state, q, keys, view, 0, sb_full, qk_scale, HEAD_DIM, BLOCK_N, False, IEEE, LAYOUT)
    state = block_range(state, q, keys, view, sb_full, sb_end, qk_scale, HEAD_DIM, BLOCK_N, True, IEEE, LAYOUT)

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
    state = block_range(state, q, keys, view, wb_lo, wf_lo, qk_scale, HEAD_DIM, BLOCK_N, True, IEEE, LAYOUT)
    state = block_range(state, q, keys, view, wf_lo, wf_hi, qk_scale, HEAD_DIM, BLOCK_N, False, IEEE, LAYOUT)
    state = block_range(state, q, keys, view, wf_hi, wb_hi, qk_scale, HEAD_DIM, BLOCK_N, True, IEEE, LAYOUT)

    acc, m_i, l_i = state
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    return acc / l_safe[:, None]


def sm_count(device: torch.device, cpu: int) -> int:
    """Streaming multiprocessors of a CUDA device (read once per device), or `cpu` for a CPU tensor (the
    interpreter), where the launchers want a small or a Hopper-like grid."""
    if device.type != "cuda":
        return cpu
    return _cuda_properties(device_index(device)).multi_processor_count


def hopper(device: torch.device) -> bool:
    """A CUDA device of compute capability >= 9: TMA descriptors and programmatic dependent launch."""
    return device.type == "cuda" and _cuda_properties(device_index(device)).major >= 9


def tma_descriptors(tensors: tuple[torch.Tensor, ...], block: list[int]) -> tuple | None:
    """Host TMA descriptors of contiguous tensors, read in `block`s, or None where TMA cannot read them
    (not contiguous, or a base or row not 16-byte aligned); the caller checks the device (``hopper``)."""
    for t in tensors:
        if not t.is_contiguous() or t.data_ptr() % 16 or (t.shape[-1] * t.element_size()) % 16:
            return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return tuple(TensorDescriptor.from_tensor(t, block) for t in tensors)


def head_strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """The batch, head and row strides of each [B, H, L, D] tensor in turn: the argument list the
    contiguous-K/V kernels take (the last axis is contiguous)."""
    return tuple(s for t in tensors for s in t.stride()[:3])


def device_index(device: torch.device) -> int:
    """The CUDA device's index (the current device for a bare 'cuda')."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int):
    return torch.cuda.get_device_properties(index)
