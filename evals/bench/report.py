"""The benchmark results as markdown tables."""

from __future__ import annotations


def _moa_keys(cells: dict, case: str) -> list[str]:
    """The plan cells of one case, densest first."""
    return sorted((x for x in cells if x.startswith(case + "/moa")), key=lambda x: -float(x.rsplit("moa", 1)[1]))


def _cases(cells: dict, kind: str) -> list[str]:
    """The cases of one kind (``decode/<shape>/n<N>/b<B>``, ``prefill/<shape>/n<N>``), by shape, then numbers."""
    cases = {key.rsplit("/", 1)[0] for key in cells if key.startswith(kind + "/")}
    return sorted(cases, key=lambda t: (t.split("/")[1], *(int(p[1:]) for p in t.split("/")[2:])))


def _rows(cells: dict, cases: list[str]):
    """(the case's key parts after its kind, its SDPA cell, a plan cell) for each plan cell, densest first."""
    for t in cases:
        sd = cells.get(t + "/sdpa", {})
        for key in _moa_keys(cells, t):
            yield t.split("/")[1:], sd, cells[key]


def _section(title: str, header: str, intro: str = "") -> list[str]:
    """A section's title, its intro paragraph (if any) and a table's header row with its rule."""
    return [f"## {title}", "", *([intro, ""] if intro else []), header, "|---" * (header.count("|") - 1) + "|"]


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
    dec = _cases(k, "decode")
    if dec:
        lines += _section(
            "Decode attention, one layer, per step",
            "| shape | cache n | batch | SDPA dense ms (default / best backend) | plan density | KV read | ours ms | ours GB/s | % copy BW | x SDPA | x SDPA best | Flex ms | x Flex |",
        )
        for (shape, n, b), sd, e in _rows(k, dec):
            sd_txt = f"{sd.get('ms', '-')} / {sd.get('best_ms', '-')}"
            lines.append(
                f"| {shape} | {n[1:]} | {b[1:]} | {sd_txt} | {e.get('density', 0):.3f} | "
                f"{e.get('read_fraction', 0):.3f} | {e.get('ms', 'WRONG')} | {e.get('GBps', '-')} | "
                f"{100 * e['copy_frac']:.0f}% | {e.get('speedup_vs_sdpa', '-')} | "
                f"{e.get('speedup_vs_sdpa_best', '-')} | {e.get('flex_ms', '-')} | "
                f"{e.get('speedup_vs_flex', '-')} |"
                if "copy_frac" in e
                else f"| {shape} | {n[1:]} | {b[1:]} | {sd_txt} | {e.get('density', 0):.3f} | "
                f"{e.get('read_fraction', 0):.3f} | WRONG | - | - | - | - | {e.get('flex_ms', '-')} | - |"
            )
        lines.append("")
    pre = _cases(k, "prefill")
    if pre:
        lines += _section(
            "Prefill attention, one layer, batch 1",
            "| shape | N | SDPA flash causal ms (TFLOP/s) | SDPA best backend ms (TFLOP/s) | density / attn frac | ours ms | ours TFLOP/s (visible) | % matmul | x SDPA flash | x SDPA best | Flex ms | x Flex |",
        )
        for (shape, n), sd, e in _rows(k, pre):
            lines.append(
                f"| {shape} | {n[1:]} | {sd.get('ms', '-')} ({sd.get('TFLOPs', '-')}) | "
                f"{sd.get('best_ms', '-')} ({sd.get('best_TFLOPs', '-')}) | {e.get('density', 0):.3f} / "
                f"{e.get('attention_fraction', e.get('layer0_density', 0)):.3f} | "
                f"{e.get('ms', 'WRONG')} | {e.get('TFLOPs', '-')} | "
                f"{(str(round(100 * e['matmul_frac'])) + '%') if 'matmul_frac' in e else '-'} | "
                f"{e.get('speedup_vs_sdpa', '-')} | {e.get('speedup_vs_sdpa_best', '-')} | "
                f"{e.get('flex_ms', e.get('flex_wrong', '-'))} | {e.get('speedup_vs_flex', '-')} |"
            )
        lines.append("")
    e2e = res.get("e2e")
    if e2e:
        lines += _section(
            "Whole-model decode throughput (greedy, CUDA graph, random weights)",
            "| variant | largest batch | ms/step | tokens/s | KV cache GB | peak GB | peak bytes / context token |",
            f"{e2e.get('note', '')}. Shape {e2e.get('shape')}, context {e2e.get('context')}, plan density "
            f"{e2e.get('density', 0):.3f}, weights {e2e.get('weights_GB')} GB.",
        )
        for v in ("dense", "moa"):
            r = e2e.get(v, {})
            if "error" in r:
                lines.append(f"| {v} | error: {r['error']} | | | | | |")
            else:
                lines.append(
                    f"| {v} | {r.get('batch')} | {r.get('ms_per_step')} | {r.get('tok_s')} | {r.get('kv_cache_GB')} | "
                    f"{r.get('peak_GB')} | {r.get('peak_bytes_per_context_token')} |"
                )
        kv = e2e.get("kv_bytes_per_seq", {})
        lines += [
            "",
            f"MoA / dense throughput: **{e2e.get('speedup', '-')}x**. KV bytes per sequence: MoA {kv.get('moa')} "
            f"vs dense {kv.get('dense')} ({kv.get('ratio')}); plan slots {kv.get('plan_slots')} "
            f"(allocated = plan slots x 2 x D x 2 bytes exactly).",
            "",
        ]
    sdpa_be = {key: v["backends"] for key, v in k.items() if key.endswith("/sdpa") and "backends" in v}
    if sdpa_be:
        lines += _section(
            "SDPA forced onto each backend (ms; the best is the 'SDPA best' baseline)", "| case | backends |"
        )
        lines += [f"| {a} | {', '.join(f'{n}: {t}' for n, t in b.items())} |" for a, b in sdpa_be.items()]
        lines.append("")
    if res.get("sweep"):
        lines += _section("Tuning sweep (ms)", "| config | ms |")
        lines += [f"| {a} | {b} |" for a, b in res["sweep"].items()]
        lines.append("")
    bad = {a: b for a, b in res.get("guard", {}).items() if not b.get("ok", True)}
    if bad:
        lines += ["## Wrong implementations (not timed)", ""] + [f"- {a}: {b}" for a, b in bad.items()] + [""]
    if res.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {s}" for s in res["skipped"]] + [""]
    lines.append(f"Elapsed {m.get('elapsed_s')} s.")
    return "\n".join(lines) + "\n"
