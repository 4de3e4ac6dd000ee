"""Per-head static KV cache of one layer (its layout below), and its PyTorch decode.

Every KV head k owns ``cap[k]`` slots of one flat [B, S, D] buffer: first ``n_sink[k]`` sink
slots (position p in slot p), then a ring of ``cap[k] - n_sink[k]`` slots holding the most recent
positions. Only the plan decides the sizes (``Plan.kv_slots``), so memory is the plan's, not
the dense cache's. Slot positions are never stored: they follow from the total length n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moa_plan.plan import Plan


@dataclass(frozen=True)
class LayerLayout:
    """Where each KV head of one layer lives in the flat cache buffer (int32 tensors, [Hkv])."""

    offset: torch.Tensor
    cap: torch.Tensor
    n_sink: torch.Tensor
    slots: int  # S = sum(cap)
    caps: tuple[int, ...]  # cap as Python ints (no device sync on the host side)
    sinks: tuple[int, ...]  # n_sink as Python ints
    n_max: int
    sink: int

    @property
    def num_kv_heads(self) -> int:
        return len(self.caps)

    @classmethod
    def from_caps(cls, caps: list[int], sink: int, n_max: int, device: torch.device | str | None = None) -> LayerLayout:
        if any(c < 1 for c in caps):
            raise ValueError(f"every KV head needs at least one slot, got caps {caps}")
        sinks = [min(sink, c) for c in caps]
        offsets = [0]
        for c in caps[:-1]:
            offsets.append(offsets[-1] + c)
        i32 = dict(dtype=torch.int32, device=device)
        return cls(
            offset=torch.tensor(offsets, **i32),
            cap=torch.tensor(caps, **i32),
            n_sink=torch.tensor(sinks, **i32),
            slots=sum(caps),
            caps=tuple(caps),
            sinks=tuple(sinks),
            n_max=n_max,
            sink=sink,
        )

    @classmethod
    def from_plan(cls, plan: Plan, layer: int, n_max: int, device: torch.device | str | None = None) -> LayerLayout:
        """Layout of ``layer`` serving every total length up to ``n_max``."""
        if n_max < 1:
            raise ValueError(f"n_max must be >= 1, got {n_max}")
        return cls.from_caps(plan.kv_slots(n_max)[layer], plan.sink, n_max, device)


def plan_layouts(plan: Plan, n_max: int, device: torch.device | str | None = None) -> list[LayerLayout]:
    """One layout per layer of the plan."""
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    return [LayerLayout.from_caps(caps, plan.sink, n_max, device) for caps in plan.kv_slots(n_max)]


@dataclass(frozen=True)
class MemoryReport:
    """KV-cache bytes of a plan's static cache against a dense cache of the same batch/length/dtype."""

    batch: int
    n_max: int
    dtype: str
    slots: int  # sum over layers and KV heads of cap
    dense_slots: int  # num_layers * num_kv_heads * n_max
    bytes_allocated: int
    bytes_dense: int

    @property
    def ratio(self) -> float:
        return self.bytes_allocated / self.bytes_dense

    def __str__(self) -> str:
        return (
            f"KV cache {self.bytes_allocated / 2**20:.2f} MiB vs dense {self.bytes_dense / 2**20:.2f} MiB "
            f"({100 * self.ratio:.1f}%; batch {self.batch}, n_max {self.n_max}, {self.dtype})"
        )


def memory_report(plan: Plan, n_max: int, batch: int = 1, dtype: torch.dtype = torch.float16) -> MemoryReport:
    """Bytes of K and V buffers for ``plan`` at ``n_max`` (what MoACache allocates) vs dense."""
    shape = plan.model
    per_slot = 2 * batch * shape.head_dim * torch.empty((), dtype=dtype).element_size()  # K and V
    slots = sum(sum(layer) for layer in plan.kv_slots(n_max))
    dense = shape.num_layers * shape.num_key_value_heads * n_max
    return MemoryReport(
        batch=batch,
        n_max=n_max,
        dtype=str(dtype).removeprefix("torch."),
        slots=slots,
        dense_slots=dense,
        bytes_allocated=slots * per_slot,
        bytes_dense=dense * per_slot,
    )


def allocate(
    layout: LayerLayout, batch: int, head_dim: int, dtype: torch.dtype, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed K and V buffers [B, S, D] of one layer."""
    k = torch.zeros(batch, layout.slots, head_dim, dtype=dtype, device=device)
    return k, torch.zeros_like(k)


def _slot_of(offset: torch.Tensor, cap: torch.Tensor, n_sink: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Slot of position ``pos`` ([Hkv, T], long) for each KV head (the ring rule of this module's docstring)."""
    off, cp, ns = (t.to(torch.long).view(-1, 1) for t in (offset, cap, n_sink))
    ring = (cp - ns).clamp_min(1)
    return torch.where(pos < ns, off + pos, off + ns + torch.remainder(pos - ns, ring))


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: LayerLayout,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    start_pos: int,
) -> None:
    """Write K/V of positions start_pos .. start_pos+T-1 ([B, Hkv, T, D]) into the cache, in place.

    Positions must be written in increasing order across calls. Within one call only the
    positions that survive are written: all sink positions and, per head, the last ``ring``
    ones (so T > ring is deterministic and equals writing token by token).
    """
    batch, hkv, t, d = k_new.shape
    if hkv != layout.num_kv_heads:
        raise ValueError(f"k_new has {hkv} KV heads, the layout {layout.num_kv_heads}")
    if v_new.shape != k_new.shape:
        raise ValueError(f"v_new shape {tuple(v_new.shape)} differs from k_new {tuple(k_new.shape)}")
    if k_cache.shape != (batch, layout.slots, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache must be [{batch}, {layout.slots}, {d}], got {tuple(k_cache.shape)}")
    if t == 0:
        return
    end = start_pos + t
    if start_pos < 0 or end > layout.n_max:
        raise ValueError(f"positions {start_pos}..{end - 1} outside the cache's 0..{layout.n_max - 1}")
    device = k_cache.device
    pos = torch.arange(start_pos, end, device=device, dtype=torch.long).view(1, t).expand(hkv, t)
    slots = _slot_of(layout.offset, layout.cap, layout.n_sink, pos)  # [Hkv, T]
    src_k = k_new.to(k_cache.dtype).reshape(batch, hkv * t, d)
    src_v = v_new.to(v_cache.dtype).reshape(batch, hkv * t, d)
    if t == 1:  # decode: every head keeps the new token; no host sync
        k_cache.index_copy_(1, slots.view(-1), src_k)
        v_cache.index_copy_(1, slots.view(-1), src_v)
        return
    ns = torch.tensor(layout.sinks, device=device, dtype=torch.long).view(-1, 1)
    ring = torch.tensor(layout.caps, device=device, dtype=torch.long).view(-1, 1) - ns
    keep = ((pos < ns) | (pos >= end - ring)).view(-1)
    idx = keep.nonzero().view(-1)
    k_cache.index_copy_(1, slots.view(-1)[idx], src_k[:, idx])
    v_cache.index_copy_(1, slots.view(-1)[idx], src_v[:, idx])


def write_token(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: LayerLayout,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pos: torch.Tensor,
) -> None:
    """Write one token's K/V ([B, Hkv, 1, D] or [B, Hkv, D]) at position ``pos`` (a one-element
    integer device tensor), in place and without reading anything back to the host: the write of
    a static decode step (CUDA graphs)."""
    batch, hkv, d = k_new.shape[0], k_new.shape[1], k_new.shape[-1]
    where = pos.reshape(1, 1).to(torch.long).expand(hkv, 1)
    slots = _slot_of(layout.offset, layout.cap, layout.n_sink, where).view(-1)  # [Hkv]
    k_cache.index_copy_(1, slots, k_new.reshape(batch, hkv, d).to(k_cache.dtype))
    v_cache.index_copy_(1, slots, v_new.reshape(batch, hkv, d).to(v_cache.dtype))


def _head_positions(cap: torch.Tensor, n_sink: torch.Tensor, n: int | torch.Tensor, width: int) -> torch.Tensor:
    """Position held by local slot c of each KV head at total length n: [Hkv, width], -1 if none."""
    device = cap.device
    c = torch.arange(width, device=device, dtype=torch.long).view(1, -1)
    cp, ns = cap.to(torch.long).view(-1, 1), n_sink.to(torch.long).view(-1, 1)
    n = torch.as_tensor(n, device=device).to(torch.long)
    ring = (cp - ns).clamp_min(1)
    last = n - 1
    ring_pos = last - torch.remainder(last - ns - (c - ns), ring)
    pos = torch.where(c < ns, c, ring_pos)
    valid = (c < cp) & torch.where(c < ns, c < n, ring_pos >= ns)
    return torch.where(valid, pos, torch.full_like(pos, -1))


def slot_positions(layout: LayerLayout, n: int) -> torch.Tensor:
    """Position stored in each of the S slots at total length ``n`` (LongTensor [S]; -1 = empty)."""
    width = max(layout.caps)
    per_head = _head_positions(layout.cap, layout.n_sink, n, width)  # [Hkv, width]
    valid = torch.arange(width, device=layout.cap.device).view(1, -1) < layout.cap.to(torch.long).view(-1, 1)
    return per_head[valid]  # row-major over heads = slot order (offset = exclusive cumsum)


def gather_heads(cache: torch.Tensor, offset: torch.Tensor, cap: torch.Tensor, width: int) -> torch.Tensor:
    """[B, S, D] flat buffer -> [B, Hkv, width, D] (slot c of head k; padding repeats slot offset[k])."""
    c = torch.arange(width, device=cache.device, dtype=torch.long).view(1, -1)
    cp = cap.to(torch.long).view(-1, 1)
    idx = offset.to(torch.long).view(-1, 1) + torch.where(c < cp, c, torch.zeros_like(c))
    hkv = idx.shape[0]
    return cache[:, idx.view(-1)].view(cache.shape[0], hkv, width, cache.shape[-1])


def torch_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [B, S, D]
    v_cache: torch.Tensor,  # as k_cache
    offset: torch.Tensor,  # [Hkv]: LayerLayout.offset, .cap, .n_sink
    cap: torch.Tensor,
    n_sink: torch.Tensor,
    spans: torch.Tensor,  # [Hq]
    sink: int,
    n: int | torch.Tensor,
    scale: float | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """One decode step over the static cache: q [B, Hq, D] -> [B, Hq, D] (PyTorch twin of the Triton kernel).

    ``n`` is the total length after the new token was written; query head h (KV head h // G)
    sees stored positions p with p < sink or (n - 1) - p < spans[h]. Computed in float32.
    ``width``: the largest cap (read from ``cap`` when not given; given, nothing is read back).
    """
    batch, hq, d = q.shape
    hkv = cap.shape[0]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    width = int(cap.max()) if width is None else width
    pos = _head_positions(cap, n_sink, n, width)  # [Hkv, W]
    kh = gather_heads(k_cache, offset, cap, width).float()  # [B, Hkv, W, D]
    vh = gather_heads(v_cache, offset, cap, width).float()
    qg = q.float().view(batch, hkv, group, d)
    scores = torch.matmul(qg, kh.transpose(-1, -2)) * scale  # [B, Hkv, G, W]
    last = torch.as_tensor(n, device=q.device).to(torch.long) - 1
    p = pos.view(hkv, 1, width)
    s = spans.to(device=q.device, dtype=torch.long).view(hkv, group, 1)
    visible = (p >= 0) & ((p < sink) | (last - p < s))  # [Hkv, G, W]
    scores = scores.masked_fill(~visible, float("-inf"))  # replaces a NaN score too
    # Masked, not multiplied by a zero weight: a slot no head of the group reads (empty, or a stale
    # position) may hold anything, and 0 * NaN would poison the sum.
    vh = vh.masked_fill(~visible.any(dim=1).view(1, hkv, width, 1), 0.0)
    out = torch.matmul(torch.softmax(scores, dim=-1), vh)  # [B, Hkv, G, D]
    return out.view(batch, hq, d).to(q.dtype)
