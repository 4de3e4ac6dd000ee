"""Plan attention over a paged KV cache (vLLM's layout): many sequences, each with its own N.

Layouts: ``query``/``out`` [T, Hq, D] hold the new tokens of all sequences back to back,
sequence s owning rows ``query_start[s] .. query_start[s+1]-1``; these are the last rows of its
``seq_lens[s]`` positions, whose keys are all in the cache already (written by ``write_kv``
before the call). ``key_cache``/``value_cache`` [num_pages, PAGE, Hkv, D] (any strides, the
last axis contiguous): position j of sequence s lives in page ``block_table[s, j // PAGE]``,
row ``j % PAGE``. ``spans`` [S, Hq]: each sequence's spans at its own N = seq_lens[s]
(``spans_at``). Query head h reads KV head h // (Hq // Hkv), without copies.

So a chunked prefill, a prompt whose first pages came from the prefix cache and a decode step
are the same call: only q_len = query_start[s+1] - query_start[s] differs.
"""

from __future__ import annotations

import math

import torch

from moa_plan.runtime.attention import QUERY_BLOCK, _use_triton, masked_sdpa


def spans_at(alphas: torch.Tensor, betas: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """int32 [L, S, H]: ``moa_plan.semantics.span`` of every (layer, head) rule (alphas, betas
    [L, H], float64) at every length (lengths [S]), vectorised: ``beta * N`` then ``+ alpha``,
    each one IEEE double operation, as the spec requires (computed on the CPU)."""
    n = lengths.detach().to("cpu", torch.float64).view(1, -1, 1)
    raw = torch.floor(alphas.to(torch.float64).unsqueeze(1) + betas.to(torch.float64).unsqueeze(1) * n)
    return torch.minimum(raw.clamp(min=1.0), n).to(torch.int32)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store token t's K/V [T, Hkv, D] at slot ``slot_mapping[t]`` (page slot // PAGE, row slot %
    PAGE); negative slots (padding) are skipped."""
    t = slot_mapping.shape[0]
    slots = slot_mapping.to(torch.long)
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[:t][keep], value[:t][keep]
    else:
        key, value = key[:t], value[:t]
    page = key_cache.shape[1]
    pages, rows = slots // page, slots % page
    key_cache[pages, rows] = key.to(key_cache.dtype)
    value_cache[pages, rows] = value.to(value_cache.dtype)


def torch_paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start: list[int],
    seq_lens: list[int],
    spans: torch.Tensor,
    sink: int,
    scale: float,
    out: torch.Tensor,
    block: int = QUERY_BLOCK,
) -> torch.Tensor:
    """The PyTorch path: per sequence and block of query rows, gather only the sink keys and the
    keys inside the block's widest window from the pages, then ``masked_sdpa``."""
    page = key_cache.shape[1]
    device = query.device
    for s, n in enumerate(seq_lens):
        q0, q1 = query_start[s], query_start[s + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        head_spans = spans[s]
        widest = int(head_spans.max())
        for r0 in range(0, q_len, block):
            r1 = min(q_len, r0 + block)
            p0, p1 = n - q_len + r0, n - q_len + r1  # query positions p0 .. p1-1
            lo = max(0, p0 - widest + 1)
            kpos = torch.arange(lo, p1, device=device)
            if min(sink, lo):
                kpos = torch.cat([torch.arange(min(sink, lo), device=device), kpos])
            pages = block_table[s, kpos // page].to(torch.long)
            k = key_cache[pages, kpos % page].permute(1, 0, 2).unsqueeze(0)  # [1, Hkv, K, D]
            v = value_cache[pages, kpos % page].permute(1, 0, 2).unsqueeze(0)
            q = query[q0 + r0 : q0 + r1].transpose(0, 1).unsqueeze(0)  # [1, Hq, rows, D]
            qpos = torch.arange(p0, p1, device=device)
            o = masked_sdpa(q, k.to(q.dtype), v.to(q.dtype), qpos, kpos, head_spans, sink, scale)
            out[q0 + r0 : q0 + r1] = o[0].transpose(0, 1)
    return out


def paged_attention(
    query: torch.Tensor,  # [T, Hq, D]
    key_cache: torch.Tensor,  # [num_pages, PAGE, Hkv, D]
    value_cache: torch.Tensor,  # as key_cache
    block_table: torch.Tensor,  # [S, pages per sequence]
    query_start: torch.Tensor,  # [S + 1]
    seq_lens: torch.Tensor,  # [S]
    spans: torch.Tensor,  # [S, Hq]
    sink: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
) -> torch.Tensor:
    """Plan attention of every sequence's new tokens (layouts above); returns ``out`` [T, Hq, D].

    The Triton kernel (``triton_paged_kernel.paged_kernel``) on CUDA, the PyTorch path otherwise;
    ``MOA_ATTENTION_BACKEND`` forces one, as for the rest of the runtime."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    out = torch.empty_like(query) if out is None else out
    module = _use_triton("triton_prefill", query.device)
    if module is not None:
        if max_query_len is None:
            max_query_len = int((query_start[1:] - query_start[:-1]).max()) if seq_lens.numel() else 0
        return module.paged_attention(
            query, key_cache, value_cache, block_table, query_start, seq_lens, spans, sink, scale, out, max_query_len
        )
    return torch_paged_attention(
        query, key_cache, value_cache, block_table, query_start.tolist(), seq_lens.tolist(), spans, sink, scale, out
    )
