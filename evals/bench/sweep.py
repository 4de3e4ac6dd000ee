"""The tuning sweep: alternative kernel block sizes, warps and stages (prefill), block_n and
splits (decode; per-head and per-KV-group plans) on llama3-8b at 50%."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from moa_plan.evals.bench.cases import SHAPES, bench_plan, plan_of_kind
from moa_plan.evals.bench.timing import bench_time, graph_time


def sweep(sink: int, device: Any, over_budget: Callable[[], bool]) -> dict[str, Any]:
    """Alternative block sizes / warps / stages (prefill) and block_n / splits (decode), llama3-8b, 50%."""
    import torch

    from moa_plan.runtime.cache import LayerLayout, allocate
    from moa_plan.runtime.triton_decode import decode_attention
    from moa_plan.runtime.triton_prefill import prefill_attention

    shape = SHAPES["llama3-8b"]
    hq, hkv, d = shape["hq"], shape["hkv"], shape["d"]
    out: dict[str, Any] = {}
    for n in (4096, 16384):
        plan = bench_plan(shape, 0.5, n, sink)
        spans = torch.tensor(plan.spans(n)[0], dtype=torch.int32, device=device)
        q = torch.randn(1, hq, n, d, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, hkv, n, d, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        for bm, bn, w, st in [
            (0, 0, 0, 0),
            (128, 64, 8, 3),
            (128, 128, 8, 3),
            (128, 64, 4, 3),
            (64, 64, 4, 3),
            (128, 64, 8, 4),
            (128, 32, 4, 4),
            (128, 128, 8, 2),
            (64, 128, 4, 3),
            (128, 64, 8, 2),
            (64, 32, 4, 3),
        ]:
            if over_budget():
                break
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st} if bm else None
            name = f"prefill/n{n}/moa0.5/{bm}x{bn}w{w}s{st}" if bm else f"prefill/n{n}/moa0.5/default"
            try:
                ms = bench_time(lambda: prefill_attention(q, k, v, spans, sink, config=cfg), rep_ms=100)
                out[name] = round(ms, 4)
            except Exception as exc:  # noqa: BLE001
                out[name] = f"{type(exc).__name__}"
            print("sweep", name, out[name], flush=True)
        q = k = v = None  # free the memory (a del would leave the lambdas above unbound)
        for kind, batches in (("synthetic", (1, 8, 32)), ("grouped", (1,))):
            kplan = plan_of_kind(kind, shape, 0.5, n, sink)
            kspans = torch.tensor(kplan.spans(n)[0], dtype=torch.int32, device=device)
            layout = LayerLayout.from_caps(kplan.kv_slots(n)[0], sink, n, device=device)
            for batch in batches:
                per = 2 * batch * layout.slots * d * 2
                caches = [
                    allocate(layout, batch, d, torch.bfloat16, device=device)
                    for _ in range(max(1, min(64, math.ceil(256e6 / per))))
                ]
                q = torch.randn(batch, hq, d, device=device, dtype=torch.bfloat16)
                for bn in (32, 64, 128):
                    for splits in (None, 1, 4, 8, 16, 32, 64, 128):
                        if over_budget():
                            break
                        label = "" if kind == "synthetic" else f"-{kind}"
                        name = f"decode/n{n}/b{batch}{label}/bn{bn}/splits{splits}"
                        try:
                            ms = graph_time(
                                [
                                    (
                                        lambda c=c: decode_attention(
                                            q,
                                            *c,
                                            layout.offset,
                                            layout.cap,
                                            layout.n_sink,
                                            kspans,
                                            sink,
                                            n,
                                            block_n=bn,
                                            num_splits=splits,
                                        )
                                    )
                                    for c in caches
                                ]
                            )
                            out[name] = round(ms, 5)
                        except Exception as exc:  # noqa: BLE001
                            out[name] = f"{type(exc).__name__}"
                del caches
    return out
