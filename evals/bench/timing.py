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
