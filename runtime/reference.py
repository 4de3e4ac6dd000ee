"""Dense reference attention with a plan's mask: the oracle every kernel and path is tested against.

Layout (as torch SDPA and transformers): q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D], with
Hq a multiple of Hkv (query head h reads KV head h // (Hq // Hkv)). The Lq queries are the
last Lq positions of the Lk keys: query row r sits at position Lk - Lq + r. ``spans[h]`` is
head h's span at the current total length N = Lk (``Plan.spans(N)``).
"""

from __future__ import annotations

import math

import torch


def plan_mask(spans: torch.Tensor, sink: int, q_len: int, k_len: int) -> torch.Tensor:
    """Boolean [Hq, q_len, k_len]: query i sees key j iff j <= i and (j < sink or i - j < span)."""
    device = spans.device
    i = torch.arange(k_len - q_len, k_len, device=device).view(1, q_len, 1)
    j = torch.arange(k_len, device=device).view(1, 1, k_len)
    s = spans.to(torch.long).view(-1, 1, 1)
    return (j <= i) & ((j < sink) | (i - j < s))


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, sink: int, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in float32, materialising the plan's mask; returns q's dtype."""
    batch, hq, q_len, d = q.shape
    hkv, k_len = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if spans.shape != (hq,):
        raise ValueError(f"spans must have shape ({hq},), got {tuple(spans.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = hq // hkv
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    mask = plan_mask(spans, sink, q_len, k_len)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vf).to(q.dtype)
