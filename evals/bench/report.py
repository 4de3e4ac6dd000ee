"""The benchmark results as markdown tables."""

from __future__ import annotations


def _band_cell(e: dict) -> str:
    """The cuDNN band path's cell of a prefill row (absent without the cudnn extra)."""
    if "cudnn_band_ms" in e:
        return f"{e['cudnn_band_ms']} ({e.get('cudnn_band_speedup_vs_sdpa_best', '-')})"
    return e.get("cudnn_band_wrong", "-")


def _moa_keys(cells: dict, case: str) -> list[str]:
    """The plan cells of one case, densest first."""
    from moa_plan.evals.bench.cases import label_density

    return sorted((x for x in cells if x.startswith(case + "/moa")), key=lambda x: (-label_density(x), x))


def render_markdown(res: dict) -> str:
    """The results as markdown tables (device, versions, command first)."""
    m = res.get("meta", {})
    c = res.get("ceilings", {})
    lines = [
        f"# MoA kernel benchmark on {m.get('device', '?')}",
        "",
        f"- command: `{m.get('command', '?')}`",
        f"- torch {m.get('torch')}, triton {m.get('triton')}, CUDA {m.get('cuda')}, {m.get('sms')} SMs; bf16; sink {m.get('sink')}",
        f"- density = {m.get('density')}",
        f"- measured ceilings: copy {c.get('copy_GBps')} GB/s (read + write), bf16 matmul {c.get('matmul_bf16_TFLOPs')} TFLOP/s",
        "- times: medians; decode as CUDA-graph replays over rotated inputs (L2 never holds them), prefill by triton do_bench",
        "",
    ]
    k = res.get("kernels", {})
    dec = sorted(
        {key.rsplit("/", 1)[0] for key in k if key.startswith("decode/")},
        key=lambda t: (t.split("/")[1], int(t.split("/")[2][1:]), int(t.split("/")[3][1:])),
    )
    if dec:
        lines += [
            "## Decode attention, one layer, per step",
            "",
            "| shape | cache n | batch | SDPA dense ms (default / best backend) | plan | density / attn frac | KV read (frac, MB) | ours ms (merge; the other merge) | ours GB/s | % copy BW | x SDPA | x SDPA best | Flex ms | x Flex |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in dec:
            _, shape, n, b = t.split("/")
            sd = k.get(t + "/sdpa", {})
            sd_txt = f"{sd.get('ms', '-')} / {sd.get('best_ms', '-')}"
            for key in _moa_keys(k, t):
                e = k[key]
                plan = key.rsplit("/", 1)[1]
                other = next((m for m in ("kernel", "fused") if f"ms_{m}_merge" in e), None)
                two = f" ({e.get('merge')}; {other} {e[f'ms_{other}_merge']})" if other else ""
                lines.append(
                    f"| {shape} | {n[1:]} | {b[1:]} | {sd_txt} | {plan} | {e.get('density', 0):.3f} / "
                    f"{e.get('attention_fraction', 0):.3f} | {e.get('read_fraction', 0):.3f}, "
                    f"{e.get('bytes_read', 0) / 1e6:.1f} | {e.get('ms', 'WRONG')}{two} | {e.get('GBps', '-')} | "
                    f"{100 * e['copy_frac']:.0f}% | {e.get('speedup_vs_sdpa', '-')} | "
                    f"{e.get('speedup_vs_sdpa_best', '-')} | {e.get('flex_ms', '-')} | "
                    f"{e.get('speedup_vs_flex', '-')} |"
                    if "copy_frac" in e
                    else f"| {shape} | {n[1:]} | {b[1:]} | {sd_txt} | {plan} | {e.get('density', 0):.3f} | "
                    f"{e.get('read_fraction', 0):.3f} | WRONG | - | - | - | - | {e.get('flex_ms', '-')} | - |"
                )
        lines.append("")
    pre = sorted(
        {key.rsplit("/", 1)[0] for key in k if key.startswith("prefill/")},
        key=lambda t: (t.split("/")[1], int(t.split("/")[2][1:])),
    )
    if pre:
        lines += [
            "## Prefill attention, one layer, batch 1",
            "",
            "| shape | N | SDPA flash causal ms (TFLOP/s) | SDPA best backend ms (TFLOP/s) | plan: density / attn frac | ours ms | ours TFLOP/s (visible) | % matmul | x SDPA flash | x SDPA best | Flex ms | x Flex | cuDNN band ms (x SDPA best) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in pre:
            _, shape, n = t.split("/")
            sd = k.get(t + "/sdpa", {})
            for key in _moa_keys(k, t):
                e = k[key]
                lines.append(
                    f"| {shape} | {n[1:]} | {sd.get('ms', '-')} ({sd.get('TFLOPs', '-')}) | "
                    f"{sd.get('best_ms', '-')} ({sd.get('best_TFLOPs', '-')}) | {key.rsplit('/', 1)[1]}: "
                    f"{e.get('density', 0):.3f} / "
                    f"{e.get('attention_fraction', e.get('layer0_density', 0)):.3f} | "
                    f"{e.get('ms', 'WRONG')} | {e.get('TFLOPs', '-')} | "
                    f"{(str(round(100 * e['matmul_frac'])) + '%') if 'matmul_frac' in e else '-'} | "
                    f"{e.get('speedup_vs_sdpa', '-')} | {e.get('speedup_vs_sdpa_best', '-')} | "
                    f"{e.get('flex_ms', e.get('flex_wrong', '-'))} | {e.get('speedup_vs_flex', '-')} | "
                    f"{_band_cell(e)} |"
                )
        lines.append("")
    from moa_plan.evals.bench.report_model import e2e_lines, generate_lines

    lines += e2e_lines(res.get("e2e") or [], c) + generate_lines(res.get("generate") or [])
    sdpa_be = {key: v["backends"] for key, v in k.items() if key.endswith("/sdpa") and "backends" in v}
    if sdpa_be:
        lines += [
            "## SDPA forced onto each backend (ms; the best is the 'SDPA best' baseline)",
            "",
            "| case | backends |",
            "|---|---|",
        ]
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
