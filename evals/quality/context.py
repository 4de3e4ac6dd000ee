"""Effective context length (the paper's retrieval measure) and its heatmap.

Effective context length of a method = the largest evaluated length whose accuracy (mean over
needle positions and samples) is at least the threshold (0.9 in the paper). The paper relates it
to the plan's average attention span at that length (MoA: about 3.9x); dense attention's span is
the whole input, so its ratio is 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moa_plan.evals.quality.retrieval import Results, accuracy_table, cell_key
from moa_plan.files import write_atomic

THRESHOLD = 0.9


def accuracy_by_length(
    results: Results, method: str, task: str, lengths: Sequence[int], positions: Sequence[float]
) -> dict[int, float | None]:
    """Mean accuracy over positions (and samples) at each length; None if a cell is missing."""
    out: dict[int, float | None] = {}
    for n in lengths:
        cells = [results.cells.get(cell_key(method, task, n, p)) for p in positions]
        if any(c is None for c in cells):
            out[n] = None
            continue
        correct = [s["correct"] for c in cells for s in c["samples"]]
        out[n] = sum(correct) / len(correct)
    return out


def effective_context(acc: dict[int, float | None], threshold: float = THRESHOLD) -> int | None:
    """Largest length with accuracy >= threshold, or None when no length reaches it."""
    good = [n for n, a in acc.items() if a is not None and a >= threshold]
    return max(good) if good else None


def summarize(
    results: Results, task: str, lengths: Sequence[int], positions: Sequence[float], threshold: float = THRESHOLD
) -> dict[str, Any]:
    """Per method: accuracy by length, effective context, average span there and the ratio."""
    summary: dict[str, Any] = {
        "task": task,
        "threshold": threshold,
        "lengths": list(lengths),
        "positions": list(positions),
        "methods": {},
    }
    for name, info in results.methods.items():
        acc = accuracy_by_length(results, name, task, lengths, positions)
        eff = effective_context(acc, threshold)
        stats = info.get("stats", {})
        at = stats.get(str(eff)) if eff is not None else None
        span = at["avg_span"] if at else None
        summary["methods"][name] = {
            "kind": info.get("kind"),
            "spec": info.get("spec"),
            "accuracy_by_length": {str(n): a for n, a in acc.items()},
            "accuracy": _mean([a for a in acc.values() if a is not None]),
            "density_by_length": {k: v["density"] for k, v in stats.items()},
            "avg_span_by_length": {k: v["avg_span"] for k, v in stats.items()},
            "effective_context": eff,
            "avg_span_at_effective": span,
            "sink": at["sink"] if at else None,
            "ratio": (eff / span) if eff is not None and span else None,
            "grid": accuracy_table(results, name, task, lengths, positions),
        }
    return summary


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(summary: dict[str, Any]) -> str:
    """One row per method: density and accuracy at each length, effective context, span, ratio."""
    lengths = summary["lengths"]
    head = (
        ["method"]
        + [f"acc@{n}" for n in lengths]
        + [f"density@{n}" for n in lengths]
        + ["eff. context", "avg span there", "ratio"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in summary["methods"].items():
        row = [name] + [_fmt(m["accuracy_by_length"].get(str(n))) for n in lengths]
        row += [_fmt(m["density_by_length"].get(str(n))) for n in lengths]
        row += [str(m["effective_context"] or "-"), _fmt(m["avg_span_at_effective"], ".0f"), _fmt(m["ratio"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def heatmap(summary: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Accuracy over (needle position x length), one panel per method, side by side (PNG)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(summary["methods"].items())
    lengths, positions = summary["lengths"], summary["positions"]
    fig, axes = plt.subplots(
        1,
        len(methods),
        figsize=(1.2 + 0.75 * len(lengths) * len(methods) + 1.0 * len(methods), 1.2 + 0.45 * len(positions)),
        squeeze=False,
    )
    image = None
    for ax, (name, m) in zip(axes[0], methods):
        grid = np.array([[np.nan if a is None else a for a in row] for row in m["grid"]], dtype=float)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        for (r, c), a in np.ndenumerate(grid):
            if not np.isnan(a):
                ax.text(c, r, f"{a:.1f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45, fontsize=7)
        ax.set_yticks(range(len(positions)), [f"{p:.0%}" for p in positions], fontsize=7)
        ax.set_xlabel("input length (tokens)", fontsize=8)
        eff = m["effective_context"]
        sub = f"eff. ctx {eff}" if eff else "eff. ctx -"
        if m["ratio"]:
            sub += f", {m['ratio']:.1f}x span"
        ax.set_title(f"{name}\n{sub}", fontsize=8)
    axes[0][0].set_ylabel("needle depth", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, label="accuracy")
    if title:
        fig.suptitle(title, fontsize=9, y=1.08)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buf.getvalue())
