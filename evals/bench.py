"""`moa-plan bench`: MoA attention kernels and decode throughput against dense SDPA and FlexAttention.

One process, one GPU, one run: device ceilings (copy bandwidth, bf16 matmul), then for each model
shape and plan density the prefill and decode attention kernels (ours with the plan; SDPA dense,
flash backend where it applies; FlexAttention compiled with the same per-head sink + window block
mask), then a whole-model decode step (random weights, CUDA graph) with a dense static cache vs the
MoA cache. Every implementation is checked against the dense reference before it is timed; a wrong
one is reported and not timed. Results are appended to a JSON checkpoint as they come (a rerun with
--resume skips what is there) and rendered as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, int]] = {
    # attention shape + the rest of a Llama-style decoder (for the whole-model decode step)
    "llama3-8b": dict(layers=32, hq=32, hkv=8, d=128, hidden=4096, inter=14336, vocab=128256),
    "mha-7b": dict(layers=32, hq=32, hkv=32, d=128, hidden=4096, inter=11008, vocab=32000),
}


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def register(subparsers: Any) -> None:
    """Add the `bench` subcommand (imports nothing heavy)."""
    p = subparsers.add_parser("bench", help="GPU benchmark of the MoA kernels and decode throughput",
                              description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="llama3-8b,mha-7b", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--densities", default="1.0,0.5,0.25", help="plan densities (fraction of causal pairs)")
    p.add_argument("--prefill-lens", default="4096,16384,65536", help="prefill lengths, comma list")
    p.add_argument("--decode-lens", default="4096,16384,65536", help="cached lengths of the decode cases, comma list")
    p.add_argument("--batches", default="1,8,32,128", help="decode batch sizes")
    p.add_argument("--sink", type=int, default=64, help="sink tokens of the benchmark plans (default 64)")
    p.add_argument("--max-cache-gb", type=float, default=30.0, help="skip decode cases whose dense K+V exceed this")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--flex-shapes", default="llama3-8b", help="shapes FlexAttention runs on (each length compiles)")
    p.add_argument("--flex-batches", default="32", help="decode batches FlexAttention runs at")
    p.add_argument("--e2e", default="llama3-8b", help="shape for the whole-model decode step ('' to skip)")
    p.add_argument("--e2e-context", type=int, default=16384, help="context of the whole-model decode step")
    p.add_argument("--e2e-density", type=float, default=0.5, help="plan density of the whole-model decode step")
    p.add_argument("--sweep", action="store_true", help="also time alternative kernel block sizes")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds; later parts are skipped past it")
    p.add_argument("--out", default="evals/results", help="directory for bench-<gpu>.json/.md")
    p.add_argument("--resume", action="store_true", help="keep finished entries of an existing JSON")
    p.set_defaults(handler=_handler)


def _handler(args: argparse.Namespace) -> int:
    from moa_plan.plan import PlanError

    bad = [s for s in args.shapes.split(",") if s and s not in SHAPES]
    if bad or (args.e2e and args.e2e not in SHAPES):
        raise PlanError([("--shapes", f"unknown shape(s) {bad or [args.e2e]}; known: {sorted(SHAPES)}")])
    try:
        dens = _floats(args.densities)
        lens = (_ints(args.prefill_lens), _ints(args.decode_lens), _ints(args.batches))
    except ValueError as exc:
        raise PlanError([("arguments", f"bad number list: {exc}")]) from None
    if any(not 0 < d <= 1 for d in dens) or any(x < 1 for xs in lens for x in xs):
        raise PlanError([("arguments", "densities must be in (0, 1], lengths and batches >= 1")])
    import torch

    if not torch.cuda.is_available():
        raise PlanError([("device", "moa-plan bench needs a CUDA GPU")])
    Bench(args).run()
    return 0


# ----------------------------------------------------------------------------------------------
# plans


def bench_plan(shape: dict[str, int], density: float, n: int, sink: int, layer_shift: bool = True):
    """A heterogeneous plan (Rule(0, beta_h), spans vary 3x across KV groups, 0.6x within) with
    plan.density(n) as close to `density` as integer spans allow (bisection on a common factor)."""
    from moa_plan.plan import FORMAT_VERSION, Layer, ModelShape, Plan, Rule

    hq, hkv, layers = shape["hq"], shape["hkv"], shape["layers"]
    group = hq // hkv
    a = [0.5 + i / max(1, hkv - 1) for i in range(hkv)]  # 0.5 .. 1.5
    perm = [(i * 5 + 3) % hkv for i in range(hkv)]
    b = [1.0 - 0.4 * j / max(1, group - 1) for j in range(group)]  # 1.0 .. 0.6 within a group
    base = [a[perm[h // group]] * b[h % group] for h in range(hq)]
    model = ModelShape(num_layers=layers, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=shape["d"])

    def make(c: float) -> Plan:
        rows = []
        for layer in range(layers):
            shift = (layer * group) % hq if layer_shift else 0
            rows.append(Layer(heads=[Rule(alpha=0.0, beta=min(1.0, c * base[(h + shift) % hq])) for h in range(hq)]))
        return Plan(format_version=FORMAT_VERSION, model=model, sink=sink, layers=rows,
                    provenance={"method": "bench", "density": density, "n": n})

    if density >= 1.0:
        return make(1.0 / min(base))
    lo, hi = 0.0, 1.0 / min(base)
    for _ in range(40):
        mid = (lo + hi) / 2
        if make(mid).density(n) < density:
            lo = mid
        else:
            hi = mid
    return make(hi)


def decode_tokens_read(spans: list[int], caps: list[int], sink: int, n: int, group: int) -> list[int]:
    """Tokens the decode kernel reads per KV head at length n (valid sink slots + the group's window)."""
    out = []
    for k, cap in enumerate(caps):
        n_sink = min(sink, cap)
        ring = cap - n_sink
        w = max(spans[k * group:(k + 1) * group])
        p_lo = max(n_sink, n - w)
        out.append(min(n_sink, n) + min(max(n - p_lo, 0), ring))
    return out


# ----------------------------------------------------------------------------------------------
# timing helpers


def _graph_time(fns: list, reps: int = 10, inner: int = 0) -> float:
    """Median ms per call of the functions (rotated; L2 never holds them all), timed as CUDA-graph replays."""
    import torch

    inner = inner or len(fns)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns[:inner]:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(inner):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
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


def _bench_time(fn, rep_ms: int = 200) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))


def _rel_err(got, want) -> tuple[float, float]:
    d = got.float() - want.float()
    return (d.norm() / want.float().norm()).item(), d.abs().max().item()


REL_TOL, ABS_TOL = 2e-2, 6e-2  # bf16 guard (looser than the unit tests: also covers FlexAttention/SDPA)


# ----------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.t0 = time.time()
        self.dev = torch.device("cuda")
        name = torch.cuda.get_device_name(self.dev)
        self.gpu = "h200" if "H200" in name else "h100" if "H100" in name else name.split()[-1].lower()
        self.out = Path(args.out)
        self.json_path = self.out / f"bench-{self.gpu}.json"
        self.res: dict[str, Any] = {}
        if args.resume and self.json_path.exists():
            self.res = json.loads(self.json_path.read_text())
        import triton

        self.res.setdefault("meta", {}).update({
            "command": "moa-plan bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"]
            else " ".join(shlex.quote(a) for a in sys.argv),
            "device": name, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "sms": torch.cuda.get_device_properties(self.dev).multi_processor_count,
            "dtype": "bfloat16", "sink": args.sink,
            "density": "plan.density(N), the MoA paper's: mean over heads of min(N, sink + span) / N; "
                       "attention_fraction: computed part of the causal N x N triangle",
        })
        self.res.setdefault("kernels", {})
        self.res.setdefault("skipped", [])
        self.flex = None

    # -- bookkeeping
    def save(self) -> None:
        from moa_plan.io import write_atomic

        self.res["meta"]["elapsed_s"] = round(time.time() - self.t0, 1)
        write_atomic(self.json_path, json.dumps(self.res, indent=1, sort_keys=False))
        write_atomic(self.out / f"bench-{self.gpu}.md", render_markdown(self.res))

    def over_budget(self) -> bool:
        return time.time() - self.t0 > self.args.time_budget

    def skip(self, what: str, why: str) -> None:
        print(f"skip {what}: {why}", flush=True)
        self.res["skipped"].append(f"{what}: {why}")

    def record(self, key: str, entry: dict) -> None:
        self.res["kernels"][key] = entry
        print(key, {k: v for k, v in entry.items() if k != "guard"}, flush=True)
        self.save()

    # -- main
    def run(self) -> None:
        import torch

        torch.manual_seed(0)
        self.ceilings()
        shapes = [s for s in self.args.shapes.split(",") if s]
        parts = []
        for shape in shapes:
            parts += [(f"decode/{shape}", lambda shape=shape: self.decode_kernels(shape)),
                      (f"prefill/{shape}", lambda shape=shape: self.prefill_kernels(shape))]
            if shape == shapes[0] and self.args.e2e:
                parts.append(("e2e", lambda: self.e2e(self.args.e2e)))
        if self.args.sweep:
            parts.append(("sweep", self.sweep))
        for name, part in parts:
            try:
                part()
            except Exception as exc:  # noqa: BLE001 - one broken part must not lose the others' results
                import traceback

                traceback.print_exc()
                self.skip(name, f"failed: {type(exc).__name__}: {str(exc)[:300]}")
                torch.cuda.empty_cache()
        self.save()
        print(render_markdown(self.res), flush=True)

    def ceilings(self) -> None:
        import torch

        if "ceilings" in self.res:
            return
        x = torch.randn(2**28, device=self.dev, dtype=torch.bfloat16)  # 512 MiB
        y = torch.empty_like(x)
        ms = _bench_time(lambda: y.copy_(x))
        copy_gbs = 2 * x.numel() * 2 / ms / 1e6
        a = torch.randn(8192, 8192, device=self.dev, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=self.dev, dtype=torch.bfloat16)
        ms_mm = _bench_time(lambda: a @ b)
        self.res["ceilings"] = {"copy_GBps": round(copy_gbs, 1), "matmul_bf16_TFLOPs": round(2 * 8192**3 / ms_mm / 1e9, 1)}
        print("ceilings", self.res["ceilings"], flush=True)
        x = y = a = b = None  # free the memory (a del would leave the lambdas above unbound)
        torch.cuda.empty_cache()
        self.save()

    # -- FlexAttention
    def _flex(self):
        if self.flex is None and not self.args.no_flex:
            import torch
            from torch.nn.attention.flex_attention import flex_attention

            torch._dynamo.config.cache_size_limit = 64
            if hasattr(torch._dynamo.config, "recompile_limit"):
                torch._dynamo.config.recompile_limit = 64
            self.flex = torch.compile(flex_attention, dynamic=False)
        return self.flex

    def _flex_for(self, shape_name: str, batch: int | None = None):
        if shape_name not in self.args.flex_shapes.split(","):
            return None
        if batch is not None and batch not in _ints(self.args.flex_batches):
            return None
        return self._flex()

    def _flex_block_mask(self, spans, sink: int, q_len: int, k_len: int):
        """BlockMask of the plan's mask, built from exact per-block interval tests (no N x N mask)."""
        import torch
        from torch.nn.attention.flex_attention import BlockMask, create_block_mask

        off = k_len - q_len
        # one spans buffer and one mask_mod object per (heads, offset): a new closure would recompile
        key = (spans.numel(), off, sink)
        self._mask_mods = getattr(self, "_mask_mods", {})
        if key not in self._mask_mods:
            buf = torch.empty(spans.numel(), dtype=torch.int64, device=self.dev)

            def mask_mod(b, h, q_idx, kv_idx):
                i = q_idx + off
                return (kv_idx <= i) & ((kv_idx < sink) | (i - kv_idx < buf[h]))
            self._mask_mods[key] = (buf, mask_mod)
        sp, mask_mod = self._mask_mods[key]
        sp.copy_(spans.to(torch.int64))

        if q_len < 128:
            return create_block_mask(mask_mod, None, sp.numel(), q_len, k_len, device=self.dev)
        bs = 128
        nq, nk = math.ceil(q_len / bs), math.ceil(k_len / bs)
        dev = self.dev
        i0 = off + torch.arange(nq, device=dev).view(1, nq, 1) * bs
        i1 = torch.clamp(i0 + bs, max=k_len) - 1
        j0 = torch.arange(nk, device=dev).view(1, 1, nk) * bs
        j1 = torch.clamp(j0 + bs, max=k_len) - 1
        s = sp.view(-1, 1, 1)
        win_lo = i0 - s + 1
        any_vis = ((j0 < sink) & (j0 <= i1)) | ((j1 >= win_lo) & (j0 <= i1))
        full = (j1 <= i0) & ((j1 < sink) | (i1 - j0 < s)) & (j1 - j0 + 1 == bs)
        full = full & (i1 - i0 + 1 == bs)
        part = any_vis & ~full

        def pack(m):
            num = m.sum(-1).to(torch.int32)
            idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
            return num[None], idx[None]

        pn, pi = pack(part)
        fn, fi = pack(full)
        try:
            return BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(q_len, k_len))
        except TypeError:  # older torch: no seq_lengths
            return BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=bs, mask_mod=mask_mod)

    # -- decode
    def decode_kernels(self, shape_name: str) -> None:
        import torch
        import torch.nn.functional as F

        from moa_plan.runtime.cache import LayerLayout, allocate, write_kv
        from moa_plan.runtime.reference import reference_attention
        from moa_plan.runtime.triton_decode import decode_attention

        shape = SHAPES[shape_name]
        hq, hkv, d, sink = shape["hq"], shape["hkv"], shape["d"], self.args.sink
        group = hq // hkv
        dt = torch.bfloat16
        for n in _ints(self.args.decode_lens):
            plans = {dens: bench_plan(shape, dens, n, sink) for dens in _floats(self.args.densities)}
            for batch in _ints(self.args.batches):
                tag = f"decode/{shape_name}/n{n}/b{batch}"
                dense_bytes = 2 * batch * hkv * n * d * 2
                if dense_bytes > self.args.max_cache_gb * 1e9:
                    self.skip(tag, f"dense K+V {dense_bytes / 1e9:.1f} GB > --max-cache-gb")
                    continue
                if self.over_budget():
                    self.skip(tag, "time budget")
                    continue
                if all(f"{tag}/{k}" in self.res["kernels"] for k in ["sdpa"] + [f"moa{x:g}" for x in plans]):
                    continue
                # correctness inputs: a small batch of full K/V, the same for every implementation
                gb = min(batch, 2)
                kf = torch.randn(gb, hkv, n, d, device=self.dev, dtype=dt)
                vf = torch.randn(gb, hkv, n, d, device=self.dev, dtype=dt)
                qf = torch.randn(gb, hq, d, device=self.dev, dtype=dt)
                # timing inputs: random caches, rotated so that L2 (50 MB) never holds them
                copies = max(1, min(64, math.ceil(256e6 / dense_bytes)))
                kd = [torch.randn(batch, hkv, n, d, device=self.dev, dtype=dt) for _ in range(copies)]
                vd = [torch.randn_like(kd[0]) for _ in range(copies)]
                q = torch.randn(batch, hq, 1, d, device=self.dev, dtype=dt)

                # dense SDPA
                ref_dense = reference_attention(qf[:, :, None], kf, vf, torch.full((hq,), n, dtype=torch.int32,
                                                                                     device=self.dev), 0)[:, :, 0]
                got = F.scaled_dot_product_attention(qf[:, :, None], kf, vf, enable_gqa=True)[:, :, 0]
                ms = self._guarded(tag + "/sdpa", got, ref_dense, lambda: [
                    (lambda i=i: F.scaled_dot_product_attention(q, kd[i], vd[i], enable_gqa=True)) for i in range(copies)])
                sdpa_ms = sdpa_best = ms
                if ms is not None:
                    entry = {"ms": ms, "backend": "default", "GBps": round(dense_bytes / ms / 1e6, 1),
                             "bytes": dense_bytes, "copy_frac": self._bw_frac(dense_bytes, ms)}
                    entry["backends"] = self._sdpa_backends(
                        tag, lambda **kw: F.scaled_dot_product_attention(qf[:, :, None], kf, vf, **kw)[:, :, 0], ref_dense,
                        [(lambda i=i: F.scaled_dot_product_attention(q, kd[i], vd[i], enable_gqa=True)) for i in range(copies)],
                        graph=True)
                    sdpa_best = min([ms] + [v for v in entry["backends"].values() if isinstance(v, float)])
                    entry["best_ms"] = sdpa_best
                    self.record(tag + "/sdpa", entry)
                for dens, plan in plans.items():
                    key = f"{tag}/moa{dens:g}"
                    spans_l = plan.spans(n)[0]
                    caps = plan.kv_slots(n)[0]
                    spans = torch.tensor(spans_l, dtype=torch.int32, device=self.dev)
                    layout = LayerLayout.from_caps(caps, sink, n, device=self.dev)
                    # guard on the small batch
                    kc, vc = allocate(layout, gb, d, dt, device=self.dev)
                    write_kv(kc, vc, layout, kf, vf, 0)
                    want = reference_attention(qf[:, :, None], kf, vf, spans, sink)[:, :, 0]
                    got = decode_attention(qf, kc, vc, layout.offset, layout.cap, layout.n_sink, spans, sink, n)
                    del kc, vc
                    read = decode_tokens_read(spans_l, caps, sink, n, group)
                    bytes_read = 2 * batch * sum(read) * d * 2
                    mcopies = max(1, min(64, math.ceil(256e6 / max(1, 2 * batch * layout.slots * d * 2))))
                    caches = [allocate(layout, batch, d, dt, device=self.dev) for _ in range(mcopies)]
                    for kc, vc in caches:
                        kc.normal_()
                        vc.normal_()
                    q2 = q[:, :, 0]
                    ms = self._guarded(key, got, want, lambda: [
                        (lambda c=c: decode_attention(q2, c[0], c[1], layout.offset, layout.cap, layout.n_sink,
                                                      spans, sink, n)) for c in caches])
                    entry = {"density": plan.density(n), "attention_fraction": plan.attention_fraction(n),
                             "kv_fraction": sum(caps) / (hkv * n),
                             "read_fraction": sum(read) / (hkv * n), "bytes_read": bytes_read}
                    if ms is not None:
                        entry.update(ms=ms, GBps=round(bytes_read / ms / 1e6, 1), copy_frac=self._bw_frac(bytes_read, ms))
                        if sdpa_ms:
                            entry["speedup_vs_sdpa"] = round(sdpa_ms / ms, 3)
                            entry["speedup_vs_sdpa_best"] = round(sdpa_best / ms, 3)
                    # FlexAttention with the same mask over the dense cache
                    flex = self._flex_for(shape_name, batch)
                    if flex is not None and dens < 1.0 and not self.over_budget():
                        try:
                            bm = self._flex_block_mask(spans, sink, 1, n)
                            gotf = flex(q, kd[0], vd[0], block_mask=bm, enable_gqa=True)[:gb, :, 0]
                            wantf = reference_attention(q[:gb], kd[0][:gb], vd[0][:gb], spans, sink)[:, :, 0]
                            fms = self._guarded(key + "/flex", gotf, wantf, lambda: [
                                (lambda i=i: flex(q, kd[i], vd[i], block_mask=bm, enable_gqa=True)) for i in range(copies)])
                            if fms is not None:
                                entry["flex_ms"] = fms
                                if ms:
                                    entry["speedup_vs_flex"] = round(fms / ms, 3)
                        except Exception as exc:  # noqa: BLE001 - a baseline failing is reported, not fatal
                            self.skip(key + "/flex", f"{type(exc).__name__}: {str(exc)[:200]}")
                    self.record(key, entry)
                    caches = None  # free the memory (a del would leave the lambdas above unbound)
                kd = vd = kf = vf = None  # free the memory (a del would leave the lambdas above unbound)
                torch.cuda.empty_cache()

    def _sdpa_backends(self, tag: str, run_small, want, fns, graph: bool) -> dict[str, Any]:
        """Time dense SDPA forced onto each backend (cuDNN, flash, efficient); ms or why not."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        out: dict[str, Any] = {}
        for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
            backend = getattr(SDPBackend, name, None)
            if backend is None:
                continue
            try:
                with sdpa_kernel([backend]):
                    got = run_small(enable_gqa=True)
                    wrapped = [(lambda f=f: _with_backend(backend, f)) for f in fns]
                    ms = self._guarded(f"{tag}/sdpa-{name}", got, want, lambda: wrapped, graph=graph)
                out[name] = ms if ms is not None else "WRONG"
            except Exception as exc:  # noqa: BLE001 - a backend that refuses these inputs
                out[name] = f"n/a ({type(exc).__name__})"
        return out

    def _bw_frac(self, nbytes: float, ms: float) -> float:
        return round(nbytes / ms / 1e6 / self.res["ceilings"]["copy_GBps"], 3)

    def _guarded(self, key: str, got, want, make_fns, graph: bool = True) -> float | None:
        """Compare with the reference; time only if right. Returns ms or None."""
        rel, mx = _rel_err(got, want)
        ok = bool(torch_isfinite(got)) and rel <= REL_TOL and mx <= ABS_TOL
        self.res.setdefault("guard", {})[key] = {"rel": round(rel, 5), "max_abs": round(mx, 5), "ok": ok}
        if not ok:
            print(f"WRONG {key}: rel {rel:.3g} max {mx:.3g} -- not timed", flush=True)
            return None
        fns = make_fns()
        try:
            ms = _graph_time(fns) if graph else _bench_time(fns[0])
        except Exception as exc:  # noqa: BLE001 - e.g. a baseline that cannot be captured in a graph
            print(f"graph capture failed for {key} ({type(exc).__name__}); timing eagerly", flush=True)
            import torch

            torch.cuda.synchronize()
            ms = _bench_time(fns[0])
        return round(ms, 5)

    # -- prefill
    def prefill_kernels(self, shape_name: str) -> None:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from moa_plan.runtime.reference import reference_attention
        from moa_plan.runtime.triton_prefill import prefill_attention
        from moa_plan.semantics import causal_pairs, visible_pairs

        shape = SHAPES[shape_name]
        hq, hkv, d, sink = shape["hq"], shape["hkv"], shape["d"], self.args.sink
        dt = torch.bfloat16
        peak = self.res["ceilings"]["matmul_bf16_TFLOPs"]
        for n in _ints(self.args.prefill_lens):
            tag = f"prefill/{shape_name}/n{n}"
            if self.over_budget():
                self.skip(tag, "time budget")
                continue
            q = torch.randn(1, hq, n, d, device=self.dev, dtype=dt)
            k = torch.randn(1, hkv, n, d, device=self.dev, dtype=dt)
            v = torch.randn(1, hkv, n, d, device=self.dev, dtype=dt)
            rows = sorted({min(n, 256), n // 2 + 128, n})  # guard: query blocks ending at these rows

            def guard(out, spans):
                worst = (0.0, 0.0)
                for r in rows:
                    lo = max(0, r - 128)
                    ref = reference_attention(q[:, :, lo:r], k[:, :, :r], v[:, :, :r], spans, sink)
                    e = _rel_err(out[:, :, lo:r], ref)
                    worst = (max(worst[0], e[0]), max(worst[1], e[1]))
                return worst

            dense_flops = 4 * d * hq * causal_pairs(n)
            full = torch.full((hq,), n, dtype=torch.int32, device=self.dev)
            kx, vx, backend = k, v, "flash"

            def sdpa():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    if kx.shape[1] == hq:
                        return F.scaled_dot_product_attention(q, kx, vx, is_causal=True)
                    return F.scaled_dot_product_attention(q, kx, vx, is_causal=True, enable_gqa=True)
            try:
                out = sdpa()
            except RuntimeError:  # flash backend refuses GQA here: expand K/V once (not timed)
                kx, vx = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
                backend = "flash (K/V expanded to Hq outside the timing)"
                out = sdpa()
            rel, mx = guard(out, full)
            sdpa_ms = None
            sdpa_best = None
            if rel <= REL_TOL and mx <= ABS_TOL:
                sdpa_ms = round(_bench_time(sdpa), 4)
                entry = {"ms": sdpa_ms, "backend": backend, "TFLOPs": round(dense_flops / sdpa_ms / 1e9, 1),
                         "matmul_frac": round(dense_flops / sdpa_ms / 1e9 / peak, 3)}
                del out
                others: dict[str, Any] = {}
                for name in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
                    be = getattr(SDPBackend, name, None)
                    if be is None:
                        continue
                    try:
                        def run(be=be):
                            with sdpa_kernel([be]):
                                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                        o2 = run()
                        r2, m2 = guard(o2, full)
                        del o2
                        others[name] = round(_bench_time(run), 4) if r2 <= REL_TOL and m2 <= ABS_TOL else f"WRONG rel {r2:.3g}"
                    except Exception as exc:  # noqa: BLE001
                        others[name] = f"n/a ({type(exc).__name__})"
                entry["backends"] = others
                sdpa_best = min([sdpa_ms] + [x for x in others.values() if isinstance(x, float)])
                entry["best_ms"] = sdpa_best
                entry["best_TFLOPs"] = round(dense_flops / sdpa_best / 1e9, 1)
                self.record(tag + "/sdpa", entry)
            else:
                del out
                self.skip(tag + "/sdpa", f"WRONG rel {rel:.3g} max {mx:.3g}")
            for dens in _floats(self.args.densities):
                key = f"{tag}/moa{dens:g}"
                plan = bench_plan(shape, dens, n, sink)
                spans_l = plan.spans(n)[0]
                spans = torch.tensor(spans_l, dtype=torch.int32, device=self.dev)
                flops = 4 * d * sum(visible_pairs(s, sink, n) for s in spans_l)
                entry: dict[str, Any] = {"density": plan.density(n), "attention_fraction": plan.attention_fraction(n),
                                         "layer0_attention_fraction": flops / (hq * 4 * d * causal_pairs(n))}
                out = prefill_attention(q, k, v, spans, sink)
                rel, mx = guard(out, spans)
                self.res.setdefault("guard", {})[key] = {"rel": round(rel, 5), "max_abs": round(mx, 5)}
                if rel <= REL_TOL and mx <= ABS_TOL:
                    ms = round(_bench_time(lambda: prefill_attention(q, k, v, spans, sink)), 4)
                    entry.update(ms=ms, TFLOPs=round(flops / ms / 1e9, 1), matmul_frac=round(flops / ms / 1e9 / peak, 3))
                    if sdpa_ms:
                        entry["speedup_vs_sdpa"] = round(sdpa_ms / ms, 3)
                        entry["speedup_vs_sdpa_best"] = round(sdpa_best / ms, 3)
                else:
                    entry["wrong"] = f"rel {rel:.3g} max {mx:.3g}"
                del out
                flex = self._flex_for(shape_name)
                if flex is not None and dens < 1.0 and not self.over_budget():
                    try:
                        bm = self._flex_block_mask(spans, sink, n, n)
                        fout = flex(q, k, v, block_mask=bm, enable_gqa=True)
                        rel, mx = guard(fout, spans)
                        del fout
                        if rel <= REL_TOL and mx <= ABS_TOL:
                            fms = round(_bench_time(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True)), 4)
                            entry["flex_ms"] = fms
                            if "ms" in entry:
                                entry["speedup_vs_flex"] = round(fms / entry["ms"], 3)
                        else:
                            entry["flex_wrong"] = f"rel {rel:.3g} max {mx:.3g}"
                    except Exception as exc:  # noqa: BLE001
                        self.skip(key + "/flex", f"{type(exc).__name__}: {str(exc)[:200]}")
                self.record(key, entry)
            q = k = v = kx = vx = None  # free the memory (a del would leave the lambdas above unbound)
            torch.cuda.empty_cache()

    # -- whole-model decode step
    def e2e(self, shape_name: str) -> None:
        import torch

        if "e2e" in self.res and self.args.resume:
            return
        if self.over_budget():
            self.skip("e2e", "time budget")
            return
        shape = SHAPES[shape_name]
        ctx = self.args.e2e_context
        plan = bench_plan(shape, self.args.e2e_density, ctx, self.args.sink)
        model = RandomDecoder(shape, self.dev)
        res: dict[str, Any] = {"shape": shape_name, "context": ctx, "density": plan.density(ctx),
                               "weights_GB": round(model.weight_bytes / 1e9, 2),
                               "note": "random-weight Llama-style decoder written in evals/bench.py (RMSNorm, "
                                       "fused QKV, SwiGLU MLP, LM head, greedy argmax; no RoPE), one CUDA graph "
                                       "per step; dense = SDPA over a static [B, Hkv, ctx, D] cache, MoA = "
                                       "runtime.cache write + Triton decode over the plan's per-head cache"}
        for variant in ("dense", "moa"):
            try:
                res[variant] = model.throughput(variant, plan, ctx)
            except Exception as exc:  # noqa: BLE001
                res[variant] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print("e2e", variant, res[variant], flush=True)
            torch.cuda.empty_cache()
        if "tok_s" in res.get("dense", {}) and "tok_s" in res.get("moa", {}):
            res["speedup"] = round(res["moa"]["tok_s"] / res["dense"]["tok_s"], 3)
        from moa_plan.runtime.cache import memory_report

        rep = memory_report(plan, ctx, batch=1, dtype=torch.bfloat16)
        res["kv_bytes_per_seq"] = {"moa": rep.bytes_allocated, "dense": rep.bytes_dense, "ratio": round(rep.ratio, 4),
                                   "plan_slots": rep.slots}
        self.res["e2e"] = res
        del model
        torch.cuda.empty_cache()
        self.save()

    # -- tuning sweep
    def sweep(self) -> None:
        """Alternative block sizes / warps / stages (prefill) and block_n / splits (decode), llama3-8b, 50%."""
        import torch

        from moa_plan.runtime.cache import LayerLayout, allocate
        from moa_plan.runtime.triton_decode import decode_attention
        from moa_plan.runtime.triton_prefill import prefill_attention

        shape = SHAPES["llama3-8b"]
        hq, hkv, d, sink = shape["hq"], shape["hkv"], shape["d"], self.args.sink
        out: dict[str, Any] = self.res.setdefault("sweep", {})
        for n in (4096, 16384):
            plan = bench_plan(shape, 0.5, n, sink)
            spans = torch.tensor(plan.spans(n)[0], dtype=torch.int32, device=self.dev)
            q = torch.randn(1, hq, n, d, device=self.dev, dtype=torch.bfloat16)
            k = torch.randn(1, hkv, n, d, device=self.dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            for bm, bn, w, st in [(0, 0, 0, 0), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                                  (128, 64, 8, 4), (128, 32, 4, 4), (128, 128, 8, 2), (64, 128, 4, 3),
                                  (128, 64, 8, 2), (64, 32, 4, 3)]:
                if self.over_budget():
                    break
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st} if bm else None
                name = f"prefill/n{n}/moa0.5/{bm}x{bn}w{w}s{st}" if bm else f"prefill/n{n}/moa0.5/default"
                try:
                    ms = _bench_time(lambda: prefill_attention(q, k, v, spans, sink, config=cfg), rep_ms=100)
                    out[name] = round(ms, 4)
                except Exception as exc:  # noqa: BLE001
                    out[name] = f"{type(exc).__name__}"
                print("sweep", name, out[name], flush=True)
            q = k = v = None  # free the memory (a del would leave the lambdas above unbound)
            caps = plan.kv_slots(n)[0]
            layout = LayerLayout.from_caps(caps, sink, n, device=self.dev)
            for batch in (1, 8, 32):
                per = 2 * batch * layout.slots * d * 2
                caches = [allocate(layout, batch, d, torch.bfloat16, device=self.dev)
                          for _ in range(max(1, min(64, math.ceil(256e6 / per))))]
                q = torch.randn(batch, hq, d, device=self.dev, dtype=torch.bfloat16)
                for bn in (32, 64, 128):
                    for splits in (None, 1, 2, 4, 8, 16, 32, 64):
                        if self.over_budget():
                            break
                        name = f"decode/n{n}/b{batch}/bn{bn}/splits{splits}"
                        try:
                            ms = _graph_time([(lambda c=c: decode_attention(q, c[0], c[1], layout.offset, layout.cap,
                                                                              layout.n_sink, spans, sink, n, block_n=bn,
                                                                              num_splits=splits)) for c in caches])
                            out[name] = round(ms, 5)
                        except Exception as exc:  # noqa: BLE001
                            out[name] = f"{type(exc).__name__}"
                del caches
        self.save()


def _with_backend(backend, fn):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return fn()


def torch_isfinite(t) -> bool:
    import torch

    return bool(torch.isfinite(t).all())


class RandomDecoder:
    """A Llama-shaped decoder with random bf16 weights, for decode-step throughput only."""

    def __init__(self, shape: dict[str, int], device):
        import torch

        self.s = shape
        self.dev = device
        h, d, hq, hkv, inter = shape["hidden"], shape["d"], shape["hq"], shape["hkv"], shape["inter"]
        bf = dict(device=device, dtype=torch.bfloat16)
        sd = 0.02
        self.embed = torch.randn(shape["vocab"], h, **bf) * sd
        self.head = torch.randn(h, shape["vocab"], **bf) * sd
        self.layers = []
        for _ in range(shape["layers"]):
            self.layers.append(dict(
                wqkv=torch.randn(h, (hq + 2 * hkv) * d, **bf) * sd, wo=torch.randn(hq * d, h, **bf) * sd,
                wgu=torch.randn(h, 2 * inter, **bf) * sd, wd=torch.randn(inter, h, **bf) * sd,
                n1=torch.ones(h, **bf), n2=torch.ones(h, **bf)))
        self.norm = torch.ones(h, **bf)
        self.weight_bytes = sum(t.numel() * 2 for t in [self.embed, self.head, self.norm]) + sum(
            t.numel() * 2 for layer in self.layers for t in layer.values())

    @staticmethod
    def _rms(x, w):
        import torch

        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w

    def _step(self, tokens, attend):
        import torch

        s = self.s
        hq, hkv, d = s["hq"], s["hkv"], s["d"]
        x = self.embed[tokens]  # [B, h]
        bsz = x.shape[0]
        for li, layer in enumerate(self.layers):
            qkv = self._rms(x, layer["n1"]) @ layer["wqkv"]
            q = qkv[:, :hq * d].view(bsz, hq, d)
            k = qkv[:, hq * d:(hq + hkv) * d].view(bsz, hkv, d)
            v = qkv[:, (hq + hkv) * d:].view(bsz, hkv, d)
            a = attend(li, q, k, v)  # [B, hq, d]
            x = x + a.reshape(bsz, hq * d) @ layer["wo"]
            gu = self._rms(x, layer["n2"]) @ layer["wgu"]
            g, u = gu.chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(g) * u) @ layer["wd"]
        logits = self._rms(x, self.norm) @ self.head
        tokens.copy_(logits.argmax(-1))

    def throughput(self, variant: str, plan, ctx: int, steps: int = 20) -> dict[str, Any]:
        """tokens/s of greedy decode steps at context `ctx`, largest batch that fits (halving on OOM)."""
        import torch

        s = self.s
        free, _ = torch.cuda.mem_get_info()
        if variant == "dense":
            per_seq = 2 * s["layers"] * s["hkv"] * ctx * s["d"] * 2
        else:
            per_seq = 2 * sum(sum(c) for c in plan.kv_slots(ctx)) * s["d"] * 2
        act_per_seq = 6 * s["vocab"] + 8 * s["inter"] + 4 * s["hq"] * s["d"] * 64  # logits, MLP, split partials
        batch = min(512, int(max(1, (free - 6e9) // (per_seq + act_per_seq))))
        while batch >= 1:
            try:
                return self._throughput_at(variant, plan, ctx, batch, steps)
            except torch.cuda.OutOfMemoryError:
                batch = batch * 3 // 4 if batch > 4 else batch - 1
                torch.cuda.empty_cache()
        raise RuntimeError("batch 1 does not fit")

    def _throughput_at(self, variant: str, plan, ctx: int, batch: int, steps: int) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        from moa_plan.runtime.cache import _slot_of, allocate, plan_layouts
        from moa_plan.runtime.triton_decode import decode_attention

        s = self.s
        hkv, d, layers = s["hkv"], s["d"], s["layers"]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        tokens = torch.randint(0, s["vocab"], (batch,), device=self.dev)
        pos = torch.tensor(ctx - 1, device=self.dev)
        if variant == "dense":
            kc = [torch.randn(batch, hkv, ctx, d, device=self.dev, dtype=torch.bfloat16) for _ in range(layers)]
            vc = [torch.randn_like(t) for t in kc]

            def attend(li, q, k, v):
                kc[li].index_copy_(2, pos.view(1), k[:, :, None])
                vc[li].index_copy_(2, pos.view(1), v[:, :, None])
                return F.scaled_dot_product_attention(q[:, :, None], kc[li], vc[li], enable_gqa=True)[:, :, 0]
            kv_bytes = sum(t.numel() * 2 for t in kc + vc)
        else:
            lays = plan_layouts(plan, ctx, device=self.dev)
            caches = [allocate(lay, batch, d, torch.bfloat16, device=self.dev) for lay in lays]
            for kk, vv in caches:
                kk.normal_()
                vv.normal_()
            spans = [torch.tensor(sp, dtype=torch.int32, device=self.dev) for sp in plan.spans(ctx)]
            slots = [_slot_of(lay.offset, lay.cap, lay.n_sink, pos.view(1, 1).expand(hkv, 1)).view(-1) for lay in lays]
            n_dev = (pos + 1).to(torch.int32)

            def attend(li, q, k, v):
                kk, vv = caches[li]
                kk.index_copy_(1, slots[li], k)
                vv.index_copy_(1, slots[li], v)
                lay = lays[li]
                return decode_attention(q, kk, vv, lay.offset, lay.cap, lay.n_sink, spans[li], plan.sink, n_dev,
                                        max_cap=max(lay.caps))
            kv_bytes = sum(t.numel() * 2 for c in caches for t in c)
            plan_bytes = 2 * sum(sum(c) for c in plan.kv_slots(ctx)) * d * 2 * batch
            if kv_bytes != plan_bytes:
                raise RuntimeError(f"MoA cache holds {kv_bytes} bytes, the plan's slots {plan_bytes}")
        ms = _graph_time([lambda: self._step(tokens, attend)], reps=steps, inner=1)
        if not bool((tokens >= 0).all() and (tokens < s["vocab"]).all()):
            raise RuntimeError("decode produced invalid tokens")
        peak = torch.cuda.max_memory_allocated()
        return {"batch": batch, "ms_per_step": round(ms, 3), "tok_s": round(batch * 1000 / ms, 1),
                "kv_cache_GB": round(kv_bytes / 1e9, 3), "kv_cache_bytes": kv_bytes, "peak_GB": round(peak / 1e9, 2),
                "peak_bytes_per_context_token": round((peak - base) / (batch * ctx), 1)}


# ----------------------------------------------------------------------------------------------


def render_markdown(res: dict) -> str:
    """The results as markdown tables (device, versions, command first)."""
    m = res.get("meta", {})
    c = res.get("ceilings", {})
    lines = [f"# MoA kernel benchmark on {m.get('device', '?')}", "",
             f"- command: `{m.get('command', '?')}`",
             f"- torch {m.get('torch')}, triton {m.get('triton')}, CUDA {m.get('cuda')}, {m.get('sms')} SMs; bf16; sink {m.get('sink')}",
             f"- density = {m.get('density')}",
             f"- measured ceilings: copy {c.get('copy_GBps')} GB/s (read + write), bf16 matmul {c.get('matmul_bf16_TFLOPs')} TFLOP/s",
             "- times: medians; decode as CUDA-graph replays over rotated inputs (L2 never holds them), prefill by triton do_bench",
             ""]
    k = res.get("kernels", {})
    dec = sorted({key.rsplit("/", 1)[0] for key in k if key.startswith("decode/")},
                 key=lambda t: (t.split("/")[1], int(t.split("/")[2][1:]), int(t.split("/")[3][1:])))
    if dec:
        lines += ["## Decode attention, one layer, per step", "",
                  "| shape | cache n | batch | SDPA dense ms (default / best backend) | plan density | KV read | ours ms | ours GB/s | % copy BW | x SDPA | x SDPA best | Flex ms | x Flex |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in dec:
            _, shape, n, b = t.split("/")
            sd = k.get(t + "/sdpa", {})
            sd_txt = f"{sd.get('ms', '-')} / {sd.get('best_ms', '-')}"
            for key in sorted((x for x in k if x.startswith(t + "/moa")), key=lambda x: -float(x.rsplit("moa", 1)[1])):
                e = k[key]
                lines.append(f"| {shape} | {n[1:]} | {b[1:]} | {sd_txt} | {e.get('density', 0):.3f} | "
                             f"{e.get('read_fraction', 0):.3f} | {e.get('ms', 'WRONG')} | {e.get('GBps', '-')} | "
                             f"{100 * e['copy_frac']:.0f}% | {e.get('speedup_vs_sdpa', '-')} | "
                             f"{e.get('speedup_vs_sdpa_best', '-')} | {e.get('flex_ms', '-')} | "
                             f"{e.get('speedup_vs_flex', '-')} |" if "copy_frac" in e else
                             f"| {shape} | {n[1:]} | {b[1:]} | {sd_txt} | {e.get('density', 0):.3f} | "
                             f"{e.get('read_fraction', 0):.3f} | WRONG | - | - | - | - | {e.get('flex_ms', '-')} | - |")
        lines.append("")
    pre = sorted({key.rsplit("/", 1)[0] for key in k if key.startswith("prefill/")},
                 key=lambda t: (t.split("/")[1], int(t.split("/")[2][1:])))
    if pre:
        lines += ["## Prefill attention, one layer, batch 1", "",
                  "| shape | N | SDPA flash causal ms (TFLOP/s) | SDPA best backend ms (TFLOP/s) | density / attn frac | ours ms | ours TFLOP/s (visible) | % matmul | x SDPA flash | x SDPA best | Flex ms | x Flex |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in pre:
            _, shape, n = t.split("/")
            sd = k.get(t + "/sdpa", {})
            for key in sorted((x for x in k if x.startswith(t + "/moa")), key=lambda x: -float(x.rsplit("moa", 1)[1])):
                e = k[key]
                lines.append(f"| {shape} | {n[1:]} | {sd.get('ms', '-')} ({sd.get('TFLOPs', '-')}) | "
                             f"{sd.get('best_ms', '-')} ({sd.get('best_TFLOPs', '-')}) | {e.get('density', 0):.3f} / "
                             f"{e.get('attention_fraction', e.get('layer0_density', 0)):.3f} | "
                             f"{e.get('ms', 'WRONG')} | {e.get('TFLOPs', '-')} | "
                             f"{(str(round(100 * e['matmul_frac'])) + '%') if 'matmul_frac' in e else '-'} | "
                             f"{e.get('speedup_vs_sdpa', '-')} | {e.get('speedup_vs_sdpa_best', '-')} | "
                             f"{e.get('flex_ms', e.get('flex_wrong', '-'))} | {e.get('speedup_vs_flex', '-')} |")
        lines.append("")
    e2e = res.get("e2e")
    if e2e:
        lines += ["## Whole-model decode throughput (greedy, CUDA graph, random weights)", "",
                  f"{e2e.get('note', '')}. Shape {e2e.get('shape')}, context {e2e.get('context')}, plan density "
                  f"{e2e.get('density', 0):.3f}, weights {e2e.get('weights_GB')} GB.", "",
                  "| variant | largest batch | ms/step | tokens/s | KV cache GB | peak GB | peak bytes / context token |",
                  "|---|---|---|---|---|---|---|"]
        for v in ("dense", "moa"):
            r = e2e.get(v, {})
            if "error" in r:
                lines.append(f"| {v} | error: {r['error']} | | | | | |")
            else:
                lines.append(f"| {v} | {r.get('batch')} | {r.get('ms_per_step')} | {r.get('tok_s')} | {r.get('kv_cache_GB')} | "
                             f"{r.get('peak_GB')} | {r.get('peak_bytes_per_context_token')} |")
        kv = e2e.get("kv_bytes_per_seq", {})
        lines += ["", f"MoA / dense throughput: **{e2e.get('speedup', '-')}x**. KV bytes per sequence: MoA {kv.get('moa')} "
                  f"vs dense {kv.get('dense')} ({kv.get('ratio')}); plan slots {kv.get('plan_slots')} "
                  f"(allocated = plan slots x 2 x D x 2 bytes exactly).", ""]
    sdpa_be = {key: v["backends"] for key, v in k.items() if key.endswith("/sdpa") and "backends" in v}
    if sdpa_be:
        lines += ["## SDPA forced onto each backend (ms; the best is the 'SDPA best' baseline)", "",
                  "| case | backends |", "|---|---|"]
        lines += [f"| {a} | {', '.join(f'{n}: {t}' for n, t in b.items())} |" for a, b in sdpa_be.items()]
        lines.append("")
    if res.get("sweep"):
        lines += ["## Tuning sweep (ms)", "", "| config | ms |", "|---|---|"]
        lines += [f"| {a} | {b} |" for a, b in res["sweep"].items()]
        lines.append("")
    bad = {a: b for a, b in res.get("guard", {}).items() if not b.get("ok", True)}
    if bad:
        lines += ["## Wrong implementations (not timed)", ""] + [f"- {a}: {b}" for a, b in bad.items()] + [""]
    if res.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {s}" for s in res["skipped"]] + [""]
    lines.append(f"Elapsed {m.get('elapsed_s')} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m moa_plan.evals.bench ...
    parser = argparse.ArgumentParser(prog="moa-plan")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(sys.argv[1:] if sys.argv[1:2] == ["bench"] else ["bench", *sys.argv[1:]])
    sys.exit(ns.handler(ns))
