"""PNG plots of a search: the Pareto front and the span map of a plan (matplotlib Agg, atomic writes)."""

from __future__ import annotations

import io
import os
from typing import Any

from moa_plan.files import write_atomic
from moa_plan.plan import Plan


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_atomic(path, buf.getvalue())


def pareto_png(result: Any, path: str | os.PathLike) -> None:
    """Estimated loss at the first two objective lengths of every solve, Pareto points and the choice."""
    plt = _figure()
    inst = result.instance
    ks = inst.objectives
    kx, ky = (ks[0], ks[1]) if len(ks) > 1 else (ks[0], None)
    val = len(inst.lengths) - 1 if len(inst.lengths) > len(ks) else None
    fig, ax = plt.subplots(figsize=(6, 4.5))

    def yv(s):
        return s.losses[ky] if ky is not None else (s.losses[val] if val is not None else 0.0)

    ax.scatter(
        [s.losses[kx] for s in result.solves],
        [yv(s) for s in result.solves],
        c="lightgray",
        label="weighted-sum solves",
        zorder=1,
    )
    front = result.front
    colors = [s.losses[val] for s in front] if val is not None else None
    sc = ax.scatter(
        [s.losses[kx] for s in front],
        [yv(s) for s in front],
        c=colors,
        cmap="viridis",
        edgecolor="k",
        label="Pareto plans",
        zorder=2,
    )
    if colors is not None:
        fig.colorbar(sc, ax=ax, label=f"estimated loss at validation length {inst.lengths[val]}")
    best = front[result.chosen]
    ax.scatter([best.losses[kx]], [yv(best)], marker="*", s=250, c="red", label="chosen", zorder=3)
    ax.set_xlabel(f"estimated loss increase at N={inst.lengths[kx]}")
    ylabel = (
        f"estimated loss increase at N={inst.lengths[ky]}"
        if ky is not None
        else f"estimated loss at validation N={inst.lengths[val]}"
        if val is not None
        else ""
    )
    ax.set_ylabel(ylabel)
    ax.set_title("Pareto front of the plan search")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def span_map_png(plan: Plan, lengths: list[int], path: str | os.PathLike) -> None:
    """Heatmaps of span / N for every [layer, head] at each given length."""
    plt = _figure()
    fig, axes = plt.subplots(
        1, len(lengths), figsize=(4 * len(lengths), 0.18 * plan.model.num_layers + 2.5), squeeze=False
    )
    for i, (ax, n) in enumerate(zip(axes[0], lengths)):
        spans = plan.spans(n)
        frac = [[s / n for s in row] for row in spans]
        im = ax.imshow(frac, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"span / N at N={n} (density {plan.density(n):.3f})", fontsize=9)
        ax.set_xlabel("head")
        if i == 0:
            ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="span / N")
    _save(fig, path)
    plt.close(fig)


def measured_png(data: dict[str, Any], path: str | os.PathLike) -> None:
    """The measured block cost (``measured.py``): loss increase over dense per layer block (rows)
    and kept fraction (columns), one panel per length."""
    from moa_plan.search.measured import increases

    plt = _figure()
    inc = increases(data)
    fr = data["settings"]["fractions"]
    fig, axes = plt.subplots(1, len(inc), figsize=(3.2 * len(inc) + 1, 4), squeeze=False)
    top = max([max(v) for per in inc.values() for v in per.values()] + [1e-9])
    for ax, (n, per) in zip(axes[0], sorted(inc.items())):
        blocks = sorted(per)
        img = ax.imshow([per[b][: len(fr)] for b in blocks], aspect="auto", cmap="magma_r", vmin=0, vmax=top)
        ax.set_xticks(range(len(fr)), [f"{f:g}" for f in fr])
        ax.set_yticks(range(len(blocks)), [f"L{a}-{b}" for a, b in blocks])
        ax.set_xlabel("kept fraction of the keys")
        ax.set_title(f"N = {n}")
    fig.colorbar(img, ax=axes[0].tolist(), label="answer loss increase over dense")
    _save(fig, path)
    plt.close(fig)
