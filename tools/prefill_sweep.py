"""Prefill attention (issue 12, item 3): K/V through TMA tensor descriptors against pointer loads,
over a few tile shapes, at 16k and 64k, on the dense plan and the bench's 50% / 25% plans, against
cuDNN SDPA (causal, GQA), the best dense backend on Hopper (device tool, one call). With the
cudnn extra installed, also the cuDNN band path (``cudnn_band_prefill``: band calls over strided
views on several streams + the Triton sink fold, whose time alone is reported too).

Target: ours >= 0.9 x (1 / attention fraction) x cuDNN, i.e. within 10% of what the skipped key
blocks allow. One Llama-3-8B layer (32 q / 8 KV heads, d 128, bf16), batch 1, medians of
``triton.testing.do_bench``; every configuration's output is checked against the default launch.

    python3 tools/prefill_sweep.py OUT_JSON [--lengths 16384,65536] [--quick | --default-only]
        [--streams 4,8]   # the band path with each number of side streams
        [--dynamic 0,1]   # ... with static-shape graphs (0) and dynamic-shape ones on a kernel cache (1)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moa_plan.evals.bench.cases import SHAPES, plan_of_kind
from moa_plan.evals.bench.kernels import cudnn_band_module
from moa_plan.evals.bench.timing import bench_time, kernel_trace
from moa_plan.runtime.triton_prefill import default_config, prefill_attention
from moa_plan.semantics import causal_pairs, visible_pairs

SINK = 64
FOLD_TILES = [(32, 4), (64, 8), (128, 4), (128, 8)]  # the sink fold's other launches (default 64 x 4)
TILES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3)]


band_module = cudnn_band_module()  # None without the optional cudnn extra


def cudnn_band(q, k, v, spans, want, streams: int, dynamic: bool) -> dict:
    """The cuDNN band path on one plan with its calls spread over ``streams`` CUDA streams (graphs
    for dynamic shapes or not): its time, its error against the Triton default, its calls, and the
    sink fold's own time (the fold re-run on the band path's output)."""
    from moa_plan.runtime.triton_sink_fold import fold_sink, head_rows

    band_module.STREAMS, band_module.DYNAMIC = streams, dynamic
    band_module.MIN_LEN = 0  # the band calls themselves, at every length
    spans_l, n, group = [int(s) for s in spans.tolist()], k.shape[2], q.shape[1] // k.shape[1]
    calls = band_module.band_calls(spans_l, SINK, n, group)
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = band_module.prefill_attention(q, k, v, spans, SINK, host_spans=spans_l)  # builds this plan's cuDNN graphs
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        err = float((out.float() - want).abs().max())
        ms = bench_time(lambda: band_module.prefill_attention(q, k, v, spans, SINK, host_spans=spans_l))
    except Exception as exc:  # noqa: BLE001 - a graph cuDNN refuses
        return {"kernel": "cudnn-band", "ms": f"n/a ({type(exc).__name__}: {str(exc)[:160]})"}
    eff = torch.tensor(band_module.effective_spans(spans_l, SINK, n), dtype=torch.int32, device=q.device)
    lse = torch.zeros(q.shape[0], q.shape[1], q.shape[2], device=q.device)
    rows = head_rows(q.shape[1], q.shape[2], q.device)  # built once, as the plan's are
    fold_ms = bench_time(lambda: fold_sink(q, k, v, out, lse, eff, SINK, rows=rows))
    fold_tiles = {}  # the fold's launch alone: rows per program x warps
    for bm, w in FOLD_TILES:
        fold_tiles[f"{bm}x{w}"] = round(
            bench_time(lambda bm=bm, w=w: fold_sink(q, k, v, out, lse, eff, SINK, rows=rows, block_m=bm, num_warps=w)),
            4,
        )
    return {
        "kernel": "cudnn-band",
        "streams": streams,
        "dynamic": dynamic,
        "ms": round(ms, 4),
        "max_abs_diff": err,
        "calls": len(calls),
        "first_call_s": round(first_s, 3),
        "fold_ms": round(fold_ms, 4),
        "fold_ms_by_tile": fold_tiles,
        **where_time_goes(lambda: band_module.prefill_attention(q, k, v, spans, SINK, host_spans=spans_l)),
    }


def where_time_goes(fn, reps: int = 10) -> dict:
    """Host time per call (Python and launches, no synchronisation: if it nears the call's GPU time,
    the GPU waits for the host) and, from the profiler's kernel records of one call (the median of 5,
    ``kernel_trace``), its GPU time by kernel, its span and the GPU's idle time inside it, and when the
    last band kernel ends (the fold runs after that, alone)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    host_ms = (time.perf_counter() - t0) / reps * 1e3
    torch.cuda.synchronize()
    tr = kernel_trace(fn, reps=5)
    if "kernels" not in tr:
        return {"host_ms": round(host_ms, 4), "trace": tr}
    ks = tr["kernels"]
    band = [k["last_end_us"] for name, k in ks.items() if "sink_fold" not in name and "Memset" not in name]
    fold = [k["us"] for name, k in ks.items() if "sink_fold" in name]
    return {
        "host_ms": round(host_ms, 4),
        "gpu_kernel_ms_sum": round(sum(k["us"] for k in ks.values()) / 1e3, 4),
        "top_kernels_ms": {name: round(k["us"] / 1e3, 4) for name, k in list(ks.items())[:6]},
        "trace_span_ms": round(tr["span_us"] / 1e3, 4),
        "trace_idle_ms": round(tr["idle_us"] / 1e3, 4),
        "trace_band_end_ms": round(max(band, default=0.0) / 1e3, 4),
        "trace_fold_ms": round(sum(fold) / 1e3, 4),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--lengths", default="16384,65536")
    p.add_argument(
        "--quick", action="store_true", help="only the default tile and 128 x 64 x 8 warps, pointers and TMA"
    )
    p.add_argument("--default-only", action="store_true", help="only the default launch (and the cuDNN band path)")
    p.add_argument("--streams", default="4", help="stream counts to time the cuDNN band path with (first: the default)")
    p.add_argument(
        "--dynamic", default="", help="0,1: the band path's graphs static / dynamic (default: as the module)"
    )
    args = p.parse_args()
    sh = SHAPES["llama3-8b"]
    hq, hkv, d = sh["hq"], sh["hkv"], sh["d"]
    dt, dev = torch.bfloat16, "cuda"
    res: dict = {"device": torch.cuda.get_device_name(0), "cases": {}}
    dynamic_default = bool(band_module and band_module.DYNAMIC)
    min_len_default = band_module.MIN_LEN if band_module else 0
    plans = [("dense", 1.0, "synthetic"), ("synthetic 50%", 0.5, "synthetic"), ("searched 50%", 0.5, "searched")]
    plans += [("synthetic 25%", 0.25, "synthetic"), ("searched 25%", 0.25, "searched")]
    for n in [int(x) for x in args.lengths.split(",")]:
        torch.manual_seed(n)
        q = torch.randn(1, hq, n, d, device=dev, dtype=dt)
        k = torch.randn(1, hkv, n, d, device=dev, dtype=dt)
        v = torch.randn(1, hkv, n, d, device=dev, dtype=dt)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            cudnn = bench_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        default = default_config(d, dt, n, -(-n // 128) * hq)
        tiles = [(default["BLOCK_M"], default["BLOCK_N"], default["num_warps"], default["num_stages"])]
        tiles += [t for t in (TILES[:1] if args.quick else TILES) if t != tiles[0]]
        for name, dens, kind in plans:
            spans_l = [n] * hq if dens == 1.0 else plan_of_kind(kind, sh, dens, n, SINK).spans(n)[0]
            frac = sum(visible_pairs(s, SINK, n) for s in spans_l) / (hq * causal_pairs(n))
            spans = torch.tensor(spans_l, dtype=torch.int32, device=dev)
            want = prefill_attention(q, k, v, spans, SINK).float()
            target = 0.9 / frac
            rows = []
            launches = [(t, m) for t in tiles for m in (0, 1)]
            if args.default_only:
                launches = [(tiles[0], default.get("TMA", 0))]
            for (bm, bn, w, st), tma in launches:
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "TMA": tma}
                try:
                    err = float((prefill_attention(q, k, v, spans, SINK, config=cfg).float() - want).abs().max())
                    ms = bench_time(lambda c=cfg: prefill_attention(q, k, v, spans, SINK, config=c))
                    rows.append({**cfg, "ms": round(ms, 4), "x_cudnn": round(cudnn / ms, 3), "max_abs_diff": err})
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory, a descriptor refused
                    rows.append({**cfg, "ms": f"n/a ({type(exc).__name__}: {str(exc)[:120]})"})
                print(f"n={n} {name} {rows[-1]}", flush=True)
            stream_counts = [int(x) for x in args.streams.split(",")]
            modes = [bool(int(x)) for x in args.dynamic.split(",")] if args.dynamic else [dynamic_default]
            for dyn, n_streams in [(m, s) for m in modes for s in stream_counts] if band_module else []:
                band = cudnn_band(q, k, v, spans, want, n_streams, dyn)
                rows.append(
                    {**band, "x_cudnn": round(cudnn / band["ms"], 3) if isinstance(band["ms"], float) else None}
                )
                print(f"n={n} {name} {rows[-1]}", flush=True)
            if band_module:
                band_module.STREAMS, band_module.DYNAMIC = stream_counts[0], dynamic_default
                band_module.MIN_LEN = min_len_default
            timed = [r for r in rows if isinstance(r["ms"], float) and r["max_abs_diff"] <= 0.02]
            best = min(timed, key=lambda r: r["ms"]) if timed else None
            res["cases"][f"{n}/{name}"] = {
                "cudnn_ms": round(cudnn, 4),
                "attention_fraction": round(frac, 4),
                "target_x_cudnn": round(target, 3),
                "configs": rows,
                "best": best,
            }
            with open(args.out, "w") as f:  # after every case: a cut-off run keeps what it measured
                json.dump(res, f, indent=1)
            if best:
                print(f"== n={n} {name}: frac {frac:.3f}, target {target:.3f}x cuDNN, best {best}", flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
