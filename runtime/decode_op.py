"""MoA decode attention as a torch custom op, ``torch.ops.moa_plan.decode``.

The static (CUDA-graph) decode step calls it: every argument that changes per step is a device
tensor (``n``, ``spans``) and everything that fixes the launch (``sink``, ``scale``, ``max_cap``, so
the split-K count) is a Python number, so one capture serves every step and nothing is read back to
the host. As an opaque custom op with a fake (meta) implementation, torch.compile traces it
without looking inside the Triton launcher. On CUDA it runs the Triton kernel (unless
``MOA_ATTENTION_BACKEND=torch``); elsewhere the PyTorch twin ``cache.torch_decode_attention``.
"""

from __future__ import annotations

import torch

from moa_plan.runtime.attention import _use_triton
from moa_plan.runtime.cache import torch_decode_attention


@torch.library.custom_op("moa_plan::decode", mutates_args=())
def decode(
    q: torch.Tensor,
    kv: list[torch.Tensor],
    layout: list[torch.Tensor],
    spans: torch.Tensor,
    n: torch.Tensor,
    sink: int,
    scale: float,
    max_cap: int,
) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, D] over the per-head cache at total length ``n`` (0-dim int tensor,
    read on the device). ``kv``: (keys, values), each [B, S, D], every KV head's slots in one flat
    buffer; ``layout``: (offset, cap, n_sink) of the KV heads, int32 [Hkv] each; ``spans``: int32
    [Hq], each query head's span at n."""
    module = _use_triton("triton_decode", q.device)
    if module is not None:
        return module.decode_attention(q, *kv, *layout, spans, sink, n, scale, max_cap=max_cap)
    return torch_decode_attention(q, *kv, *layout, spans, sink, n, scale, width=max_cap)


@decode.register_fake
def _(q, kv, layout, spans, n, sink, scale, max_cap):
    return q.new_empty(q.shape)
