"""A random-weight Llama-shaped decoder for whole-model decode throughput (dense cache vs MoA cache)."""

from __future__ import annotations

from typing import Any

from moa_plan.evals.bench.cases import SHAPES, decode_tokens_read, plan_of_kind
from moa_plan.evals.bench.timing import graph_time


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
            self.layers.append(
                dict(
                    wqkv=torch.randn(h, (hq + 2 * hkv) * d, **bf) * sd,
                    wo=torch.randn(hq * d, h, **bf) * sd,
                    wgu=torch.randn(h, 2 * inter, **bf) * sd,
                    wd=torch.randn(inter, h, **bf) * sd,
                    n1=torch.ones(h, **bf),
                    n2=torch.ones(h, **bf),
                )
            )
        self.norm = torch.ones(h, **bf)
        self.weight_bytes = sum(t.numel() * 2 for t in [self.embed, self.head, self.norm]) + sum(
            t.numel() * 2 for layer in self.layers for t in layer.values()
        )

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
            q = qkv[:, : hq * d].view(bsz, hq, d)
            k = qkv[:, hq * d : (hq + hkv) * d].view(bsz, hkv, d)
            v = qkv[:, (hq + hkv) * d :].view(bsz, hkv, d)
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

            kv_bytes = kv_read = sum(t.numel() * 2 for t in kc + vc)
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
                return decode_attention(
                    q, kk, vv, lay.offset, lay.cap, lay.n_sink, spans[li], plan.sink, n_dev, max_cap=max(lay.caps)
                )

            kv_bytes = sum(t.numel() * 2 for c in caches for t in c)
            group = s["hq"] // hkv
            kv_read = sum(
                sum(decode_tokens_read(sp, caps, plan.sink, ctx, group))
                for sp, caps in zip(plan.spans(ctx), plan.kv_slots(ctx))
            )
            kv_read *= 2 * d * 2 * batch
            plan_bytes = 2 * sum(sum(c) for c in plan.kv_slots(ctx)) * d * 2 * batch
            if kv_bytes != plan_bytes:
                raise RuntimeError(f"MoA cache holds {kv_bytes} bytes, the plan's slots {plan_bytes}")
        ms = graph_time([lambda: self._step(tokens, attend)], reps=steps, inner=1)
        if not bool((tokens >= 0).all() and (tokens < s["vocab"]).all()):
            raise RuntimeError("decode produced invalid tokens")
        peak = torch.cuda.max_memory_allocated()
        return {
            "batch": batch,
            "ms_per_step": round(ms, 3),
            "tok_s": round(batch * 1000 / ms, 1),
            "kv_cache_GB": round(kv_bytes / 1e9, 3),
            "kv_cache_bytes": kv_bytes,
            "kv_read_bytes": kv_read,
            "peak_GB": round(peak / 1e9, 2),
            "peak_bytes_per_context_token": round((peak - base) / (batch * ctx), 1),
        }


def e2e(
    shape_name: str, context: int, density: float, sink: int, device: Any, kind: str = "synthetic"
) -> dict[str, Any]:
    """Whole-model decode throughput, dense cache vs the MoA cache, at one context."""
    import torch

    shape = SHAPES[shape_name]
    ctx = context
    plan = plan_of_kind(kind, shape, density, ctx, sink)
    model = RandomDecoder(shape, device)
    res: dict[str, Any] = {
        "shape": shape_name,
        "context": ctx,
        "density": plan.density(ctx),
        "plan_kind": kind,
        "attention_fraction": plan.attention_fraction(ctx),
        "weights_GB": round(model.weight_bytes / 1e9, 2),
        "weights_bytes": model.weight_bytes - model.embed.numel() * 2,  # read per step (one embedding row aside)
        "note": "random-weight Llama-style decoder written in evals/bench/decoder.py (RMSNorm, "
        "fused QKV, SwiGLU MLP, LM head, greedy argmax; no RoPE), one CUDA graph "
        "per step; dense = SDPA over a static [B, Hkv, ctx, D] cache, MoA = "
        "runtime.cache write + Triton decode over the plan's per-head cache",
    }
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
    res["kv_bytes_per_seq"] = {
        "moa": rep.bytes_allocated,
        "dense": rep.bytes_dense,
        "ratio": round(rep.ratio, 4),
        "plan_slots": rep.slots,
    }
    del model
    torch.cuda.empty_cache()
    return res
