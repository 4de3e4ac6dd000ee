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

import math

import torch
import triton

from moa_plan.runtime.triton_common import DESCRIPTORS, POINTERS, head_strides, hopper, sm_count, tma_descriptors
from moa_plan.runtime.triton_interpreter import check_interpreter, interpreting
from moa_plan.runtime.triton_paged_kernel import paged_kernel
from moa_plan.runtime.triton_prefill_kernel import prefill_kernel

_LOG2E = 1.4426950408889634


def default_config(
    head_dim: int, dtype: torch.dtype, q_len: int, programs128: int = 1 << 30, sms: int = 132, tma: bool = True
) -> dict[str, int]:
    """Block sizes and warps for Hopper (H100/H200); small blocks for short inputs and the CPU.
    ``tma``: the kernel can load K/V through descriptors (the contiguous one; not the paged one)."""
    if interpreting():
        bm = max(16, min(64, triton.next_power_of_2(q_len)))
        return {"BLOCK_M": bm, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    big = head_dim * (4 if dtype == torch.float32 else 2)
    if big > 256:  # fp32 with D >= 128, or D = 256: keep shared memory in bounds
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if head_dim == 128 and tma:
        # 64 x 64 tiles, 4 warps, K/V through TMA descriptors: on an H200 sweep (tools/prefill_sweep.py,
        # 12 launches x 5 plans at 16k and 64k) the fastest or within 3.2% of it in every case, 1-9%
        # faster than the 128 x 64 x 8-warp pointer launch it replaces. (TMA is used where it can be.)
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "TMA": 1}
    # 128-row query blocks once there are >= ~16 waves of them; below that, 64-row blocks halve
    # the tail of the last wave (H100 sweep: 4k at 50% density 0.226 -> 0.201 ms).
    if q_len <= 64 or programs128 < 16 * sms:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4 if head_dim <= 64 else 8, "num_stages": 3}


def _launch_options(cfg: dict[str, int], head_dim: int, dtype: torch.dtype) -> dict[str, object]:
    """The compile-time options of both kernels: head size, block sizes, fp32 precision, warps, stages."""
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_M": cfg["BLOCK_M"],
        "BLOCK_N": cfg["BLOCK_N"],
        "IEEE": dtype == torch.float32,
        "num_warps": cfg["num_warps"],
        "num_stages": cfg["num_stages"],
    }


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
    N = Lk); returns [B, Hq, Lq, D] in q's dtype. `config` overrides the block sizes (tuning) and
    `TMA` (1: K and V through tensor descriptors on Hopper).
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
    sms = sm_count(q.device, cpu=132)
    cfg = dict(default_config(d, q.dtype, q_len, triton.cdiv(q_len, 128) * batch * hq, sms))
    if config:
        cfg.update(config)
    check_interpreter()
    grid = (triton.cdiv(q_len, cfg["BLOCK_M"]), batch * hq)
    keys = _descriptors(k, v, cfg["BLOCK_N"]) if cfg.get("TMA") else None
    prefill_kernel[grid](
        q,
        *(keys or (k, v)),
        out,
        spans,
        *head_strides(q, k, v, out),
        int(sink),
        q_len,
        k_len,
        scale * _LOG2E,
        hq,
        hq // hkv,
        **_launch_options(cfg, d, q.dtype),
        LAYOUT=DESCRIPTORS if keys else POINTERS,
    )
    return out


def _descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int):
    """TMA descriptors of k and v [B, Hkv, Lk, D] in blocks [1, 1, block_n, D], or None where the
    hardware cannot use them (before Hopper, or a base not 16-byte aligned). Strided k / v (the
    transposed views transformers passes) are copied to [B, Hkv, Lk, D] first: the copy moves the
    K/V bytes once (about 1% of a 16k prefill) and keeps the descriptors on the layout the GPU
    tests check."""
    if k.is_cuda and not hopper(k.device):
        return None
    return tma_descriptors((k.contiguous(), v.contiguous()), [1, 1, block_n, k.shape[-1]])


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
    cfg = dict(default_config(d, query.dtype, max_query_len, tma=False))
    if config:
        cfg.update(config)
    spans = spans.to(device=query.device, dtype=torch.int32).contiguous()
    check_interpreter()
    grid = (triton.cdiv(max_query_len, cfg["BLOCK_M"]), num_seqs * hq)
    paged_kernel[grid](
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
        **_launch_options(cfg, d, query.dtype),
    )
    return out
