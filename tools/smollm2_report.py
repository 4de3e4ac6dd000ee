"""The SmolLM2 quality report from the eval stage's result files (tools/smollm2_gpu.sh eval):
retrieval accuracy with Wilson intervals, paired differences against the uniform window at the
same density (bootstrap over the same documents), perplexity with a paired bootstrap over the
same text windows, the paper's ablation table (uniform, static, elastic) and a PNG of passkey
accuracy by length.

The static-window plans are searched and measured one length at a time (``TASK-static-N.json``);
they are merged here after checking that they saw the same documents as the other methods. A
paired difference is printed only where both methods keep the same density at that length.

    python tools/smollm2_report.py RESULTS_DIR OUT.md [OUT.png]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from moa_plan.evals.quality.stats import paired_bootstrap, wilson

ORDER = [
    "dense",
    "moa-50",
    "uniform-50",
    "static-50",
    "gqa-50",
    "run3-moa-50",
    "moa-25",
    "uniform-25",
    "static-25",
    "gqa-25",
    "run3-moa-25",
]
SAME_DENSITY = 2e-3  # densities closer than this count as equal budgets


def _name(key: str) -> str:  # the eval names the uniform baseline after the plan it matches
    return {"uniform~smollm2-135m-moa-50": "uniform-50", "uniform~smollm2-135m-moa-25": "uniform-25"}.get(key, key)


def retrieval(paths: list[Path]) -> tuple[dict, dict, list[int]]:
    """{method: {length: [correct per document, in a fixed document order]}}, stats, lengths,
    merged over result files that must have seen the same documents (same answers per cell)."""
    out: dict[str, dict[int, list[float]]] = {}
    answers: dict[tuple[int, float], list[str]] = {}
    stats: dict[str, dict] = {}
    for path in paths:
        data = json.loads(path.read_text())
        for cell in data["cells"].values():
            m, n = _name(cell["method"]), int(cell["length"])
            key, got = (n, cell["position"]), [s["answer"] for s in cell["samples"]]
            if answers.setdefault(key, got) != got:
                raise SystemExit(
                    f"{path}: documents at length {n}, depth {cell['position']} differ from the other files"
                )
            out.setdefault(m, {}).setdefault(n, []).extend(
                (cell["position"], i, s["correct"]) for i, s in enumerate(cell["samples"])
            )
        for k, v in data["methods"].items():
            stats.setdefault(_name(k), {}).update(v.get("stats", {}))
    for m in out:
        for n in out[m]:
            out[m][n] = [c for *_, c in sorted(out[m][n])]
    lengths = sorted({n for m in out.values() for n in m})
    return out, stats, lengths


def same_density(stats: dict, a: str, b: str, n: int) -> bool:
    sa, sb = stats.get(a, {}).get(str(n)), stats.get(b, {}).get(str(n))
    return bool(sa and sb) and abs(sa["density"] - sb["density"]) < SAME_DENSITY


def perplexity(paths: list[Path]) -> dict:
    """{method: {"perplexity": {kind: {length: cell}}}} merged over result files."""
    meths: dict[str, dict] = {}
    for path in paths:
        for k, v in json.loads(path.read_text())["methods"].items():
            m = meths.setdefault(_name(k), {"perplexity": {}})
            for kind, cells in v["perplexity"].items():
                m["perplexity"].setdefault(kind, {}).update(cells)
    return meths


def fmt_acc(xs: list[float]) -> str:
    k, n = sum(xs), len(xs)
    lo, hi = wilson(k, n)
    return f"{k / n:.2f} [{lo:.2f}, {hi:.2f}]"


def fmt_diff(a: list[float], b: list[float]) -> str:
    d, lo, hi = paired_bootstrap(a, b)
    mark = " *" if lo > 0 or hi < 0 else ""
    return f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]{mark}"


def ablation(tasks: dict, meths: dict, stats: dict) -> list[str]:
    """The paper's ablation at each length where the static plans were measured: uniform window,
    per-head static windows, per-head elastic windows (MoA), each at the same budget."""
    acc = {t: a for t, (a, _, _) in tasks.items()}
    static_lengths = sorted({n for a in acc.values() for n in a.get("static-50", {})})
    if not static_lengths:
        return []
    out = [
        "### ablation (the paper's Table 6 shape): uniform window, per-head static windows searched at "
        "that length, per-head elastic (MoA)",
        "",
        "| length | density | method | density (exact) | passkey | lines | text ppl | repeat ppl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in static_lengths:
        for d in ("50", "25"):
            for m in (f"uniform-{d}", f"static-{d}", f"moa-{d}"):
                row = [str(n), f"{d}%", m, f"{stats.get(m, {}).get(str(n), {}).get('density', float('nan')):.3f}"]
                for t in ("passkey", "lines"):
                    xs = acc.get(t, {}).get(m, {}).get(n)
                    row.append(f"{sum(xs) / len(xs):.2f}" if xs else "-")
                for kind in ("text", "repeat"):
                    c = meths.get(m, {}).get("perplexity", {}).get(kind, {}).get(str(n))
                    row.append(f"{c['ppl']:.2f}" if c else "-")
                out.append("| " + " | ".join(row) + " |")
    out.append("")
    return out


def main(argv: list[str]) -> int:
    res, out_md = Path(argv[0]), Path(argv[1])
    png = Path(argv[2]) if len(argv) > 2 else None
    lines: list[str] = []
    tasks = {}
    for task in ("passkey", "lines"):
        if (res / f"{task}.json").exists():
            tasks[task] = retrieval([res / f"{task}.json", *sorted(res.glob(f"{task}-static-*.json"))])
    for task, (acc, stats, lengths) in tasks.items():
        methods = [m for m in ORDER if m in acc] + [m for m in acc if m not in ORDER]
        n_docs = len(next(iter(acc.values()))[lengths[0]])
        lines += [
            f"### {task} retrieval: accuracy [95% Wilson interval], {n_docs} documents per cell "
            "(static: each length's own plan; mean over the lengths it has)",
            "",
            "| method | " + " | ".join(str(n) for n in lengths) + " | mean |",
            "|---" * (len(lengths) + 2) + "|",
        ]
        for m in methods:
            allx = [x for n in lengths if n in acc[m] for x in acc[m][n]]
            lines.append(
                f"| {m} | "
                + " | ".join(fmt_acc(acc[m][n]) if n in acc[m] else "-" for n in lengths)
                + f" | {fmt_acc(allx)} |"
            )
        lines += [
            "",
            "Paired difference against the uniform window at the same density (same documents; "
            "bootstrap 95% interval; * = interval excludes 0; '-': not measured or not the same density, "
            "mean over the lengths with a difference):",
            "",
            "| method - uniform | " + " | ".join(str(n) for n in lengths) + " | mean |",
            "|---" * (len(lengths) + 2) + "|",
        ]
        for m in methods:
            d = m.rsplit("-", 1)[-1]
            base = f"uniform-{d}"
            if m == base or base not in acc or m == "dense":
                continue
            both = [n for n in lengths if n in acc[m] and n in acc[base] and same_density(stats, m, base, n)]
            allm = [x for n in both for x in acc[m][n]]
            allb = [x for n in both for x in acc[base][n]]
            lines.append(
                f"| {m} - {base} | "
                + " | ".join(fmt_diff(acc[m][n], acc[base][n]) if n in both else "-" for n in lengths)
                + f" | {fmt_diff(allm, allb) if both else '-'} |"
            )
        lines.append("")
    plan_stats = next(iter(tasks.values()))[1] if tasks else {}  # density per method and length
    meths: dict = {}
    if (res / "perplexity.json").exists():
        meths = perplexity([res / "perplexity.json", *sorted(res.glob("perplexity-static-*.json"))])
        methods = [m for m in ORDER if m in meths] + [m for m in meths if m not in ORDER]
        cols = [(kind, n) for kind in meths["dense"]["perplexity"] for n in meths["dense"]["perplexity"][kind]]
        windows = len(meths["dense"]["perplexity"][cols[0][0]][cols[0][1]]["window_nll"])
        lines += [
            f"### perplexity ({windows} held-out windows per cell); in brackets: ratio to the uniform window "
            "at the same density, paired bootstrap 95% interval over the same windows (* = excludes 1)",
            "",
            "| method | " + " | ".join(f"{kind} ppl@{n}" for kind, n in cols) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        for m in methods:
            cells = []
            d = m.rsplit("-", 1)[-1]
            base = f"uniform-{d}"
            for kind, n in cols:
                c = meths[m]["perplexity"].get(kind, {}).get(n)
                if c is None:
                    cells.append("-")
                    continue
                txt = f"{c['ppl']:.2f}"
                if base in meths and m != base and m != "dense" and same_density(plan_stats, m, base, int(n)):
                    b = meths[base]["perplexity"][kind][n]
                    diff, lo, hi = paired_bootstrap(c["window_nll"], b["window_nll"])
                    mark = " *" if lo > 0 or hi < 0 else ""
                    txt += f" ({math.exp(diff):.3f} [{math.exp(lo):.3f}, {math.exp(hi):.3f}]{mark})"
                if m != "dense":
                    dd = meths["dense"]["perplexity"][kind][n]
                    txt += f", {100 * (c['ppl'] / dd['ppl'] - 1):+.1f}% vs dense"
                cells.append(txt)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    if tasks:
        lengths = next(iter(tasks.values()))[2]
        lines += [
            "### what each plan keeps (exact, from the plans)",
            "",
            "| method | " + " | ".join(f"density / KV-cache fraction @{n}" for n in lengths) + " |",
            "|---" * (len(lengths) + 1) + "|",
        ]
        for m in [m for m in ORDER if m in plan_stats]:
            lines.append(
                f"| {m} | "
                + " | ".join(
                    f"{plan_stats[m][str(n)]['density']:.3f} / {plan_stats[m][str(n)]['kv_cache_fraction']:.3f}"
                    if str(n) in plan_stats[m]
                    else "-"
                    for n in lengths
                )
                + " |"
            )
        lines.append("")
        lines += ablation(tasks, meths, plan_stats)
    out_md.write_text("\n".join(lines))
    if png and "passkey" in tasks:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        acc, _, lengths = tasks["passkey"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, d in zip(axes, ("50", "25")):
            for m in ("dense", f"moa-{d}", f"uniform-{d}", f"static-{d}", f"gqa-{d}"):
                if m not in acc:
                    continue
                ns = [n for n in lengths if n in acc[m]]
                ys = [sum(acc[m][n]) / len(acc[m][n]) for n in ns]
                err = [wilson(sum(acc[m][n]), len(acc[m][n])) for n in ns]
                ax.errorbar(
                    ns,
                    ys,
                    yerr=[[y - lo for y, (lo, _) in zip(ys, err)], [hi - y for y, (_, hi) in zip(ys, err)]],
                    marker="o",
                    capsize=3,
                    label=m,
                )
            ax.set_xscale("log", base=2)
            ax.set_title(f"passkey accuracy, density {d}%")
            ax.set_xlabel("tokens")
            ax.legend()
        axes[0].set_ylabel("accuracy (95% Wilson)")
        fig.tight_layout()
        fig.savefig(png, dpi=110)
    print(f"wrote {out_md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
