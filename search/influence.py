"""Attention influence: exact attention gradients plus the MoA first-order loss change of masking entries.

Convention (ours, documented): ``influence_ij`` is the *estimated loss increase* when key j is
removed from query i's row and the row is renormalised. With G = dL/dA (per head) and
S_i = sum_n A_in G_in, a first-order expansion of the renormalised row gives

    influence_ij = A_ij * (S_i - G_ij) / (1 - A_ij)  = -dS_ij / (1 - A_ij),

where dS_ij = A_ij (G_ij - S_i) is the softmax backward. This is the MoA paper's formula negated, so
larger = more important, as in the reference. Rows where 1 - A_ij < ``EPS_ONE`` use the
denominator ``EPS_ONE`` (only reachable for an off-diagonal key holding nearly all of a row's
mass; the diagonal entry d = 0 is never removed since every span is >= 1, so the reference's
special first row never matters here).

Sign: by default each entry's effect enters as its absolute value (per sample, before any sum),
as in the MoA reference: a rule's cost can then only grow as its window shrinks, and noise of
either sign cannot make hiding keys look free. ``signed=True`` keeps the signed estimate.

Aggregation (exact, element level): a plan hides key j from query i iff j >= sink and
i - j >= span (``moa_plan.semantics.visible``). So the influence of a rule with span s is the
sum over entries with j >= sink and offset d = i - j >= s. We accumulate, per (layer, head),
``diag[d] = sum_{i - j = d, j >= sink} influence_ij`` and a rule's influence is a suffix sum of
``diag``: no block rounding at all, partial blocks are exact; this vector of length N replaces
the [n_blocks, n_blocks] block buffer and is both smaller and exact.

Memory: the forward runs SDPA and saves only q, k, v and the output; the backward recomputes
A one query chunk at a time (all heads of the layer, ``chunk`` rows), so at most
heads x chunk x N scores exist at once, never a full attention matrix of every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

EPS_ONE = 1e-6
ATTN_NAME = "moa_influence"


@dataclass
class InfluenceRecorder:
    """Where the backward pass accumulates diag sums: ``diag[layer]`` is float64 [heads, N]."""

    sink: int
    chunk: int = 256
    signed: bool = False
    diag: dict[int, torch.Tensor] = field(default_factory=dict)
    enabled: bool = True

    def reset(self) -> None:
        self.diag = {}

    def add(self, layer: int, values: torch.Tensor) -> None:
        if layer in self.diag:
            self.diag[layer] += values
        else:
            self.diag[layer] = values.clone()


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def chunked_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    dout: torch.Tensor,
    scale: float,
    chunk: int,
    sink: int | None,
    signed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Exact dq, dk, dv of causal softmax attention, and (if ``sink`` is not None) the diag sums.

    Layout q [B, Hq, L, D], k/v [B, Hkv, L, D] (queries at the last L positions = all positions).
    Returns diag float64 [Hq, L] summed over the batch.
    """
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    kr, vr = _repeat_kv(k, group), _repeat_kv(v, group)
    dq = torch.zeros_like(q)
    dkr = torch.zeros_like(kr)
    dvr = torch.zeros_like(vr)
    delta = (dout * out).sum(-1)  # S_i = sum_n A_in G_in = dO_i . O_i
    diag = torch.zeros(b * hq, n, dtype=torch.float64, device=q.device) if sink is not None else None
    keys = torch.arange(n, device=q.device)
    for q0 in range(0, n, chunk):
        q1 = min(n, q0 + chunk)
        rows = torch.arange(q0, q1, device=q.device)
        qc, doc = q[:, :, q0:q1], dout[:, :, q0:q1]
        kk, vv = kr[:, :, :q1], vr[:, :, :q1]
        causal = keys[:q1].view(1, -1) <= rows.view(-1, 1)  # [c, q1]
        scores = torch.matmul(qc, kk.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~causal, float("-inf"))
        a = torch.softmax(scores, dim=-1)
        g = torch.matmul(doc, vv.transpose(-1, -2))
        ds = a * (g - delta[:, :, q0:q1, None])
        dq[:, :, q0:q1] = torch.matmul(ds, kk) * scale
        dkr[:, :, :q1] += torch.matmul(ds.transpose(-1, -2), qc) * scale
        dvr[:, :, :q1] += torch.matmul(a.transpose(-1, -2), doc)
        if diag is not None:
            infl = -ds / (1.0 - a).clamp_min(EPS_ONE)
            if not signed:
                infl = infl.abs()
            offset = rows.view(-1, 1) - keys[:q1].view(1, -1)  # d = i - j
            keep = causal & (keys[:q1].view(1, -1) >= sink)
            infl = infl.masked_fill(~keep, 0.0)
            idx = offset.clamp_min(0).reshape(-1)
            diag.index_add_(1, idx, infl.reshape(b * hq, -1).to(torch.float64))
    dk = dkr.view(b, hkv, group, n, d).sum(2) if group > 1 else dkr
    dv = dvr.view(b, hkv, group, n, d).sum(2) if group > 1 else dvr
    if diag is not None:
        diag = diag.view(b, hq, n).sum(0)
    return dq, dk, dv, diag


class InfluenceAttention(torch.autograd.Function):
    """Causal attention: SDPA forward, chunked recomputing backward that also records influence."""

    @staticmethod
    def forward(ctx, q, k, v, scale, recorder, layer):  # noqa: D102
        group = q.shape[1] // k.shape[1]
        with torch.no_grad():
            out = F.scaled_dot_product_attention(
                q, _repeat_kv(k, group), _repeat_kv(v, group), is_causal=True, scale=scale
            )
        ctx.save_for_backward(q, k, v, out)
        ctx.scale, ctx.recorder, ctx.layer = scale, recorder, layer
        return out

    @staticmethod
    def backward(ctx, dout):  # noqa: D102
        q, k, v, out = ctx.saved_tensors
        rec: InfluenceRecorder | None = ctx.recorder
        record = rec is not None and rec.enabled
        dq, dk, dv, diag = chunked_backward(
            q,
            k,
            v,
            out,
            dout.contiguous(),
            ctx.scale,
            rec.chunk if rec is not None else 256,
            rec.sink if record else None,
            rec.signed if rec is not None else False,
        )
        if record:
            rec.add(ctx.layer, diag)
        return dq, dk, dv, None, None, None


def influence_attention(
    q, k, v, scale: float | None = None, recorder: InfluenceRecorder | None = None, layer: int = 0
) -> torch.Tensor:
    """Causal attention over q [B,Hq,L,D], k/v [B,Hkv,L,D] with the influence-recording backward."""
    if q.shape[2] != k.shape[2]:
        raise ValueError("influence attention needs a full causal pass (query length == key length)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return InfluenceAttention.apply(q, k, v, scale, recorder, layer)


# ---- transformers integration -------------------------------------------------------------

_ACTIVE: dict[str, InfluenceRecorder | None] = {"recorder": None}


def _hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers attention function: batch of unpadded causal sequences (mask ignored by design).

    The profiler feeds one unpadded sequence per call, for which transformers' mask is the plain
    causal mask this function applies itself.
    """
    layer = int(getattr(module, "layer_idx", 0) or 0)
    out = influence_attention(query, key, value, scaling, _ACTIVE["recorder"], layer)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register the influence attention with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _hf_attention)
    # No mask function is registered: transformers then builds no mask for this name, and the
    # function applies the causal mask itself.
    return ATTN_NAME


def set_recorder(recorder: InfluenceRecorder | None) -> None:
    _ACTIVE["recorder"] = recorder


# ---- from diag sums to rule influence ------------------------------------------------------


def suffix_sums(diag: torch.Tensor) -> torch.Tensor:
    """``out[..., s] = sum_{d >= s} diag[..., d]`` with one extra trailing zero (index N)."""
    n = diag.shape[-1]
    rev = torch.flip(diag, dims=[-1]).cumsum(-1)
    out = torch.flip(rev, dims=[-1])
    return torch.cat([out, torch.zeros(*diag.shape[:-1], 1, dtype=diag.dtype, device=diag.device)], dim=-1)[
        ..., : n + 1
    ]


def rule_influence(diag: torch.Tensor, spans: list[int]) -> torch.Tensor:
    """Influence of each span on each head: ``[..., R]`` = suffix sum of diag at each span."""
    suf = suffix_sums(diag)
    idx = torch.tensor(spans, dtype=torch.long, device=diag.device)
    return suf.index_select(-1, idx)
