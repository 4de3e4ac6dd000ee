"""Plans made without a search: the uniform StreamingLLM baseline and the MoA reference format.

The published MoA plans (thu-nics/MoA, ``*_alpha_beta.json``) are a bare JSON object
``{"alphas": [[per head] per layer], "betas": [[...]]}`` with alphas in tokens; they carry no
shape, sink or block size, so importing one needs the model's shape.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

from moa_plan.io import load_plan
from moa_plan.model_config import check_fits
from moa_plan.plan import FORMAT_VERSION, MAX_LENGTH, Layer, ModelShape, Plan, PlanError, Rule

MOA_REFERENCE_SINK = 64


def _plan(shape: ModelShape, sink: int, block_size: int, provenance: dict[str, Any], **rules: Any) -> Plan:
    """A plan of this format version; ``rules`` is ``default=`` or ``layers=``."""
    return Plan(
        format_version=FORMAT_VERSION, model=shape, sink=sink, block_size=block_size, provenance=provenance, **rules
    )


def _check_density(density: float) -> None:
    if isinstance(density, bool) or not (
        isinstance(density, (int, float)) and math.isfinite(density) and 0 < density <= 1
    ):
        raise PlanError([("density", f"must be in (0, 1], got {density!r}")])


def _check_length(length: int, name: str = "length") -> None:
    if isinstance(length, bool) or not (isinstance(length, int) and 1 <= length <= MAX_LENGTH):
        raise PlanError([(name, f"must be an integer in [1, {MAX_LENGTH}], got {length!r}")])


def uniform_span(density: float, length: int, sink: int) -> int:
    """Largest span whose density at ``length`` is <= ``density``: floor(density * length) - sink
    (PlanError if even span 1 is over the budget)."""
    _check_length(length)
    _check_density(density)
    keys = math.floor(Fraction(density) * length)  # exact: attended keys <= d * N
    span_ = length if keys >= length else keys - sink
    if span_ < 1:
        raise PlanError(
            [
                (
                    "density",
                    f"{density} is below the least density a head can have at "
                    f"N={length} with sink={sink}: span 1 already gives {(sink + 1) / length:.6g}",
                )
            ]
        )
    return span_


def uniform_exact_from(density: float, sink: int) -> int:
    """Smallest length from which the elastic uniform plan's density is ``density`` (within 1/N):
    below it the window would need fewer than one token beside the sink."""
    return math.ceil((sink + 1) / Fraction(density))


def _check_settings(sink: int, block_size: int) -> None:
    problems = []
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        problems.append(("sink", f"must be an integer >= 0, got {sink!r}"))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        problems.append(("block_size", f"must be an integer >= 1, got {block_size!r}"))
    if problems:
        raise PlanError(problems)


def uniform_plan(
    shape: ModelShape, density: float, sink: int = 64, block_size: int = 64, static_length: int | None = None
) -> Plan:
    """StreamingLLM baseline with the same rule for every head.

    Elastic (default, as the MoA reference's StreamingLLM baseline): alpha = -sink, beta =
    ``density``, so ``min(N, sink + span) / N`` = floor(density * N) / N at every N from
    ``uniform_exact_from(density, sink)`` on. With ``static_length``: one fixed window (beta 0),
    the largest whose density at that length is within ``density`` (a constant-size cache).
    """
    _check_settings(sink, block_size)
    _check_density(density)
    if static_length is None:
        rule = Rule(alpha=float(-sink), beta=float(density))
        provenance = {
            "method": "uniform (StreamingLLM, elastic: sink + a window of density*N - sink)",
            "density": "paper",
            "target_density": density,
            "exact_from_length": uniform_exact_from(density, sink),
        }
    else:
        _check_length(static_length, "static_length")
        span_ = uniform_span(density, static_length, sink)
        rule = Rule(alpha=float(span_), beta=0.0)
        provenance = {
            "method": "uniform (StreamingLLM, static: sink + one fixed window)",
            "density": "paper",
            "target_density": {str(static_length): density},
            "span": span_,
        }
    return _plan(shape, sink, block_size, provenance, default=rule)


def dense_plan(shape: ModelShape) -> Plan:
    """Every head sees every earlier key (span = N, no sink): the model's own causal attention."""
    return Plan(
        format_version=FORMAT_VERSION,
        model=shape,
        sink=0,
        default=Rule(alpha=0.0, beta=1.0),
        provenance={"method": "dense"},
    )


PLAN_SPEC_HELP = "a plan file, 'dense', 'uniform:<density>' (elastic) or 'uniform:<density>@<length>' (static)"


def plan_from_spec(text: str, shape: ModelShape, where: str = "plan") -> Plan:
    """The one grammar of plan strings: ``dense``, ``uniform:<d>``, ``uniform:<d>@<N>``, or a
    plan file path (loaded and checked against ``shape``)."""
    text = str(text)
    if text == "dense":
        return dense_plan(shape)
    if text.startswith("uniform:"):
        density_text, at, length_text = text.removeprefix("uniform:").partition("@")
        try:
            density = float(density_text)
            length = int(length_text) if at else None
        except ValueError:
            raise PlanError([(where, f"{text!r}: expected uniform:<density> or uniform:<density>@<length>")]) from None
        try:
            return uniform_plan(shape, density, static_length=length)
        except PlanError as exc:
            raise PlanError([(where, f"{text!r}: {loc}: {msg}") for loc, msg in exc.problems]) from None
    plan = load_plan(text)
    try:
        check_fits(plan, shape)
    except PlanError as exc:
        raise PlanError(exc.problems, source=text) from None
    return plan


def plan_for_pretrained(plan: Any, pretrained: Any) -> Any:
    """Read and check a plan before a model is loaded from ``pretrained``: for a local model folder
    its config.json (bounded) gives the shape, and the plan string is resolved and fitted to it;
    otherwise a plan file is at least read and validated. A Plan is returned as it is."""
    if isinstance(plan, Plan):
        return plan
    text = str(plan)
    if isinstance(pretrained, (str, os.PathLike)) and Path(pretrained).is_dir():
        from moa_plan.model_config import load_model_shape

        return plan_from_spec(text, load_model_shape(pretrained))
    return plan if is_plan_name(text) else load_plan(text)


def is_plan_name(text: str) -> bool:
    """Whether a plan string names a built plan ('dense', 'uniform:...') rather than a file."""
    return text == "dense" or text.startswith("uniform:")


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
        low, high = (0, 1) if unit else (-MAX_LENGTH, MAX_LENGTH)
        for h, x in enumerate(row):
            if not _is_number(x):
                problems.append((f"{name}[{l}][{h}]", f"must be a finite number, got {_shown(x)}"))
            elif not low <= x <= high:
                problems.append((f"{name}[{l}][{h}]", f"must be in [{low}, {high}], got {_shown(x)}"))
    return problems


def _is_number(x: Any) -> bool:
    """A finite JSON number that converts to a double (an integer literal of 400 digits does not)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _shown(x: Any) -> str:
    """A value for an error line: repr, cut short (a huge integer or string stays one short line)."""
    text = repr(x) if not isinstance(x, int) or abs(x) < 10**30 else f"an integer of {len(str(abs(x)))} digits"
    return text if len(text) <= 40 else text[:37] + "..."


def plan_from_moa(data: Any, shape: ModelShape, sink: int = MOA_REFERENCE_SINK, block_size: int = 64) -> Plan:
    """A plan from a MoA reference ``{"alphas": ..., "betas": ...}`` object for this shape."""
    _check_settings(sink, block_size)
    if not isinstance(data, dict):
        raise PlanError([("", "a MoA plan must be a JSON object with 'alphas' and 'betas'")])
    problems = [(key, "required field is missing") for key in ("alphas", "betas") if key not in data]
    if problems:
        raise PlanError(problems)
    problems = _number_problems(data["alphas"], "alphas", shape, unit=False) + _number_problems(
        data["betas"], "betas", shape, unit=True
    )
    if problems:
        raise PlanError(problems[:50])
    layers = [
        Layer(heads=[Rule(alpha=float(a), beta=float(b)) for a, b in zip(al, bl)])
        for al, bl in zip(data["alphas"], data["betas"])
    ]
    provenance: dict[str, Any] = {"method": "imported from the MoA reference format (alphas, betas)"}
    extra = sorted(str(k) for k in data if k not in ("alphas", "betas"))
    if extra:
        provenance["ignored_keys"] = extra
    return _plan(shape, sink, block_size, provenance, layers=layers)


def plan_to_moa(plan: Plan) -> dict[str, list[list[float]]]:
    """The MoA reference form of a plan: per-layer, per-head alphas and betas (the reference
    runtime assumes 64 sink tokens; the plan's ``sink`` is not part of this format)."""
    return {
        "alphas": [[float(a) for a in row] for row in plan.alphas()],
        "betas": [[float(b) for b in row] for row in plan.betas()],
    }
