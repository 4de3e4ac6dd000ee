"""Measured block cost: a zeroth-order complement to the first-order influence profile.

First-order influence is a sum over attention entries, so it cannot see what hiding far keys
costs when several layers lose them together. On SmolLM2-135M, retrieving a needle 400+ tokens
back needs long spans in layers 15-24 jointly: any one of those layers narrowed alone costs
little, and far keys carry under 1% of the estimated influence, so a plan searched on the
profile alone narrows them all (search/results/smollm2/run6-holdout/README.md).

This step measures it. For each block of ``block_layers`` consecutive layers and each kept
fraction f in ``FRACTIONS``, every head of the block keeps only the sink and the last f x N
keys (all other layers dense), and the mean answer-loss increase over dense is recorded on the
first ``samples`` profiled samples of each length. ``block_cost`` turns it into a cost per
(head, rule, length) that the optimiser adds to the first-order influence (``--measured-weight``):
an equal share of the block's increase, interpolated at the rule's kept fraction.

Stored in the profile folder as ``measured.json`` (a ``moa_plan.run`` result: one cell per
(length, block, fraction) and the dense loss per length), resumable like the profile, and drawn
as ``measured.png`` (block x fraction heatmaps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moa_plan.errors import UsageError
from moa_plan.run import Run, read_result

MEASURED = "measured.json"
FRACTIONS = (0.125, 0.25, 0.5, 0.75)  # kept fraction of the keys beyond the sink


def blocks_of(num_layers: int, block_layers: int) -> list[range]:
    """Consecutive layer blocks (the last one may be shorter)."""
    return [range(a, min(a + block_layers, num_layers)) for a in range(0, num_layers, block_layers)]


def _key(n: int, block: range | None, f: float | None) -> str:
    return f"{n}|dense" if block is None else f"{n}|L{block.start}-{block.stop - 1}|{f}"


def run_measured(
    model_dir: str,
    shape: Any,
    samples: list[dict[str, Any]],
    out: Path,
    sink: int,
    block_size: int,
    block_layers: int,
    per_length: int,
    device: str = "auto",
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Measure every (length, block, fraction) cell on the first ``per_length`` samples of each
    length; returns the result file."""
    from moa_plan.build import dense_plan
    from moa_plan.plan import Layer, Plan, Rule
    from moa_plan.runtime import load as loader
    from moa_plan.search.loss import plan_losses
    from moa_plan.search.profile import sample_fingerprint

    groups: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault(s["length"], []).append(s)
    groups = {n: g[:per_length] for n, g in sorted(groups.items())}
    blocks = blocks_of(shape.num_layers, block_layers)
    settings = {
        "block_layers": block_layers,
        "fractions": list(FRACTIONS),
        "sink": sink,
        "samples": {str(n): [f"{s['id']}@{sample_fingerprint(s)}" for s in g] for n, g in groups.items()},
        "convention": "loss = mean over the samples of the answer cross-entropy with every head of the "
        "block keeping the sink + the last fraction x N keys, all other layers dense",
    }
    cells = {_key(n, None, None): (n, None, None) for n in groups}
    cells.update({_key(n, b, f): (n, b, f) for n in groups for b in blocks for f in FRACTIONS})
    full = Layer(heads=[Rule(alpha=0.0, beta=1.0)] * shape.num_attention_heads)
    path = Path(out) / MEASURED
    with Run(path, "measured", settings, overwrite=overwrite, quiet=quiet) as run:
        todo = run.todo(cells)
        if todo:
            model, _ = loader.load(model_dir, device=device)
            with run.progress(len(todo), "measure", unit="plan") as bar:
                for key in todo:
                    n, block, f = cells[key]
                    if block is None:
                        plan = dense_plan(shape)
                    else:
                        narrow = Layer(heads=[Rule(alpha=0.0, beta=f)] * shape.num_attention_heads)
                        layers = [narrow if i in block else full for i in range(shape.num_layers)]
                        plan = Plan(format_version=1, model=shape, sink=sink, block_size=block_size, layers=layers)
                    losses = plan_losses(model, plan, groups[n])
                    cell = {"length": n, "loss": sum(losses) / len(losses)}
                    if block is not None:
                        cell.update(layers=[block.start, block.stop - 1], fraction=f)
                    run.put(key, cell)
                    bar.update()
        run.finish(cells)
    from moa_plan.search.plots import measured_png

    measured_png(read_result(path, "measured"), path.with_suffix(".png"))
    return path


def load_measured(folder: Path, profiled_ids: set[str]) -> dict[str, Any] | None:
    """The measurement of a profile folder, or None; refused when it used samples the profile
    no longer has (a stale file from another calibration). Its samples are ``id@token-hash``: a
    re-run on changed samples of the same ids is refused by the run layer as other settings."""
    path = Path(folder) / MEASURED
    if not path.is_file():
        return None
    data = read_result(path, "measured")
    used = {key.split("@")[0] for ids in data["settings"]["samples"].values() for key in ids}
    if not used <= profiled_ids:
        raise UsageError([("--profile", f"{path.name} was measured on samples the profile lacks; measure again")])
    return data


def increases(data: dict[str, Any]) -> dict[int, dict[tuple[int, int], list[float]]]:
    """Per length and block (first, last layer): the loss increase over dense at each of
    ``FRACTIONS`` and at the full span (0), made non-increasing in the kept fraction and
    non-negative (a narrower window never costs less; below-noise gains count as zero)."""
    fr = data["settings"]["fractions"]
    dense = {c["length"]: c["loss"] for c in data["cells"].values() if "fraction" not in c}
    raw: dict[int, dict[tuple[int, int], dict[float, float]]] = {}
    for c in data["cells"].values():
        if "fraction" in c:
            raw.setdefault(c["length"], {}).setdefault(tuple(c["layers"]), {})[c["fraction"]] = (
                c["loss"] - dense[c["length"]]
            )
    out: dict[int, dict[tuple[int, int], list[float]]] = {}
    for n, per_block in raw.items():
        out[n] = {}
        for b, vals in per_block.items():
            env, run_max = [], 0.0
            for f in reversed(fr):  # widest first: the running maximum towards narrower windows
                run_max = max(run_max, vals[f])
                env.append(run_max)
            out[n][b] = list(reversed(env)) + [0.0]
    return out


def interpolate(points: list[float], values: list[float], f: float) -> float:
    """Piecewise-linear ``values`` at kept fraction ``f`` (constant below the first point)."""
    if f <= points[0]:
        return values[0]
    for (f0, v0), (f1, v1) in zip(zip(points, values), zip(points[1:], values[1:])):
        if f <= f1:
            return v0 + (v1 - v0) * (f - f0) / (f1 - f0)
    return values[-1]


def block_cost(data: dict[str, Any], shape: Any, cands: list[Any], n_tokens: dict[int, list[int]]) -> Any:
    """float64 [layers*heads, rules, len(n_tokens)]: per head, its equal share of its block's
    measured loss increase at the rule's kept fraction, averaged over each length's samples
    (``n_tokens``: nominal length -> the token counts of its profiled samples)."""
    import torch

    inc = increases(data)
    points = list(data["settings"]["fractions"]) + [1.0]
    heads = shape.num_attention_heads
    out = torch.zeros(shape.num_layers, heads, len(cands), len(n_tokens), dtype=torch.float64)
    for k, (n, counts) in enumerate(n_tokens.items()):
        if n not in inc:
            raise UsageError([("lengths", f"{MEASURED} has no measurement at length {n}")])
        kept = [sum(min(1.0, c.span(t) / t) for t in counts) / len(counts) for c in cands]  # per rule
        for (a, b), vals in inc[n].items():
            share = 1.0 / ((b - a + 1) * heads)
            for r, f in enumerate(kept):
                out[a : b + 1, :, r, k] = share * interpolate(points, vals, f)
    return out.reshape(shape.num_layers * heads, len(cands), len(n_tokens))
