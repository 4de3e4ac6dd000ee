"""Plans made without a search: the uniform StreamingLLM baseline and the MoA reference format.

The published MoA plans (thu-nics/MoA, ``*_alpha_beta.json``) are a bare JSON object
``{"alphas": [[per head] per layer], "betas": [[...]]}`` with alphas in tokens; they carry no
shape, sink or block size, so importing one needs the model's shape.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from moa_plan import semantics
from moa_plan.plan import FORMAT_VERSION, MAX_LENGTH, Layer, ModelShape, Plan, PlanError, Rule

MOA_REFERENCE_SINK = 64


def uniform_span(density: float, length: int, sink: int) -> int:
    """Largest span whose exact density at ``length`` is <= ``density`` (PlanError if none is)."""
    if not (isinstance(length, int) and 1 <= length <= MAX_LENGTH):
        raise PlanError([("length", f"must be an integer in [1, {MAX_LENGTH}], got {length!r}")])
    if not (isinstance(density, (int, float)) and math.isfinite(density) and 0 < density <= 1):
        raise PlanError([("density", f"must be in (0, 1], got {density!r}")])
    budget = Fraction(density) * semantics.causal_pairs(length)  # exact: pairs <= density * causal

    def fits(s: int) -> bool:
        return semantics.visible_pairs(s, sink, length) <= budget

    if not fits(1):
        least = semantics.visible_pairs(1, sink, length) / semantics.causal_pairs(length)
        raise PlanError([("density", f"{density} is below the least density a head can have at "
                          f"N={length} with sink={sink}: span 1 already gives {least:.6g}")])
    lo, hi = 1, length  # fits(lo) holds; visible_pairs is non-decreasing in the span
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _check_settings(sink: int, block_size: int) -> None:
    problems = []
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        problems.append(("sink", f"must be an integer >= 0, got {sink!r}"))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        problems.append(("block_size", f"must be an integer >= 1, got {block_size!r}"))
    if problems:
        raise PlanError(problems)


def uniform_plan(shape: ModelShape, density: float, length: int, sink: int = 64,
                 block_size: int = 64) -> Plan:
    """StreamingLLM baseline: every head gets the same fixed span (beta 0), the largest whose
    exact density at ``length`` stays within ``density``."""
    _check_settings(sink, block_size)
    s = uniform_span(density, length, sink)
    plan = Plan(format_version=FORMAT_VERSION, model=shape, sink=sink, block_size=block_size,
                default=Rule(alpha=float(s), beta=0.0), provenance={})
    plan.provenance.update({
        "method": "uniform (StreamingLLM: sink + fixed window, beta 0)",
        "target_density": {str(length): density},
        "achieved_density": {str(length): plan.density(length)},
        "span": s,
    })
    return plan


def _number_problems(values: Any, name: str, shape: ModelShape, unit: bool) -> list[tuple[str, str]]:
    """Located problems of one [layer][head] array of numbers."""
    if not isinstance(values, list):
        return [(name, "must be a list of per-layer lists")]
    problems = []
    if len(values) != shape.num_layers:
        problems.append((name, f"has {len(values)} layers, the model has {shape.num_layers}"))
    for l, row in enumerate(values):
        if not isinstance(row, list):
            problems.append((f"{name}[{l}]", "must be a list of per-head numbers"))
            continue
        if len(row) != shape.num_attention_heads:
            problems.append((f"{name}[{l}]", f"has {len(row)} heads, the model has {shape.num_attention_heads}"))
        for h, x in enumerate(row):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                problems.append((f"{name}[{l}][{h}]", f"must be a finite number, got {x!r}"))
            elif unit and not 0 <= x <= 1:
                problems.append((f"{name}[{l}][{h}]", f"must be in [0, 1], got {x!r}"))
    return problems


def plan_from_moa(data: Any, shape: ModelShape, sink: int = MOA_REFERENCE_SINK, block_size: int = 64) -> Plan:
    """A plan from a MoA reference ``{"alphas": ..., "betas": ...}`` object for this shape."""
    _check_settings(sink, block_size)
    if not isinstance(data, dict):
        raise PlanError([("", "a MoA plan must be a JSON object with 'alphas' and 'betas'")])
    problems = [(key, "required field is missing") for key in ("alphas", "betas") if key not in data]
    if problems:
        raise PlanError(problems)
    problems = (_number_problems(data["alphas"], "alphas", shape, unit=False)
                + _number_problems(data["betas"], "betas", shape, unit=True))
    if problems:
        raise PlanError(problems[:50])
    layers = [Layer(heads=[Rule(alpha=float(a), beta=float(b)) for a, b in zip(al, bl)])
              for al, bl in zip(data["alphas"], data["betas"])]
    provenance: dict[str, Any] = {"method": "imported from the MoA reference format (alphas, betas)"}
    extra = sorted(str(k) for k in data if k not in ("alphas", "betas"))
    if extra:
        provenance["ignored_keys"] = extra
    return Plan(format_version=FORMAT_VERSION, model=shape, sink=sink, block_size=block_size,
                layers=layers, provenance=provenance)


def plan_to_moa(plan: Plan) -> dict[str, list[list[float]]]:
    """The MoA reference form of a plan: per-layer, per-head alphas and betas (the reference
    runtime assumes 64 sink tokens; the plan's ``sink`` is not part of this format)."""
    return {"alphas": [[float(a) for a in row] for row in plan.alphas()],
            "betas": [[float(b) for b in row] for row in plan.betas()]}
