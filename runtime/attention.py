"""Attention dispatch used by the model: Triton kernels on CUDA when present, PyTorch paths otherwise.

Three cases (layouts as ``reference_attention``; spans are the layer's spans at the total length N):
- ``prefill_attention``: no static-cache content; q's Lq rows are the last Lq of the Lk keys.
- ``decode_attention``: one new token, its K/V already written into the static cache.
- ``chunk_attention``: Lq > 1 new tokens after cached ones; computed over (cached positions
  ∪ new keys) BEFORE the chunk is written, because writing may evict keys early rows need.

``MOA_ATTENTION_BACKEND=torch|triton`` forces a backend (default: Triton on CUDA if importable).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import os
from types import ModuleType

import torch
import torch.nn.functional as F

from moa_plan.runtime.cache import LayerLayout, _head_positions, gather_heads, torch_decode_attention

BACKEND_ENV = "MOA_ATTENTION_BACKEND"
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
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "torch", "triton"):
        raise ValueError(f"{BACKEND_ENV}={value!r}: must be 'torch', 'triton' or unset")
    return value


def _use_triton(name: str, device: torch.device) -> ModuleType | None:
    """The kernel module to use for a tensor on ``device``, or None for the PyTorch path."""
    setting = backend_setting()
    if setting == "torch":
        return None
    module = _kernel(name)
    if setting == "triton":
        if module is None:
            raise RuntimeError(f"{BACKEND_ENV}=triton but moa_plan.runtime.{name} (or triton) cannot be imported")
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


def torch_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spans: torch.Tensor,
    sink: int,
    scale: float | None = None,
    block: int = QUERY_BLOCK,
) -> torch.Tensor:
    """The plan's attention without materialising the N x N mask: per block of query rows, only the
    sink keys and the keys inside the widest window of that block are read."""
    batch, hq, q_len, d = q.shape
    k_len = k.shape[2]
    if q_len > k_len:
        raise ValueError(f"more queries ({q_len}) than keys ({k_len})")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    widest = int(spans.max())
    first = k_len - q_len  # position of query row 0
    out = torch.empty_like(q)
    for r0 in range(0, q_len, block):
        r1 = min(q_len, r0 + block)
        p0, p1 = first + r0, first + r1  # query positions p0 .. p1-1
        lo = max(0, p0 - widest + 1)
        n_sink = min(sink, lo)
        kpos = torch.arange(lo, p1, device=q.device)
        ks, vs = k[:, :, lo:p1], v[:, :, lo:p1]
        if n_sink:
            kpos = torch.cat([torch.arange(n_sink, device=q.device), kpos])
            ks = torch.cat([k[:, :, :n_sink], ks], dim=2)
            vs = torch.cat([v[:, :, :n_sink], vs], dim=2)
        qpos = torch.arange(p0, p1, device=q.device)
        out[:, :, r0:r1] = masked_sdpa(q[:, :, r0:r1], ks, vs, qpos, kpos, spans, sink, scale)
    return out


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, sink: int, scale: float | None = None
) -> torch.Tensor:
    """Plan attention of q [B,Hq,Lq,D] over all keys k/v [B,Hkv,Lk,D] (Lq <= Lk), spans at N = Lk."""
    module = _use_triton("triton_prefill", q.device)
    if module is not None:
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
