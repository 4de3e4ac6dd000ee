"""Markdown of the whole-model rows of the benchmark: the bench's own decoder and ``generate``."""

from __future__ import annotations


def _gb(x) -> str:
    return f"{x / 1e9:.3f}" if isinstance(x, (int, float)) else "-"


def e2e_lines(rows: list[dict] | dict, ceilings: dict) -> list[str]:
    """One table row per (plan, variant) of the decoder in evals/bench/decoder.py, with its floor
    (older result files hold one dict)."""
    rows = [rows] if isinstance(rows, dict) else rows
    if not rows:
        return []
    bw = ceilings.get("copy_GBps")
    first = rows[0]
    lines = [
        "## Whole-model decode throughput, the bench's decoder (greedy, CUDA graph, random weights)",
        "",
        f"{first.get('note', '')}. Shape {first.get('shape')}, context {first.get('context')}, weights "
        f"{first.get('weights_GB')} GB. Floor = (weights + KV bytes read) / copy bandwidth {bw} GB/s.",
        "",
        "| plan | density / attn frac | variant | largest batch | ms/step | tokens/s | KV read GB/step | floor ms | x floor | KV cache GB | peak GB | MoA/dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        plan = f"{e.get('plan_kind', 'synthetic')} {e.get('density', 0):.3f}"
        fr = f"{e.get('density', 0):.3f} / {e.get('attention_fraction', 0):.3f}"
        for v in ("dense", "moa"):
            r = e.get(v, {})
            if "error" in r:
                lines.append(f"| {plan} | {fr} | {v} | error: {r['error']} | | | | | | | | |")
                continue
            step = (e.get("weights_bytes") or 0) + (r.get("kv_read_bytes") or 0)
            floor = step / bw / 1e6 if bw and step else None
            x = f"{r['ms_per_step'] / floor:.2f}" if floor and r.get("ms_per_step") else "-"
            lines.append(
                f"| {plan} | {fr} | {v} | {r.get('batch')} | {r.get('ms_per_step')} | {r.get('tok_s')} | "
                f"{_gb(r.get('kv_read_bytes'))} | {f'{floor:.3f}' if floor else '-'} | {x} | {r.get('kv_cache_GB')} | "
                f"{r.get('peak_GB')} | {e.get('speedup', '-') if v == 'moa' else ''} |"
            )
    return lines + [""]


def generate_lines(results: list[dict]) -> list[str]:
    """The ``model.generate`` rows (evals/bench/generation.py) with each one's floor arithmetic."""
    lines: list[str] = []
    for g in results:
        lines += [
            f"## model.generate, {g.get('layers')} {g.get('shape')}-shaped layers, prompt {g.get('context')}, "
            f"{g.get('new_tokens')} new tokens (greedy)",
            "",
            "Dense = transformers' static cache + compiled decode step (reduce-overhead) + SDPA; MoA graph = "
            "`generate` of a planned model (one captured decode step replayed); MoA loop = transformers' loop. "
            "Floor = (weights read + KV bytes read at the middle length) / measured copy bandwidth.",
            "",
            "| variant | density / attn frac | batch | ms/step | tokens/s | prefill ms | peak GB | floor | x floor |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in g.get("rows", []):
            fr = f"{r['density']:.3f} / {r['attention_fraction']:.3f}" if "density" in r else "1 / 1"
            if "error" in r:
                lines.append(f"| {r.get('variant')} | {fr} | {r.get('batch', '-')} | error: {r['error']} | | | | | |")
                continue
            lines.append(
                f"| {r['variant']} | {fr} | {r['batch']} | {r['ms_per_step']} | {r['tok_per_s']} | "
                f"{r['prefill_ms']} | {r['peak_GB']} | {r['floor']} | **{r['x_floor']}** |"
            )
        lines.append("")
    return lines
