"""Timing and correctness helpers of the benchmark: CUDA-graph replays, triton do_bench, the bf16 guard,
and the device facts a result depends on."""

from __future__ import annotations

from typing import Any


def capture(fns: list, inner: int):
    """(graph, outputs): fns[0], fns[1], ... (inner calls, cycling) warmed up on a side stream, captured
    in one CUDA graph and replayed once, so the outputs hold the replay's results."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns[:inner]:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [fns[i % len(fns)]() for i in range(inner)]
    g.replay()
    torch.cuda.synchronize()
    return g, outs


def graph_time(fns: list, reps: int = 10, inner: int = 0) -> float:
    """Median ms per call of the functions (rotated; L2 never holds them all), timed as CUDA-graph replays."""
    import torch

    inner = inner or len(fns)
    g, _ = capture(fns, inner)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    del g
    times.sort()
    return times[len(times) // 2]


def summarise_kernels(ks: list[tuple[float, float, str]]) -> tuple[float, float, dict]:
    """(span, busy, by name) of kernel records (start, duration, name), in the records' unit: span =
    first start to last end, busy = the union of the intervals, by name = time, launches, first start
    and last end (from the first start) of each kernel name."""
    ks = sorted(ks)
    t0 = ks[0][0]
    busy, lo, hi = 0.0, t0, t0
    by_name: dict[str, dict[str, float]] = {}
    for ts, dur, name in ks:
        if ts > hi:
            busy += hi - lo
            lo = ts
        hi = max(hi, ts + dur)
        k = by_name.setdefault(name, {"us": 0.0, "count": 0, "first_start_us": ts - t0, "last_end_us": 0.0})
        k["us"] += dur
        k["count"] += 1
        k["last_end_us"] = max(k["last_end_us"], ts + dur - t0)
    busy += hi - lo
    return max(ts + dur for ts, dur, _ in ks) - t0, busy, by_name


def kernel_records(prof) -> list[tuple[float, float, str]]:
    """(start us, duration us, name) of every GPU record of a finished torch.profiler run: its device
    events, or where this torch does not list them on their own, its exported Chrome trace."""
    import json
    import os
    import tempfile

    import torch

    cuda = torch.autograd.DeviceType.CUDA
    ks = [
        (float(e.time_range.start), float(e.time_range.elapsed_us()), e.name)
        for e in prof.events()
        if e.device_type == cuda
    ]
    if ks:
        return ks
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    gpu = ("kernel", "gpu_memset", "gpu_memcpy")
    return [
        (float(e["ts"]), float(e.get("dur", 0.0)), str(e.get("name", "?")))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in gpu
    ]


def kernel_trace(fn, reps: int = 5, calls: int = 1) -> dict[str, Any]:
    """Where a call's GPU time goes, from the profiler's kernel records (each rep profiled on its own,
    the median rep kept): span_us = first kernel start to last kernel end, busy_us = the union of the
    kernel intervals (span - busy = the GPU idle inside the call: launch gaps, waits on the host), and
    per kernel name its time and launches. fn may run `calls` calls back to back (a CUDA-graph replay
    of several): those figures are per call. A kernel's first start and last end (from fn's first
    kernel) are of the whole fn, to see its phases (e.g. a fold after every stream's calls)."""
    import torch

    fn()
    torch.cuda.synchronize()
    summaries = []
    for _ in range(reps):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        ks = [(ts, dur, name[:90]) for ts, dur, name in kernel_records(prof)]
        if ks:
            summaries.append(summarise_kernels(ks))
    if not summaries:
        return {"error": "the profiler recorded no kernels"}
    summaries.sort(key=lambda s: s[0])
    span, busy, by_name = summaries[len(summaries) // 2]
    kernels = {
        name: {
            "us": round(k["us"] / calls, 3),
            "count": k["count"] // calls,
            "first_start_us": round(k["first_start_us"], 3),
            "last_end_us": round(k["last_end_us"], 3),
        }
        for name, k in sorted(by_name.items(), key=lambda kv: -kv[1]["us"])
    }
    return {
        "span_us": round(span / calls, 3),
        "busy_us": round(busy / calls, 3),
        "idle_us": round((span - busy) / calls, 3),
        "kernels": kernels,
    }


def bench_time(fn, rep_ms: int = 200) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))


def copy_bandwidth(device) -> float:
    """Measured device-to-device copy bandwidth, GB/s (read + write of 512 MiB): the ceiling every
    bandwidth figure of the bench is quoted against."""
    import torch

    x = torch.randn(2**28, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = bench_time(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / ms / 1e6


def rel_err(got, want) -> tuple[float, float]:
    d = got.float() - want.float()
    return (d.norm() / want.float().norm()).item(), d.abs().max().item()


REL_TOL, ABS_TOL = 2e-2, 6e-2  # bf16 guard (looser than the unit tests: also covers FlexAttention/SDPA)


def _with_backend(backend, fn):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return fn()


def torch_isfinite(t) -> bool:
    import torch

    return bool(torch.isfinite(t).all())


def device_info() -> dict[str, Any]:
    """The GPU and the versions a result depends on (part of the run's settings)."""
    import platform

    import torch
    import triton

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "sms": torch.cuda.get_device_properties(dev).multi_processor_count,
    }
