"""Probe: can cuDNN's banded (sliding-window) SDPA carry MoA prefill? (device tool, one call)

Issue 12 item 3 asks prefill within 10% of what the skipped blocks allow, against cuDNN dense.
Our Triton kernel reaches ~0.84x cuDNN's dense efficiency, which is the whole gap. cuDNN (through
the cudnn-frontend wheel) runs a causal band ``i - W < j <= i`` natively; MoA's mask per head is
that band plus the sink columns. This measures, on one Llama-3-8B layer (32 q / 8 KV heads, d 128,
bf16, [B, L, H, D] memory as transformers makes it):

- correctness of a band call through strided views (Q / O of one KV group's heads, K / V of one
  KV head) and of its softmax statistics, against a float32 masked reference;
- time of dense causal (torch SDPA's cuDNN, and the frontend), of one band call over all heads,
  and of the same band split per KV group / per head (sequential and over several streams);
- the graph build time (built once per shape).

    python3 tools/cudnn_band_probe.py OUT_JSON [--lengths 16384,65536]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_graphs: dict = {}


def band_graph(handle, q, k, v, o, window, scale):
    """A closure running the band SDPA on these tensors; graphs are cached by shape / strides / window
    / handle, so views with the same strides (one head or KV group after another) share one build."""
    key = tuple((tuple(t.shape), tuple(t.stride())) for t in (q, k, v, o)) + (window, id(handle), q.dtype)
    if key not in _graphs:
        _graphs[key] = _build(handle, q, k, v, o, window, scale)
    g, (qt, kt, vt, ot, st) = _graphs[key]
    ws = torch.empty(max(1, g.get_workspace_size()), device=q.device, dtype=torch.uint8)
    b, h, L, _ = q.shape
    lse = torch.empty(b, h, L, 1, device=q.device, dtype=torch.float32)

    def run():
        g.execute({qt: q, kt: k, vt: v, ot: o, st: lse}, ws, handle=handle)
        return o, lse

    return run


def _build(handle, q, k, v, o, window, scale):
    import cudnn

    dt = cudnn.data_type.BFLOAT16 if q.dtype == torch.bfloat16 else cudnn.data_type.HALF
    g = cudnn.pygraph(
        io_data_type=dt,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle,
    )
    qt = g.tensor(name="q", dim=list(q.shape), stride=list(q.stride()), data_type=dt)
    kt = g.tensor(name="k", dim=list(k.shape), stride=list(k.stride()), data_type=dt)
    vt = g.tensor(name="v", dim=list(v.shape), stride=list(v.stride()), data_type=dt)
    kw = dict(diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_right_bound=0)
    if window is not None:
        kw["diagonal_band_left_bound"] = window
    ot, st = g.sdpa(name="sdpa", q=qt, k=kt, v=vt, generate_stats=True, attn_scale=scale, **kw)
    ot.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride())).set_data_type(dt)
    st.set_output(True).set_data_type(cudnn.data_type.FLOAT)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g, (qt, kt, vt, ot, st)


def layer(L, hq=32, hkv=8, d=128, dt=torch.bfloat16):
    q = torch.randn(1, L, hq, d, device="cuda", dtype=dt).transpose(1, 2)
    k = torch.randn(1, L, hkv, d, device="cuda", dtype=dt).transpose(1, 2)
    v = torch.randn(1, L, hkv, d, device="cuda", dtype=dt).transpose(1, 2)
    o = torch.empty(1, L, hq, d, device="cuda", dtype=dt).transpose(1, 2)
    return q, k, v, o


def timed(fn, reps=10, streams=None):
    """ms per call of fn (a list of callables run in order; with streams, round-robin over them)."""
    fns = fn if isinstance(fn, list) else [fn]
    main = torch.cuda.current_stream()

    def once():
        if not streams:
            for f in fns:
                f()
            return
        for s in streams:
            s.wait_stream(main)
        for i, f in enumerate(fns):
            with torch.cuda.stream(streams[i % len(streams)]):
                f()
        for s in streams:
            main.wait_stream(s)

    for _ in range(2):
        once()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        once()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / reps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--lengths", default="16384,65536")
    args = p.parse_args()
    import cudnn

    res: dict = {
        "device": torch.cuda.get_device_name(0),
        "cudnn_backend": torch.backends.cudnn.version(),
        "cudnn_frontend": getattr(cudnn, "__version__", "?"),
        "checks": {},
        "cases": {},
    }
    print(json.dumps({k: res[k] for k in ("device", "cudnn_backend", "cudnn_frontend")}), flush=True)
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)

    # correctness through strided views: heads {1, 3} of KV group 2 (head stride 2), window 300
    L, d, W = 2048, 128, 300
    q, k, v, o = layer(L)
    scale = 1 / math.sqrt(d)
    heads = [9, 11]
    qv = q[:, 9:12:2]
    kv_, vv = k[:, 2:3], v[:, 2:3]
    ov = o[:, 9:12:2]
    out, lse = band_graph(handle, qv, kv_, vv, ov, W, scale)()
    torch.cuda.synchronize()
    i = torch.arange(L, device="cuda").view(-1, 1)
    j = torch.arange(L, device="cuda").view(1, -1)
    for name, seen in {"i-j<W": (j <= i) & (i - j < W), "i-j<=W": (j <= i) & (i - j <= W)}.items():
        s = (q[:, heads].float() @ k[:, [2]].float().transpose(-1, -2)) * scale
        s = s.masked_fill(~seen, float("-inf"))
        ref = torch.softmax(s, -1) @ v[:, [2]].float()
        ref_lse = torch.logsumexp(s, -1, keepdim=True)
        res["checks"][name] = {
            "max_abs_o": float((o[:, heads].float() - ref).abs().max()),
            "max_abs_lse": float((lse - ref_lse).abs().max()),
            "max_abs_lse_log2": float((lse - ref_lse / math.log(2)).abs().max()),
        }
    print(json.dumps(res["checks"]), flush=True)

    for L in [int(x) for x in args.lengths.split(",")]:
        q, k, v, o = layer(L)
        case: dict = {}
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            case["torch_sdpa_cudnn_causal_ms"] = timed(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            )
        t0 = time.perf_counter()
        full = band_graph(handle, q, k, v, o, None, scale)
        case["build_s"] = time.perf_counter() - t0
        case["fe_causal_ms"] = timed(full)
        for frac in (2, 4):
            W = L // frac
            attended = (L * (L + 1) / 2 - (L - W) * (L - W + 1) / 2) / (L * (L + 1) / 2)
            c = {"attention_fraction": attended}
            c["all_heads_ms"] = timed(band_graph(handle, q, k, v, o, W, scale))
            per_group = [
                band_graph(
                    handle, q[:, 4 * g : 4 * g + 4], k[:, g : g + 1], v[:, g : g + 1], o[:, 4 * g : 4 * g + 4], W, scale
                )
                for g in range(8)
            ]
            c["per_kv_group_seq_ms"] = timed(per_group)
            per_head = [
                band_graph(
                    handle,
                    q[:, h : h + 1],
                    k[:, h // 4 : h // 4 + 1],
                    v[:, h // 4 : h // 4 + 1],
                    o[:, h : h + 1],
                    W,
                    scale,
                )
                for h in range(32)
            ]
            c["per_head_seq_ms"] = timed(per_head)
            for ns in (4,):
                streams = [torch.cuda.Stream() for _ in range(ns)]
                hs = []
                for s in streams:  # one handle per stream (a handle binds one stream)
                    hd = cudnn.create_handle()
                    cudnn.set_stream(handle=hd, stream=s.cuda_stream)
                    hs.append(hd)
                g_runs = [
                    band_graph(
                        hs[g % ns],
                        q[:, 4 * g : 4 * g + 4],
                        k[:, g : g + 1],
                        v[:, g : g + 1],
                        o[:, 4 * g : 4 * g + 4],
                        W,
                        scale,
                    )
                    for g in range(8)
                ]
                h_runs = [
                    band_graph(
                        hs[h % ns],
                        q[:, h : h + 1],
                        k[:, h // 4 : h // 4 + 1],
                        v[:, h // 4 : h // 4 + 1],
                        o[:, h : h + 1],
                        W,
                        scale,
                    )
                    for h in range(32)
                ]
                c[f"per_kv_group_{ns}streams_ms"] = timed(g_runs, streams=streams)
                c[f"per_head_{ns}streams_ms"] = timed(h_runs, streams=streams)
            c["ideal_ms"] = attended * case["torch_sdpa_cudnn_causal_ms"]
            case[f"window_1/{frac}"] = c
            print(L, frac, json.dumps(c), flush=True)
        res["cases"][str(L)] = case
        print(L, json.dumps({k: v for k, v in case.items() if not isinstance(v, dict)}), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
