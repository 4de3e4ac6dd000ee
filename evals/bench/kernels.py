"""The measurements of ``moa-plan bench`` on one GPU: device ceilings, then decode and prefill
attention groups (one run cell each: the dense SDPA baseline, ours at every plan density and
FlexAttention with the same mask). Every implementation is checked against the dense reference
before it is timed; a wrong one is reported and not timed."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from moa_plan.evals.bench.baselines import Baselines
from moa_plan.evals.bench.cases import SHAPES, decode_tokens_read, plan_label, plan_of_kind
from moa_plan.evals.bench.timing import (
    ABS_TOL,
    REL_TOL,
    bench_time,
    copy_bandwidth,
    graph_time,
    rel_err,
    torch_isfinite,
)


def cudnn_band_module():
    """moa_plan.runtime.cudnn_band_prefill when the cudnn extra is installed, else None."""
    try:
        import cudnn  # noqa: F401

        from moa_plan.runtime import cudnn_band_prefill
    except (ImportError, OSError):  # not installed, or no cuDNN library to load
        return None
    return cudnn_band_prefill


class Kernels(Baselines):
    """The GPU measurements; ``s`` is the bench settings, ``over_budget`` says when to stop timing."""

    def __init__(self, s: Any, over_budget: Callable[[], bool], ceil: dict[str, float] | None = None):
        import torch

        self.s, self.over_budget, self.ceil = s, over_budget, ceil or {}
        self.dev = torch.device("cuda")
        self.flex = None
        self.begin()

    def begin(self) -> None:
        self.kernels: dict[str, Any] = {}
        self.guard: dict[str, Any] = {}
        self.skipped: list[str] = []

    def end(self) -> dict[str, Any]:
        return {"kernels": self.kernels, "guard": self.guard, "skipped": self.skipped}

    def skip(self, what: str, why: str) -> None:
        print(f"skip {what}: {why}", flush=True)
        self.skipped.append(f"{what}: {why}")

    def record(self, key: str, entry: dict) -> None:
        self.kernels[key] = entry
        print(key, {k: v for k, v in entry.items() if k != "guard"}, flush=True)

    def ceilings(self) -> dict[str, float]:
        """Measured device ceilings: copy bandwidth and bf16 matmul throughput."""
        import torch

        copy_gbs = copy_bandwidth(self.dev)
        a = torch.randn(8192, 8192, device=self.dev, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=self.dev, dtype=torch.bfloat16)
        ms_mm = bench_time(lambda: a @ b)
        self.ceil = {"copy_GBps": round(copy_gbs, 1), "matmul_bf16_TFLOPs": round(2 * 8192**3 / ms_mm / 1e9, 1)}
        print("ceilings", self.ceil, flush=True)
        a = b = None  # free the memory (a del would leave the lambda above unbound)
        torch.cuda.empty_cache()
        return self.ceil

    def decode_group(self, shape_name: str, n: int, batch: int) -> dict[str, Any]:
        """Decode attention at cached length n and one batch size: dense SDPA (each backend), ours
        at every density, FlexAttention; one cell of the run."""
        import torch
        import torch.nn.functional as F

        from moa_plan.runtime.cache import LayerLayout, allocate, write_kv
        from moa_plan.runtime.reference import reference_attention
        from moa_plan.runtime.triton_decode import decode_attention, merge_setting

        shape = SHAPES[shape_name]
        hq, hkv, d, sink = shape["hq"], shape["hkv"], shape["d"], self.s.sink
        group = hq // hkv
        dt = torch.bfloat16
        self.begin()
        plans = {
            plan_label(dens, kind): plan_of_kind(kind, shape, dens, n, sink)
            for dens in self.s.densities
            for kind in self.s.plan_kinds
            if kind == "synthetic" or dens < 1.0
        }
        tag = f"decode/{shape_name}/n{n}/b{batch}"
        dense_bytes = 2 * batch * hkv * n * d * 2
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
        ref_dense = reference_attention(
            qf[:, :, None], kf, vf, torch.full((hq,), n, dtype=torch.int32, device=self.dev), 0
        )[:, :, 0]
        got = F.scaled_dot_product_attention(qf[:, :, None], kf, vf, enable_gqa=True)[:, :, 0]
        ms = self._guarded(
            tag + "/sdpa",
            got,
            ref_dense,
            lambda: [
                (lambda i=i: F.scaled_dot_product_attention(q, kd[i], vd[i], enable_gqa=True)) for i in range(copies)
            ],
        )
        sdpa_ms = sdpa_best = ms
        if ms is not None:
            entry = {
                "ms": ms,
                "backend": "default",
                "GBps": round(dense_bytes / ms / 1e6, 1),
                "bytes": dense_bytes,
                "copy_frac": self._bw_frac(dense_bytes, ms),
            }
            entry["backends"] = self._sdpa_backends(
                tag,
                lambda **kw: F.scaled_dot_product_attention(qf[:, :, None], kf, vf, **kw)[:, :, 0],
                ref_dense,
                [(lambda i=i: F.scaled_dot_product_attention(q, kd[i], vd[i], enable_gqa=True)) for i in range(copies)],
                graph=True,
            )
            sdpa_best = min([ms] + [v for v in entry["backends"].values() if isinstance(v, float)])
            entry["best_ms"] = sdpa_best
            self.record(tag + "/sdpa", entry)
        for label, plan in plans.items():
            key = f"{tag}/{label}"
            dens = plan.density(n)
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
            merge = merge_setting()  # how the default launch merges split-K chunks
            ms = self._guarded(
                key,
                got,
                want,
                lambda: [
                    (
                        lambda c=c: decode_attention(
                            q2, c[0], c[1], layout.offset, layout.cap, layout.n_sink, spans, sink, n
                        )
                    )
                    for c in caches
                ],
            )
            entry = {
                "density": plan.density(n),
                "attention_fraction": plan.attention_fraction(n),
                "kv_fraction": sum(caps) / (hkv * n),
                "read_fraction": sum(read) / (hkv * n),
                "bytes_read": bytes_read,
                "merge": merge,
            }
            if ms is not None:
                entry.update(ms=ms, GBps=round(bytes_read / ms / 1e6, 1), copy_frac=self._bw_frac(bytes_read, ms))
                if batch == 1:  # the same step with the other split-K merge, for comparison
                    other = "kernel" if merge == "fused" else "fused"
                    fns = [
                        (
                            lambda c=c: decode_attention(
                                q2, *c, layout.offset, layout.cap, layout.n_sink, spans, sink, n, merge=other
                            )
                        )
                        for c in caches
                    ]
                    entry[f"ms_{other}_merge"] = round(graph_time(fns), 5)
                if sdpa_ms:
                    entry["speedup_vs_sdpa"] = round(sdpa_ms / ms, 3)
                    entry["speedup_vs_sdpa_best"] = round(sdpa_best / ms, 3)
            # FlexAttention with the same mask over the dense cache
            flex = self._flex_for(shape_name, batch) if "-" not in label else None
            if flex is not None and dens < 1.0 and not self.over_budget():
                try:
                    bm = self._flex_block_mask(spans, sink, 1, n)
                    gotf = flex(q, kd[0], vd[0], block_mask=bm, enable_gqa=True)[:gb, :, 0]
                    wantf = reference_attention(q[:gb], kd[0][:gb], vd[0][:gb], spans, sink)[:, :, 0]
                    fms = self._guarded(
                        key + "/flex",
                        gotf,
                        wantf,
                        lambda: [
                            (lambda i=i: flex(q, kd[i], vd[i], block_mask=bm, enable_gqa=True)) for i in range(copies)
                        ],
                    )
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
        return self.end()

    def _bw_frac(self, nbytes: float, ms: float) -> float:
        return round(nbytes / ms / 1e6 / self.ceil["copy_GBps"], 3)

    def _guarded(self, key: str, got, want, make_fns, graph: bool = True) -> float | None:
        """Compare with the reference; time only if right. Returns ms or None."""
        rel, mx = rel_err(got, want)
        ok = bool(torch_isfinite(got)) and rel <= REL_TOL and mx <= ABS_TOL
        self.guard[key] = {"rel": round(rel, 5), "max_abs": round(mx, 5), "ok": ok}
        if not ok:
            print(f"WRONG {key}: rel {rel:.3g} max {mx:.3g} -- not timed", flush=True)
            return None
        fns = make_fns()
        try:
            ms = graph_time(fns) if graph else bench_time(fns[0])
        except Exception as exc:  # noqa: BLE001 - e.g. a baseline that cannot be captured in a graph
            print(f"graph capture failed for {key} ({type(exc).__name__}); timing eagerly", flush=True)
            import torch

            torch.cuda.synchronize()
            ms = bench_time(fns[0])
        return round(ms, 5)

    def prefill_group(self, shape_name: str, n: int) -> dict[str, Any]:
        """Prefill attention at length n, batch 1: SDPA flash (and other backends), ours at every
        density, FlexAttention; one cell of the run."""
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from moa_plan.runtime.reference import reference_attention
        from moa_plan.runtime.triton_prefill import prefill_attention
        from moa_plan.semantics import causal_pairs, visible_pairs

        shape = SHAPES[shape_name]
        hq, hkv, d, sink = shape["hq"], shape["hkv"], shape["d"], self.s.sink
        dt = torch.bfloat16
        peak = self.ceil["matmul_bf16_TFLOPs"]
        self.begin()
        tag = f"prefill/{shape_name}/n{n}"
        q = torch.randn(1, hq, n, d, device=self.dev, dtype=dt)
        k = torch.randn(1, hkv, n, d, device=self.dev, dtype=dt)
        v = torch.randn(1, hkv, n, d, device=self.dev, dtype=dt)
        rows = sorted({min(n, 256), n // 2 + 128, n})  # guard: query blocks ending at these rows

        def guard(out, spans):
            worst = (0.0, 0.0)
            for r in rows:
                lo = max(0, r - 128)
                ref = reference_attention(q[:, :, lo:r], k[:, :, :r], v[:, :, :r], spans, sink)
                e = rel_err(out[:, :, lo:r], ref)
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
            sdpa_ms = round(bench_time(sdpa), 4)
            entry = {
                "ms": sdpa_ms,
                "backend": backend,
                "TFLOPs": round(dense_flops / sdpa_ms / 1e9, 1),
                "matmul_frac": round(dense_flops / sdpa_ms / 1e9 / peak, 3),
            }
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
                    others[name] = (
                        round(bench_time(run), 4) if r2 <= REL_TOL and m2 <= ABS_TOL else f"WRONG rel {r2:.3g}"
                    )
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
        for dens, kind in [(d, k) for d in self.s.densities for k in self.s.plan_kinds if k == "synthetic" or d < 1]:
            key = f"{tag}/{plan_label(dens, kind)}"
            plan = plan_of_kind(kind, shape, dens, n, sink)
            dens = plan.density(n)
            spans_l = plan.spans(n)[0]
            spans = torch.tensor(spans_l, dtype=torch.int32, device=self.dev)
            flops = 4 * d * sum(visible_pairs(s, sink, n) for s in spans_l)
            entry: dict[str, Any] = {
                "density": plan.density(n),
                "attention_fraction": plan.attention_fraction(n),
                "layer0_attention_fraction": flops / (hq * 4 * d * causal_pairs(n)),
            }
            out = prefill_attention(q, k, v, spans, sink)
            rel, mx = guard(out, spans)
            self.guard[key] = {"rel": round(rel, 5), "max_abs": round(mx, 5)}
            if rel <= REL_TOL and mx <= ABS_TOL:
                ms = round(bench_time(lambda: prefill_attention(q, k, v, spans, sink)), 4)
                entry.update(ms=ms, TFLOPs=round(flops / ms / 1e9, 1), matmul_frac=round(flops / ms / 1e9 / peak, 3))
                if sdpa_ms:
                    entry["speedup_vs_sdpa"] = round(sdpa_ms / ms, 3)
                    entry["speedup_vs_sdpa_best"] = round(sdpa_best / ms, 3)
            else:
                entry["wrong"] = f"rel {rel:.3g} max {mx:.3g}"
            del out
            band = cudnn_band_module()
            if band is not None and dens < 1.0 and n >= band.MIN_LEN:  # the opt-in cuDNN band path, where it runs
                bout = band.prefill_attention(q, k, v, spans, sink, host_spans=spans_l)
                rel, mx = guard(bout, spans)
                del bout
                if rel <= REL_TOL and mx <= ABS_TOL:
                    bms = round(bench_time(lambda: band.prefill_attention(q, k, v, spans, sink, host_spans=spans_l)), 4)
                    entry["cudnn_band_ms"] = bms
                    if sdpa_best:
                        entry["cudnn_band_speedup_vs_sdpa_best"] = round(sdpa_best / bms, 3)
                else:
                    entry["cudnn_band_wrong"] = f"rel {rel:.3g} max {mx:.3g}"
            flex = self._flex_for(shape_name) if kind == "synthetic" else None
            if flex is not None and dens < 1.0 and not self.over_budget():
                try:
                    bm = self._flex_block_mask(spans, sink, n, n)
                    fout = flex(q, k, v, block_mask=bm, enable_gqa=True)
                    rel, mx = guard(fout, spans)
                    del fout
                    if rel <= REL_TOL and mx <= ABS_TOL:
                        fms = round(bench_time(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True)), 4)
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
        return self.end()

    def e2e(self, shape_name: str, density: float | None = None, kind: str = "synthetic") -> dict[str, Any]:
        from moa_plan.evals.bench.decoder import e2e

        dens = self.s.e2e_density if density is None else density
        return e2e(shape_name, self.s.e2e_context, dens, self.s.sink, self.dev, kind)

    def generate(self, shape_name: str) -> dict[str, Any]:
        from moa_plan.evals.bench.generation import suite

        return suite(self.s, self.ceil["copy_GBps"], shape_name)

    def sweep(self) -> dict[str, Any]:
        from moa_plan.evals.bench.sweep import sweep

        return sweep(self.s.sink, self.dev, self.over_budget)
