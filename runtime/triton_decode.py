"""Triton decode attention over MoA's flat, ragged, per-head static KV cache (flash-decoding).

Cache layout (written by `moa_plan.runtime.cache`, described in its docstring): k_cache/v_cache
[B, S, D]; KV head k owns slots [offset[k], offset[k] + cap[k]), the first n_sink[k] hold
positions 0.., the rest are a ring of ring[k] = cap[k] - n_sink[k] slots where position
p >= n_sink[k] lives in slot n_sink[k] + (p - n_sink[k]) % ring[k]. At total length n, query
head h sees position p iff p < sink or (n - 1) - p < spans[h].

What is read: per KV head, the valid sink slots plus the ring slots that hold the positions in
the largest window of its query heads, [max(n_sink, n - W), n). These form one "virtual" run of
L tokens (sink tokens, then window tokens in position order, wrapping around the ring once);
the run is split into equal chunks (split-K) so that batch x KV heads x chunks fills the GPU.
One program reads one chunk of one (batch, KV head) once for all G query heads of the group
(a [G, D] x [D, BLOCK_N] product), so every KV byte is read once per group. With more than one
chunk their partial softmax states are merged either by a second small kernel or, fused, by the
last chunk of each group to finish, in the same launch (``MOA_DECODE_MERGE``: 'kernel', the
default, or 'fused'). The fused merge loads every chunk's partials at once; loaded one chunk per
step it had been 6-7 us slower on an H200. On an H100 at batch 1 (4k / 16k, 50% plans, launches
timed in interleaved rounds) the best launch of each is now within 1.1% of the other's, so the
second launch stays the default: it needs no arrival counters, which concurrent launches must not
share. On Hopper the second launch uses programmatic dependent launch (it starts during the decode
grid and waits on-device for the partials), 1.0-1.2 us less per step in every H100 case measured
(``MOA_DECODE_PDL=0`` turns it off). K/V blocks are read with pointer loads whose slot is
computed per key (default) or, ``MOA_DECODE_LOADS=tma``, as TMA tiles over the (at most three) runs
of consecutive slots of a chunk: on an H100 its best launch was 1.1-1.2 us slower at 4k and within
4% at 16k (faster on one plan, slower on another), so not the default. Kernels:
``triton_decode_kernel``.
"""

from __future__ import annotations

import math

import torch
import triton

from moa_plan.runtime.triton_common import DESCRIPTORS, GATHER, hopper, sm_count, tma_descriptors
from moa_plan.runtime.triton_decode_kernel import _decode_kernel, _reduce_kernel
from moa_plan.runtime.triton_interpreter import check_interpreter, interpreting
from moa_plan.settings import env_choice

_LOG2E = 1.4426950408889634
MERGE_ENV = "MOA_DECODE_MERGE"  # 'kernel' (default: a second launch merges) or 'fused' (the last chunk merges)
LOADS_ENV = "MOA_DECODE_LOADS"  # how K/V blocks are read: 'gather' or 'tma' (decode_attention's loads)
PDL_ENV = "MOA_DECODE_PDL"  # '1': launch the merge with programmatic dependent launch (Hopper and later), '0': not
_counters: dict[str, torch.Tensor] = {}
LOADS = ("gather", "tma")
MERGES = ("fused", "kernel")
DEFAULT_LOADS = "gather"
DEFAULT_PDL = True


def _max_cap(cap: torch.Tensor) -> int:
    """Largest per-head capacity, read to the host once per cap tensor (caps are static)."""
    cached = getattr(cap, "_moa_max_cap", None)
    if cached is None or cached[0] != cap._version:
        cached = (cap._version, int(cap.max().item()) if cap.numel() else 0)
        cap._moa_max_cap = cached
    return cached[1]


def merge_setting() -> str:
    """'kernel' or 'fused' from MOA_DECODE_MERGE (default 'kernel', see above)."""
    return env_choice(MERGE_ENV, MERGES, "kernel")


def loads_setting() -> str:
    """'gather' or 'tma' from MOA_DECODE_LOADS (default DEFAULT_LOADS)."""
    return env_choice(LOADS_ENV, LOADS, DEFAULT_LOADS)


def pdl_setting() -> bool:
    """MOA_DECODE_PDL as a bool (default DEFAULT_PDL)."""
    return env_choice(PDL_ENV, ("0", "1"), str(int(DEFAULT_PDL))) == "1"


def arrival_counters(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 arrival counters of the fused merge, kept per device and grown on demand (the
    kernel leaves them at 0). Warm up once outside a CUDA graph capture so they already exist."""
    key = str(device)
    buf = _counters.get(key)
    if buf is None or buf.numel() < size:
        buf = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
        _counters[key] = buf
    return buf


def fused_merge_block(group: int, splits: int) -> dict[str, int]:
    """The fused merge's tile: the group's heads (GROUP_M, a power of 2) x SPLITS_B chunks per step,
    at most 128 (head, chunk) rows of fp32 partials in flight, so that a batch-1 merge of up to 32
    chunks is one step and larger ones a few."""
    group_m = triton.next_power_of_2(max(1, group))
    return {"GROUP_M": group_m, "SPLITS_B": max(1, min(triton.next_power_of_2(splits), 128 // group_m))}


def plan_splits(batch: int, hkv: int, max_tokens: int, block_n: int, sms: int) -> tuple[int, int]:
    """(number of splits, chunk tokens) along the cache.

    Enough programs for about four waves when batch x KV heads is small, and chunks of at most
    ~2048 tokens even when the batch alone fills the GPU: KV groups of a heterogeneous plan read up
    to 3x different lengths, and shorter chunks even out the work per program. Chunks are >= 2
    blocks. Chosen from interleaved H100 timings of five policies (evals/results/perf-notes.md).
    With only a handful of (row, KV head) pairs (batch-1 decode) one or two waves are faster than
    four: fewer partial states to merge, and each program still streams >= 384 tokens
    (``tools/decode_b1_sweep.py`` on H100s: 4k 11.3 -> 10.2 us with one wave; 16k with chunks of
    384-512 tokens, up to two waves, 21.8-28.7 -> 19.4-23.0 us against one wave of 768-1024).
    """
    blocks = max(1, triton.cdiv(max_tokens, block_n))
    rows = max(1, batch * hkv)
    one_wave = 8 * rows <= sms
    fill = triton.cdiv((1 if one_wave else 4) * sms, rows)
    balance = triton.cdiv(max_tokens, 2048)
    if one_wave:  # up to two waves of chunks of >= 384 tokens (H100, 16k: 32 splits 22.2 us, 16 splits 28.7 us)
        balance = min(2 * fill, triton.cdiv(max_tokens, 384))
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
    merge: str | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    loads: str | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """One decode step of every query head of one layer over the per-head cache: q [B, Hq, D] -> [B, Hq, D].

    `n` is the total length after this token's K/V was written (an int, or a 0-dim integer device
    tensor for CUDA graphs). `max_cap` (default: read once from `cap`) bounds the tokens per head
    when `n` is a tensor; `block_n` / `num_splits` / `num_warps` / `num_stages` override the tuning; `merge` ('fused' or 'kernel',
    default ``merge_setting()``) how split-K chunks are merged. `loads` (default ``loads_setting()``): how K/V blocks are read, 'gather'
    (pointer loads, each key's slot computed on its own) or 'tma' (tensor-descriptor loads of whole
    tiles over the runs of consecutive slots, Hopper and later); `pdl`: launch the merge with
    programmatic dependent launch (Hopper and later; default ``pdl_setting()``), so its launch overlaps
    the decode grid.
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
        block_n = 32 if interpreting() else (64 if d <= 128 else 32)
    if num_splits is None:
        splits, chunk = plan_splits(batch, hkv, bound, block_n, sm_count(q.device, cpu=4))
    else:
        blocks = max(1, triton.cdiv(bound, block_n))
        chunk = triton.cdiv(blocks, max(1, num_splits)) * block_n
        splits = triton.cdiv(max(1, bound), chunk)
    group_p = max(16, triton.next_power_of_2(group))
    out = torch.empty((batch, hq, d), device=q.device, dtype=q.dtype)
    merge = merge or merge_setting()
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {list(MERGES)}, got {merge!r}")
    fused = splits > 1 and merge == "fused"
    counter = arrival_counters(q.device, batch * hkv) if fused else out
    if splits > 1:
        m_part = torch.empty((batch * hq * splits,), device=q.device, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        o_part = torch.empty((batch * hq * splits, d), device=q.device, dtype=torch.float32)
    else:
        m_part = l_part = o_part = out
    loads = loads or loads_setting()
    if loads not in LOADS:
        raise ValueError(f"loads must be one of {sorted(LOADS)}, got {loads!r}")
    on_hopper = q.is_cuda and not interpreting() and hopper(q.device)
    pdl = bool(pdl_setting() if pdl is None else pdl) and on_hopper and splits > 1 and not fused
    # TMA needs Hopper (or the interpreter) and contiguous, 16-byte aligned caches; else pointer loads
    descs = (
        tma_descriptors((k_cache, v_cache), [1, block_n, d])
        if loads == "tma" and (on_hopper or interpreting())
        else None
    )
    warps = num_warps or 4
    stages = 1 if interpreting() else (num_stages or 3)
    both = dict(GROUP_P=group_p, HEAD_DIM=d, N_PTR=n_ptr)  # the constexprs the two launches share
    check_interpreter()
    _decode_kernel[(splits, batch * hkv)](
        q,
        *(descs or (k_cache, v_cache)),
        offset,
        cap,
        n_sink,
        spans,
        out,
        m_part,
        l_part,
        o_part,
        counter,
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
        FUSED=fused,
        LAYOUT=DESCRIPTORS if descs else GATHER,
        PDL=pdl,
        **(fused_merge_block(group, splits) if fused else {}),
        num_warps=warps,
        num_stages=stages,
    )
    if splits > 1 and not fused:
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
            PDL=pdl,
            num_warps=4,
            **({"launch_pdl": True} if pdl else {}),
        )
    return out
