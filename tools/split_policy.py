"""Compare decode split policies on the cases where the bench runs disagreed (device tool, one call).

Usage: python3 tools/split_policy.py OUT_JSON. Times each policy 3 times, interleaved, as CUDA-graph
replays over rotated caches (same method as evals/bench/timing.py)."""

from __future__ import annotations

import json
import math
import sys

import torch
import triton

from moa_plan.evals.bench.cases import SHAPES, bench_plan
from moa_plan.evals.bench.timing import graph_time
from moa_plan.runtime.cache import LayerLayout, allocate
from moa_plan.runtime.triton_decode import decode_attention


def old_policy(batch, hkv, tokens, bn, sms):  # first version: ~4 waves, chunks >= 2 blocks
    blocks = triton.cdiv(tokens, bn)
    splits = max(1, min(triton.cdiv(4 * sms, batch * hkv), triton.cdiv(blocks, 2), 128))
    return triton.cdiv(tokens, triton.cdiv(blocks, splits) * bn)


def chunk_policy(max_chunk):
    def f(batch, hkv, tokens, bn, sms):
        blocks = triton.cdiv(tokens, bn)
        s = max(
            1, min(max(triton.cdiv(2 * sms, batch * hkv), triton.cdiv(tokens, max_chunk)), triton.cdiv(blocks, 2), 128)
        )
        return triton.cdiv(tokens, triton.cdiv(blocks, s) * bn)

    return f


POLICIES = {
    "old_4waves": old_policy,
    "chunk1024": chunk_policy(1024),
    "chunk2048": chunk_policy(2048),
    "chunk4096": chunk_policy(4096),
    "fill2_only": chunk_policy(1 << 30),
}
CASES = [
    ("llama3-8b", 16384, 8, 0.5),
    ("llama3-8b", 65536, 1, 0.5),
    ("mha-7b", 65536, 8, 1.0),
    ("llama3-8b", 16384, 32, 0.5),
    ("llama3-8b", 65536, 32, 0.5),
    ("llama3-8b", 16384, 128, 0.5),
    ("llama3-8b", 65536, 8, 0.5),
    ("mha-7b", 16384, 1, 0.5),
]

res = {}
sms = torch.cuda.get_device_properties(0).multi_processor_count
for shape_name, n, batch, dens in CASES:
    sh = SHAPES[shape_name]
    plan = bench_plan(sh, dens, n, 64)
    caps = plan.kv_slots(n)[0]
    spans = torch.tensor(plan.spans(n)[0], dtype=torch.int32, device="cuda")
    lay = LayerLayout.from_caps(caps, 64, n, device="cuda")
    per = 2 * batch * lay.slots * sh["d"] * 2
    caches = [
        allocate(lay, batch, sh["d"], torch.bfloat16, device="cuda")
        for _ in range(max(1, min(64, math.ceil(256e6 / per))))
    ]
    for kc, vc in caches:
        kc.normal_()
        vc.normal_()
    q = torch.randn(batch, sh["hq"], sh["d"], device="cuda", dtype=torch.bfloat16)
    tokens = min(n, max(caps))
    key = f"{shape_name}/n{n}/b{batch}/moa{dens:g}"
    res[key] = {}
    for rep in range(3):
        for name, pol in POLICIES.items():
            s = pol(batch, sh["hkv"], tokens, 64, sms)
            ms = graph_time(
                [
                    (
                        lambda c=c: decode_attention(
                            q, c[0], c[1], lay.offset, lay.cap, lay.n_sink, spans, 64, n, num_splits=s
                        )
                    )
                    for c in caches
                ]
            )
            res[key].setdefault(name, {"splits": s, "ms": []})["ms"].append(round(ms, 5))
    print(key, {k: (v["splits"], min(v["ms"])) for k, v in res[key].items()}, flush=True)
    del caches
    torch.cuda.empty_cache()
with open(sys.argv[1], "w") as f:
    json.dump(res, f, indent=1)
