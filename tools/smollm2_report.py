"""The SmolLM2 quality report from the eval stage's result files (tools/smollm2_gpu.sh eval):
retrieval accuracy with Wilson intervals, paired differences against the uniform window at the
same density (bootstrap over the same documents), perplexity with a paired bootstrap over the
same text windows, and a PNG of passkey accuracy by length.

    python tools/smollm2_report.py RESULTS_DIR OUT.md [OUT.png]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from moa_plan.evals.stats import paired_bootstrap, wilson

ORDER = ["dense", "moa-50", "uniform-50", "gqa-50", "signed-50", "moa-25", "uniform-25", "gqa-25"]


def _name(key: str) -> str:  # the eval names the uniform baseline after the plan it matches
    return {"uniform~smollm2-135m-moa-50": "uniform-50", "uniform~smollm2-135m-moa-25": "uniform-25"}.get(key, key)


def retrieval(path: Path) -> tuple[dict, dict, list[int]]:
    """{method: {length: [correct per document, in a fixed document order]}}, stats, lengths."""
    data = json.loads(path.read_text())
    out: dict[str, dict[int, list[float]]] = {}
    for cell in data["cells"].values():
        m, n = _name(cell["method"]), int(cell["length"])
        out.setdefault(m, {}).setdefault(n, []).extend(
            (cell["position"], i, s["correct"]) for i, s in enumerate(cell["samples"])
        )
    for m in out:
        for n in out[m]:
            out[m][n] = [c for *_, c in sorted(out[m][n])]
    stats = {_name(k): v.get("stats", {}) for k, v in data["methods"].items()}
    lengths = sorted({n for m in out.values() for n in m})
    return out, stats, lengths


def fmt_acc(xs: list[float]) -> str:
    k, n = sum(xs), len(xs)
    lo, hi = wilson(k, n)
    return f"{k / n:.2f} [{lo:.2f}, {hi:.2f}]"


def fmt_diff(a: list[float], b: list[float]) -> str:
    d, lo, hi = paired_bootstrap(a, b)
    mark = " *" if lo > 0 or hi < 0 else ""
    return f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]{mark}"


def main(argv: list[str]) -> int:
    res, out_md = Path(argv[0]), Path(argv[1])
    png = Path(argv[2]) if len(argv) > 2 else None
    lines: list[str] = []
    tasks = {}
    for task in ("passkey", "lines"):
        if (res / f"{task}.json").exists():
            tasks[task] = retrieval(res / f"{task}.json")
    for task, (acc, stats, lengths) in tasks.items():
        methods = [m for m in ORDER if m in acc] + [m for m in acc if m not in ORDER]
        n_docs = len(next(iter(acc.values()))[lengths[0]])
        lines += [
            f"### {task} retrieval: accuracy [95% Wilson interval], {n_docs} documents per cell",
            "",
            "| method | " + " | ".join(str(n) for n in lengths) + " | mean |",
            "|---" * (len(lengths) + 2) + "|",
        ]
        for m in methods:
            allx = [x for n in lengths for x in acc[m][n]]
            lines.append(f"| {m} | " + " | ".join(fmt_acc(acc[m][n]) for n in lengths) + f" | {fmt_acc(allx)} |")
        lines += [
            "",
            "Paired difference against the uniform window at the same density (same documents; "
            "bootstrap 95% interval; * = interval excludes 0):",
            "",
            "| method - uniform | " + " | ".join(str(n) for n in lengths) + " | mean |",
            "|---" * (len(lengths) + 2) + "|",
        ]
        for m in methods:
            d = m.rsplit("-", 1)[-1]
            base = f"uniform-{d}"
            if m == base or base not in acc or m == "dense":
                continue
            allm = [x for n in lengths for x in acc[m][n]]
            allb = [x for n in lengths for x in acc[base][n]]
            lines.append(
                f"| {m} - {base} | "
                + " | ".join(fmt_diff(acc[m][n], acc[base][n]) for n in lengths)
                + f" | {fmt_diff(allm, allb)} |"
            )
        lines.append("")
    if (res / "perplexity.json").exists():
        data = json.loads((res / "perplexity.json").read_text())
        meths = {_name(k): v for k, v in data["methods"].items()}
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
                c = meths[m]["perplexity"][kind][n]
                txt = f"{c['ppl']:.2f}"
                if base in meths and m != base and m != "dense":
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
        _, stats, lengths = next(iter(tasks.values()))
        lines += [
            "### what each plan keeps (exact, from the plans)",
            "",
            "| method | " + " | ".join(f"density / KV-cache fraction @{n}" for n in lengths) + " |",
            "|---" * (len(lengths) + 1) + "|",
        ]
        for m in [m for m in ORDER if m in stats]:
            lines.append(
                f"| {m} | "
                + " | ".join(
                    f"{stats[m][str(n)]['density']:.3f} / {stats[m][str(n)]['kv_cache_fraction']:.3f}" for n in lengths
                )
                + " |"
            )
        lines.append("")
    out_md.write_text("\n".join(lines))
    if png and "passkey" in tasks:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        acc, _, lengths = tasks["passkey"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, d in zip(axes, ("50", "25")):
            for m in ("dense", f"moa-{d}", f"uniform-{d}", f"gqa-{d}"):
                if m not in acc:
                    continue
                ys = [sum(acc[m][n]) / len(acc[m][n]) for n in lengths]
                err = [wilson(sum(acc[m][n]), len(acc[m][n])) for n in lengths]
                ax.errorbar(
                    lengths,
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
