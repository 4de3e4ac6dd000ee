"""What a new prompt length costs the cuDNN band prefill in graph builds, with static-shape graphs
against dynamic-shape ones built on a kernel cache (device tool, one call).

Why: every band call needs a built cuDNN graph for its exact shapes and window, and a MoA head's
window grows with the length (span = alpha + beta N), so a server meeting a new prompt length
builds a new graph for most calls of every layer (measured before: 0.05 s a graph, 0.1-2.6 s a
layer). That is why the band path is opt-in. A kernel cache lets a graph built for dynamic shapes
take the kernels compiled for an earlier one; if the window is a runtime value of those kernels
too, a new length costs only the graphs' plan set-up. (Measured on cuDNN 9.19, frontends 1.16 and
1.18, H100s: builds 5-10x cheaper, outputs wrong at most lengths but the first; see
evals/results/prefill-cudnn-band/README.md, stop 35. Hence ``DYNAMIC`` is off.)

For each mode, in its own process (so neither inherits the other's caches): a warm-up prefill
(library load), then the first ``--layers`` layers of a 32-layer Llama-3-8B-shaped plan (fitted at
16k) prefilled at each length in turn, timing each layer's first call (graph builds + run) and its
steady time, and checking layer 0 against the Triton kernel. The build cost of a length is the sum
over layers of first call - steady time.

    python3 tools/cudnn_build_probe.py OUT_JSON [--lengths 16384,16000,12288,20000,65536] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SINK = 64
PLANS = [("searched 25%", "searched", 0.25), ("synthetic 50%", "synthetic", 0.5)]


def child(mode: str, lengths: list[int], layers: int) -> dict:
    import torch

    from moa_plan.evals.bench.cases import SHAPES, plan_of_kind
    from moa_plan.evals.bench.kernels import cudnn_band_module
    from moa_plan.evals.bench.timing import bench_time
    from moa_plan.runtime.triton_prefill import prefill_attention as triton_prefill

    band = cudnn_band_module()
    band.DYNAMIC = mode == "dynamic"
    sh = SHAPES["llama3-8b"]
    hq, hkv, d, dev, dt = sh["hq"], sh["hkv"], sh["d"], "cuda", torch.bfloat16

    def qkv(n: int):
        torch.manual_seed(n)
        return [torch.randn(1, h, n, d, device=dev, dtype=dt) for h in (hq, hkv, hkv)]

    q, k, v = qkv(1024)
    t0 = time.perf_counter()
    band.prefill_attention(q, k, v, torch.full((hq,), 1024, dtype=torch.int32, device=dev), SINK)
    torch.cuda.synchronize()
    out: dict = {"mode": mode, "warmup_s": round(time.perf_counter() - t0, 3), "rows": []}
    for name, kind, dens in PLANS:
        plan = plan_of_kind(kind, sh, dens, 16384, SINK)
        for n in lengths:
            q, k, v = qkv(n)
            graphs0, first, steady, calls = len(band._graphs), [], [], 0
            for layer in range(layers):
                spans_l = plan.spans(n)[layer]
                spans = torch.tensor(spans_l, dtype=torch.int32, device=dev)
                calls += len(band.band_calls(spans_l, SINK, n, hq // hkv))

                def run(spans=spans, spans_l=spans_l):
                    return band.prefill_attention(q, k, v, spans, SINK, host_spans=spans_l)

                torch.cuda.synchronize()
                t0 = time.perf_counter()
                got = run()
                torch.cuda.synchronize()
                first.append(time.perf_counter() - t0)
                steady.append(bench_time(run, rep_ms=100) / 1e3)
                if layer == 0:
                    err = float((got.float() - triton_prefill(q, k, v, spans, SINK).float()).abs().max())
            row = {
                "plan": name,
                "n": n,
                "layers": layers,
                "calls": calls,
                "graphs_built": len(band._graphs) - graphs0,
                "first_calls_s": round(sum(first), 3),
                "steady_ms": round(sum(steady) * 1e3, 3),
                "build_s": round(sum(first) - sum(steady), 3),
                "max_abs_diff_layer0": err,
            }
            out["rows"].append(row)
            print(mode, row, flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--lengths", default="16384,16000,12288,20000,65536")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--child", choices=["static", "dynamic"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        p.error(f"--lengths {args.lengths!r}: comma-separated integers expected")
    if args.layers < 1 or min(lengths) < 1:
        p.error("--layers and every length must be >= 1")
    if args.child:
        res = child(args.child, lengths, args.layers)
        with open(args.child_out, "w") as f:
            json.dump(res, f)
        return 0
    import torch

    res = {"device": torch.cuda.get_device_name(0), "modes": {}}
    for mode in ("static", "dynamic"):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            path = tmp.name
        cmd = [sys.executable, os.path.abspath(__file__), args.out, "--lengths", args.lengths]
        cmd += ["--layers", str(args.layers), "--child", mode, "--child-out", path]
        rc = subprocess.run(cmd).returncode
        if rc == 0:
            with open(path) as f:
                res["modes"][mode] = json.load(f)
        else:
            res["modes"][mode] = {"error": f"exit {rc}"}
        os.unlink(path)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print("| mode | plan | n | calls | graphs built | build s | first calls s | steady ms | max diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, r in res["modes"].items():
        for row in r.get("rows", []):
            print(
                f"| {mode} | {row['plan']} | {row['n']} | {row['calls']} | {row['graphs_built']} | {row['build_s']} "
                f"| {row['first_calls_s']} | {row['steady_ms']} | {row['max_abs_diff_layer0']:.4f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
