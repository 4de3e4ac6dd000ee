"""Attention dispatch used by the model: Triton kernels on CUDA when present, PyTorch paths otherwise.

Three cases (layouts as ``reference_attention``; spans are the layer's spans at the total length N):
- ``prefill_attention``: no static-cache content; q's Lq rows are the last Lq of the Lk keys.
- ``decode_attention``: one new token, its K/V already written into the static cache.
- ``chunk_attention``: Lq > 1 new tokens after cached ones; computed over (cached positions
  ∪ new keys) BEFORE the chunk is written, because writing may evict keys early rows need.

``MOA_ATTENTION_BACKEND=torch|triton`` forces a backend (default: Triton on CUDA if importable).
``MOA_PREFILL_KERNEL=cudnn`` runs fp16/bf16 whole-prompt prefill of >= 16k keys on CUDA through
cuDNN's banded attention (``cudnn_band_prefill``; needs the ``cudnn`` extra) instead of the Triton kernel.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
from types import ModuleType

import torch
import torch.nn.functional as F

from moa_plan.errors import SettingUnavailable
from moa_plan.runtime.cache import LayerLayout, _head_positions, gather_heads, torch_decode_attention
from moa_plan.settings import env_choice

BACKEND_ENV = "MOA_ATTENTION_BACKEND"
PREFILL_KERNEL_ENV = "MOA_PREFILL_KERNEL"
QUERY_BLOCK = 512  # rows per block of the PyTorch prefill path: bounds the mask to Hq*512*(sink+span+512)
_kernels: dict[str, ModuleType | None] = {}


def _kernel(name: str) -> ModuleType | None:
    """moa_plan.runtime.<name>, or None when it (or triton) cannot be imported."""
    if name not in _kernels:
        try:
            _kernels[name] = importlib.import_module(f"moa_plan.runtime.{name}")
        except ImportError:
            _kernels[name] = None
    return _kernels[name]


def backend_setting() -> str:
    """'auto', 'torch' or 'triton' from MOA_ATTENTION_BACKEND."""
    return env_choice(BACKEND_ENV, ("auto", "torch", "triton"))


def prefill_kernel_setting() -> str:
    """'triton' (default) or 'cudnn' from MOA_PREFILL_KERNEL."""
    return env_choice(PREFILL_KERNEL_ENV, ("triton", "cudnn"))


def _cudnn_band(q: torch.Tensor) -> ModuleType | None:
    """cudnn_band_prefill when MOA_PREFILL_KERNEL=cudnn and q can go there (CUDA, fp16/bf16)."""
    if prefill_kernel_setting() != "cudnn" or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    if importlib.util.find_spec("cudnn") is None:
        raise SettingUnavailable(
            PREFILL_KERNEL_ENV, "cudnn", "needs the cudnn-frontend wheel: pip install 'moa-plan[cudnn]'"
        )
    return _kernel("cudnn_band_prefill")


def _use_triton(name: str, device: torch.device) -> ModuleType | None:
    """The kernel module to use for a tensor on ``device``, or None for the PyTorch path."""
    setting = backend_setting()
    if setting == "torch":
        return None
    module = _kernel(name)
    if setting == "triton":
        if module is None:
            raise SettingUnavailable(BACKEND_ENV, "triton", f"moa_plan.runtime.{name} (or triton) cannot be imported")
        return module
    return module if device.type == "cuda" else None


def masked_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qpos: torch.Tensor,
    kpos: torch.Tensor,
    spans: torch.Tensor,
    sink: int,
    scale: float,
) -> torch.Tensor:
    """SDPA of q [B,Hq,Lq,D] over k/v [B,Hkv,K,D]; qpos [Lq], kpos [K] or [Hkv,K] (-1 = no key)."""
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    i = qpos.view(1, -1, 1)
    j = kpos.view(1, 1, -1) if kpos.dim() == 1 else kpos.repeat_interleave(group, dim=0).unsqueeze(1)
    s = spans.to(device=q.device, dtype=torch.long).view(-1, 1, 1)
    mask = (j >= 0) & (j <= i) & ((j < sink) | (i - j < s))  # [Hq, Lq, K]
    if kpos.dim() == 2:  # keys gathered from a cache: zero the slots nobody here reads (SDPA adds -inf to a
        # masked score and multiplies by a zero weight; a NaN left in an unused slot would survive both)
        read = mask.view(hkv, group, -1, mask.shape[-1]).any(dim=2).any(dim=1).view(1, hkv, -1, 1)
        k, v = k.masked_fill(~read, 0.0), v.masked_fill(~read, 0.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)


def span_groups(spans: list[int], sink: int, k_len: int) -> dict[int, list[int]]:
    """Query heads by effective span at ``k_len`` keys: heads that see every earlier key
    (span + sink >= k_len) share the span k_len, so a dense plan is one group."""
    groups: dict[int, list[int]] = {}
    for h, s in enumerate(spans):
        groups.setdefault(k_len if s + sink >= k_len else s, []).append(h)
    return groups


def _head_parts(heads: list[int], group: int) -> list[tuple[list[int], list[int]]]:
    """(query heads, their KV heads) to run together: whole GQA groups in one part (SDPA maps the
    query heads to the KV heads), other heads one part per KV head, so K/V are never copied per
    query head."""
    kv = sorted({h // group for h in heads})
    if heads == [g * group + j for g in kv for j in range(group)]:
        return [(heads, kv)]
    return [([h for h in heads if h // group == g], [g]) for g in kv]


def _is_range(idx: list[int]) -> bool:
    return idx == list(range(idx[0], idx[0] + len(idx)))


def _pick(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """x[:, idx]: a view when idx is a range, else a copy."""
    if _is_range(idx):
        return x[:, idx[0] : idx[0] + len(idx)]
    return torch.stack([x[:, i] for i in idx], dim=1)  # index_select would copy all of a strided x first


BAND_BYTES = 1 << 24  # K (and V) bytes gathered per SDPA call of band blocks: bounds the copies


@functools.lru_cache(maxsize=8)  # a plan repeats few spans; at 8k tokens one mask is up to 8 MiB
def _band_mask(span: int, sink: int, rows: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Additive mask [rows, sink + span - 1 + rows] (0 seen, -inf hidden) of row r at position p0 + r
    over the keys sink ∪ [p0 - span + 1, p0 + rows), for any p0 >= span + sink: the same for every
    band block, so it is built once (and SDPA need not convert a bool mask per call)."""
    r = torch.arange(rows, device=device).view(-1, 1)
    u = torch.arange(sink + span - 1 + rows, device=device).view(1, -1) - sink  # window offset
    seen = (u < 0) | ((u >= r) & (u <= r + span - 1))
    return torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))


def _band(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p0: int, rows: int, span: int, sink: int, scale: float, gqa: bool
) -> torch.Tensor:
    """``rows`` queries q [B,H,rows*nb,D] at positions p0.. (p0 >= span + sink), taken as nb blocks of
    ``rows`` in one SDPA call: block b's keys are the sink + its window, gathered without a loop."""
    batch, h, total, d = q.shape
    hk = k.shape[1]
    nb = total // rows
    win = span - 1 + rows
    lo = p0 - span + 1

    def keys(x: torch.Tensor) -> torch.Tensor:
        w = x[:, :, lo : p0 + total].unfold(2, win, rows).permute(0, 2, 1, 4, 3)  # [B, nb, Hk, win, D] view
        if sink:
            w = torch.cat([x[:, :, :sink].unsqueeze(1).expand(batch, nb, hk, sink, d), w], dim=3)
        return w.reshape(batch * nb, hk, sink + win, d)

    qs = q.view(batch, h, nb, rows, d).transpose(1, 2).reshape(batch * nb, h, rows, d)
    mask = _band_mask(span, sink, rows, q.dtype, str(q.device))
    o = F.scaled_dot_product_attention(qs, keys(k), keys(v), attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o.view(batch, nb, h, rows, d).transpose(1, 2)  # [B, H, nb, rows, D]


def _head_group(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    span: int,
    sink: int,
    scale: float,
    gqa: bool,
    block: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of heads sharing one span. Rows that still see every earlier key (positions <
    span + sink) are plain causal attention; later rows go in blocks of ``block`` over only the sink
    keys and their window (``_band``), so the cost follows the attended pairs, not N^2."""
    batch, h, q_len, d = q.shape
    k_len = k.shape[2]
    first = k_len - q_len  # position of query row 0
    dense_end = min(k_len, span + sink)
    out = torch.empty_like(q) if out is None else out
    if first == 0:  # the dense rows are one causal call
        out[:, :, :dense_end] = F.scaled_dot_product_attention(
            q[:, :, :dense_end], k[:, :, :dense_end], v[:, :, :dense_end], is_causal=True, scale=scale, enable_gqa=gqa
        )
    for p0 in range(first, dense_end if first else 0, block):  # queries after earlier keys: causal mask per block
        p1 = min(dense_end, p0 + block)
        mask = torch.arange(p1, device=q.device).view(1, -1) <= torch.arange(p0, p1, device=q.device).view(-1, 1)
        out[:, :, p0 - first : p1 - first] = F.scaled_dot_product_attention(
            q[:, :, p0 - first : p1 - first], k[:, :, :p1], v[:, :, :p1], attn_mask=mask, scale=scale, enable_gqa=gqa
        )
    p0 = max(first, dense_end)
    rem = (k_len - p0) % block
    if rem:  # the first rem band rows, so that the rest is whole blocks
        out[:, :, p0 - first : p0 - first + rem] = _band(
            q[:, :, p0 - first : p0 - first + rem], k, v, p0, rem, span, sink, scale, gqa
        ).flatten(2, 3)
        p0 += rem
    per_call = max(1, BAND_BYTES // ((sink + span - 1 + block) * k.shape[1] * d * k.element_size()))
    for b0 in range(p0, k_len, per_call * block):
        b1 = min(k_len, b0 + per_call * block)
        dst = out[:, :, b0 - first : b1 - first]
        dst.view(batch, h, -1, block, d).copy_(
            _band(q[:, :, b0 - first : b1 - first], k, v, b0, block, span, sink, scale, gqa)
        )
    return out


def torch_prefill_attention(
    q: torch.Tensor,  # [B, Hq, Lq, D]
    k: torch.Tensor,  # [B, Hkv, Lk, D], Lk >= Lq
    v: torch.Tensor,  # as k
    spans: torch.Tensor,  # [Hq], the layer's spans at N = Lk
    sink: int,
    scale: float | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """The plan's attention on CPU (any device) with work proportional to the pairs it attends:
    heads are grouped by span, each group is one causal SDPA call for the rows that see every
    earlier key plus blocks of ``block`` rows over the sink and their window (``_head_group``).
    A dense plan is exactly ``F.scaled_dot_product_attention(..., is_causal=True)``."""
    batch, hq, q_len, d = q.shape
    k_len = k.shape[2]
    if q_len > k_len:
        raise ValueError(f"more queries ({q_len}) than keys ({k_len})")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    groups = span_groups([int(s) for s in spans.tolist()], sink, k_len)
    if len(groups) == 1 and k_len == q_len and next(iter(groups)) == k_len:  # dense: no work of ours
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=hq > k.shape[1])
    out = q.new_empty(batch, q_len, hq, d).transpose(1, 2)  # [B,Hq,Lq,D] view of the layout transformers wants
    group = hq // k.shape[1]
    for span, heads in groups.items():
        for qh, kvh in _head_parts(heads, group):
            in_place = _is_range(qh)  # then the group writes straight into its heads of ``out``
            o = _head_group(
                _pick(q, qh),
                _pick(k, kvh),
                _pick(v, kvh),
                span,
                sink,
                scale,
                len(qh) > len(kvh),
                block or band_block(span, sink, k_len),
                out[:, qh[0] : qh[0] + len(qh)] if in_place else None,
            )
            if not in_place:
                for i, h in enumerate(qh):  # slices: indexed assignment would copy all of ``out`` twice
                    out[:, h] = o[:, i]
    return out


def band_block(span: int, sink: int, k_len: int) -> int:
    """Query rows per band block of heads with ``span`` at ``k_len`` keys. A block's masked triangles
    cost about block / (span + sink) extra work and small blocks run SDPA's kernel less efficiently:
    about a quarter of the window, 32..256 rows (measured, evals/results/cpu/perf-notes.md),
    preferring a size that divides the band rows so that no second call takes a remainder."""
    target = max(32, min(256, (span + sink) // 4 // 32 * 32))
    rows = k_len - min(k_len, span + sink)
    if rows <= target:
        return max(rows, 1)
    return next((c for c in range(target, target // 2 - 1, -32) if rows % c == 0), target)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spans: torch.Tensor,
    sink: int,
    scale: float | None = None,
    host_spans: list[int] | None = None,
) -> torch.Tensor:
    """Plan attention of q [B,Hq,Lq,D] over all keys k/v [B,Hkv,Lk,D] (Lq <= Lk), spans at N = Lk
    (``host_spans``: the same as a list, which spares the cuDNN band path a wait for the GPU)."""
    module = _use_triton("triton_prefill", q.device)
    if module is not None:
        band = _cudnn_band(q)
        if band is not None:
            return band.prefill_attention(q, k, v, spans, sink, scale, host_spans=host_spans)
        return module.prefill_attention(q, k, v, spans, sink, scale)
    return torch_prefill_attention(q, k, v, spans, sink, scale)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: LayerLayout,
    spans: torch.Tensor,
    sink: int,
    n: int | torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode step q [B,Hq,D] -> [B,Hq,D] over the static cache at total length n."""
    module = _use_triton("triton_decode", q.device)
    if module is None:
        return torch_decode_attention(
            q, k_cache, v_cache, layout.offset, layout.cap, layout.n_sink, spans, sink, n, scale
        )
    extra = {"max_cap": max(layout.caps)} if _takes_max_cap(module.decode_attention) else {}  # no host sync
    return module.decode_attention(
        q, k_cache, v_cache, layout.offset, layout.cap, layout.n_sink, spans, sink, n, scale, **extra
    )


@functools.lru_cache(maxsize=None)
def _takes_max_cap(fn) -> bool:
    return "max_cap" in inspect.signature(fn).parameters


def cached_keys(
    k_cache: torch.Tensor, v_cache: torch.Tensor, layout: LayerLayout, past: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the cache holds at total length ``past``, per KV head: K, V [B,Hkv,W,D] and positions [Hkv,W]."""
    width = max(layout.caps)
    pos = _head_positions(layout.cap, layout.n_sink, past, width)
    return (
        gather_heads(k_cache, layout.offset, layout.cap, width),
        gather_heads(v_cache, layout.offset, layout.cap, width),
        pos,
    )


def chunk_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    past: int,
    spans: torch.Tensor,
    sink: int,
    scale: float | None = None,
    block: int = QUERY_BLOCK,
) -> torch.Tensor:
    """Plan attention of Lq new queries at positions past..past+Lq-1 over the cached keys
    (``cached_keys`` taken before the chunk was written) and the chunk's own keys."""
    k_old, v_old, pos_old = cached
    batch, hq, q_len, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    hkv = k_new.shape[1]
    new_pos = torch.arange(past, past + q_len, device=q.device).view(1, -1).expand(hkv, q_len)
    kpos = torch.cat([pos_old.to(q.device), new_pos], dim=1)
    ks = torch.cat([k_old.to(k_new.dtype), k_new], dim=2)
    vs = torch.cat([v_old.to(v_new.dtype), v_new], dim=2)
    out = torch.empty_like(q)
    for r0 in range(0, q_len, block):
        r1 = min(q_len, r0 + block)
        qpos = torch.arange(past + r0, past + r1, device=q.device)
        out[:, :, r0:r1] = masked_sdpa(q[:, :, r0:r1], ks, vs, qpos, kpos, spans, sink, scale)
    return out
