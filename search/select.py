"""From a profile and a budget to the chosen plan: instance building, Pareto selection, provenance.

Selection: among the Pareto plans, the one with the lowest **measured** loss of the compressed
model on held-out samples at the validation length (``search/loss.py``, as the MoA
reference does), when a model and validation samples are given; otherwise the lowest
*estimated* loss at the validation length (profiled but never an objective), or without a
validation length the lowest sum of range-normalised objectives. The validation length's
density is still *constrained* to the budget, and so is every ``extension`` length (longer than
anything profiled: a constraint only, as the reference adds one at 16k).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from moa_plan import semantics
from moa_plan.plan import Layer, ModelShape, Plan, PlanError, Rule
from moa_plan.search import optimize as opt_mod
from moa_plan.search.pareto import pareto as pareto_front
from moa_plan.search.rules import Candidate, candidate_grid, density_table


@dataclass
class SearchResult:
    plan: Plan
    front: list[opt_mod.Solution]
    solves: list[opt_mod.Solution]
    chosen: int
    instance: opt_mod.Instance
    candidates: list[Candidate]
    plans: list[Plan]  # one per front entry, same order


def build_instance(
    table: Any,
    cands: list[Candidate],
    shape: ModelShape,
    sink: int,
    lengths: list[int],
    objectives: list[int],
    budgets: dict[int, float],
    gqa: bool = False,
    max_rules_per_layer: int | None = None,
    floors: dict[int, float] | None = None,
) -> opt_mod.Instance:
    """An optimiser instance from an influence table [layers*heads, rules, len(lengths)]."""
    heads, layers = shape.num_attention_heads, shape.num_layers
    cost = table.tolist()
    if gqa:
        g = shape.group_size
        units, weight, layer_of = [], [], []
        for l in range(layers):
            for kv in range(shape.num_key_value_heads):
                members = [l * heads + kv * g + i for i in range(g)]
                units.append(
                    [[sum(cost[h][r][k] for h in members) for k in range(len(lengths))] for r in range(len(cands))]
                )
                weight.append(g)
                layer_of.append(l)
        cost = units
    else:
        weight = [1] * (layers * heads)
        layer_of = [u // heads for u in range(layers * heads)]
    return opt_mod.Instance(
        cost=cost,
        dens=density_table(cands, sink, lengths),
        weight=weight,
        layer=layer_of,
        lengths=list(lengths),
        objectives=list(objectives),
        budgets=dict(budgets),
        max_rules_per_layer=max_rules_per_layer,
        floors=dict(floors or {}),
    )


def expand_assignment(assign: list[int], shape: ModelShape, gqa: bool) -> list[list[int]]:
    """Rule index of every [layer][head] from a per-unit assignment."""
    heads = shape.num_attention_heads
    if not gqa:
        return [assign[l * heads : (l + 1) * heads] for l in range(shape.num_layers)]
    g, kvh = shape.group_size, shape.num_key_value_heads
    return [[assign[l * kvh + h // g] for h in range(heads)] for l in range(shape.num_layers)]


def parse_budgets(density: list[float], lengths: list[int]) -> list[float]:
    """One density per length: a single value applies to all."""
    if len(density) == 1:
        density = density * len(lengths)
    if len(density) != len(lengths):
        raise PlanError([("--density", f"give one value or one per length ({len(lengths)}), got {len(density)}")])
    for d in density:
        if not 0 < d <= 1:
            raise PlanError([("--density", f"must be in (0, 1], got {d}")])
    return density


def rule_candidates(
    profiled: list[int],
    extension: list[int],
    sink: int,
    block: int,
    alpha_step: int | None,
    beta_step: float,
    static_windows: bool,
) -> list[Candidate]:
    """The rules the search chooses from: spans >= 1 at every length, <= N at the profiled ones
    (a rule may be dense at a short extension length)."""
    all_lengths = profiled + extension
    if static_windows:  # the ablation of the paper: per-head windows that do not grow with N,
        # on a block-size alpha grid (a coarse one could not reach the budget at short lengths)
        return [c for c in candidate_grid(all_lengths, block, 1.0, cap_lengths=profiled) if c.beta == 0]
    return candidate_grid(all_lengths, alpha_step or block, beta_step, cap_lengths=profiled, origin=-sink)


def check_budgets(
    density: list[float],
    lengths: list[int],
    validation_length: int | None,
    extension_lengths: list[int] | None,
    sink: int,
    block: int,
    alpha_step: int | None,
    beta_step: float,
    static_windows: bool,
) -> tuple[list[int], list[int], dict[int, float]]:
    """The budgets checked against what the rules can reach, before any work: ``(profiled lengths,
    extension lengths, budget per length index)``, or one ``--density`` line per infeasible length.
    Held-out and extension lengths get the tightest budget."""
    lengths = sorted(set(lengths))
    extension = sorted(set(extension_lengths or []) - set(lengths) - {validation_length})
    profiled = lengths + ([validation_length] if validation_length else [])
    budgets_list = parse_budgets(density, lengths)
    budgets = {
        k: (budgets_list[k] if k < len(lengths) else min(budgets_list)) for k in range(len(profiled) + len(extension))
    }
    cands = rule_candidates(profiled, extension, sink, block, alpha_step, beta_step, static_windows)
    problems = []
    for k, n in enumerate(profiled + extension):
        lowest = min(semantics.head_density(c.alpha, c.beta, sink, n) for c in cands)
        if budgets[k] < lowest - 1e-12:
            problems.append(
                (
                    "--density",
                    f"{budgets[k]:g} is infeasible at length {n}: with sink {sink} the "
                    f"sparsest rule there has density {lowest:.4f}",
                )
            )
    if problems:
        raise PlanError(problems)
    return profiled, extension, budgets


def optimize_profile(
    profile: Any,
    density: list[float],
    lengths: list[int] | None = None,
    validation_length: int | None = None,
    solver: str = "glpk",
    time_limit: float | None = None,
    mip_gap: float | None = None,
    steps: int = 4,
    alpha_step: int | None = None,
    beta_step: float = 0.125,
    gqa: bool = False,
    max_rules_per_layer: int | None = 2,
    progress: bool = True,
    density_floor: float | None = 0.9,
    extension_lengths: list[int] | None = None,
    pareto: str = "epsilon",
    static_windows: bool = False,
    measured_weight: float = 0.0,
) -> SearchResult:
    """Search plans from a loaded profile: the Pareto front, one Plan per front entry, and the
    choice by estimated loss (``choose`` may replace it by measured loss)."""
    from moa_plan.search.profile import influence_table

    meta = profile.meta
    shape = ModelShape.model_validate(meta["model_shape"])
    sink, block = int(meta["sink"]), int(meta["block_size"])
    have = profile.lengths
    if lengths is None:
        lengths = [n for n in have if n != validation_length]
    lengths = sorted(set(lengths))
    if validation_length is not None and validation_length in lengths:
        raise PlanError(
            [("--validation-length", f"{validation_length} is also an optimisation length; it must be held out")]
        )
    for n in lengths + ([validation_length] if validation_length else []):
        if n not in have:
            raise PlanError([("lengths", f"length {n} was not profiled (profile has {have})")])
    if not lengths:
        raise PlanError([("lengths", "no optimisation length left (the profile only has the validation length)")])
    profiled, extension, budgets = check_budgets(
        density, lengths, validation_length, extension_lengths, sink, block, alpha_step, beta_step, static_windows
    )
    all_lengths = profiled + extension
    budgets_list = [budgets[k] for k in range(len(lengths))]
    floors = {k: density_floor * b for k, b in budgets.items() if k < len(lengths)} if density_floor else {}
    t0 = time.perf_counter()
    cands = rule_candidates(profiled, extension, sink, block, alpha_step, beta_step, static_windows)
    table = influence_table(profile, cands, profiled, measured_weight)
    if extension:  # constraint-only lengths: no influence, zero cost
        import torch

        table = torch.cat([table, torch.zeros(*table.shape[:2], len(extension), dtype=table.dtype)], dim=-1)
    inst = build_instance(
        table, cands, shape, sink, all_lengths, list(range(len(lengths))), budgets, gqa, max_rules_per_layer, floors
    )
    t_build = time.perf_counter() - t0
    front, solves = pareto_front(inst, solver, steps, time_limit, mip_gap, progress, pareto)
    if validation_length:
        kv = len(lengths)
        chosen = min(range(len(front)), key=lambda i: front[i].losses[kv])
        how = f"lowest estimated loss at the held-out validation length {validation_length}"
    else:
        scales = opt_mod.objective_scales(inst)
        chosen = min(range(len(front)), key=lambda i: sum(front[i].losses[k] / scales[k] for k in inst.objectives))
        how = "lowest sum of range-normalised losses (no validation length given)"

    def lmap(values: dict[int, float]) -> dict[str, float]:
        return {str(all_lengths[k]): round(v, 8) for k, v in values.items()}

    def est(sol: opt_mod.Solution) -> dict[str, float]:
        return {str(all_lengths[k]): round(v, 8) for k, v in sol.losses.items() if k < len(profiled)}

    settings = {
        "tool": "moa-plan search",
        "density": "paper",
        "method": f"MoA attention-influence profile ({meta.get('influence', 'signed')} per-entry effect) + Pyomo "
        f"MILP ({pareto} Pareto front), selection at a held-out length",
        "model": meta.get("model"),
        "budget": {str(n): b for n, b in zip(lengths, budgets_list)},
        "density_floor": density_floor,
        "lengths": lengths,
        "validation_length": validation_length,
        "extension_lengths": extension,
        "candidates": {
            "count": len(cands),
            "alpha_step": block if static_windows else alpha_step or block,
            "alpha_origin": 0 if static_windows else -sink,
            "beta_step": 0 if static_windows else beta_step,
        },
        "gqa_shared_rules": gqa,
        "static_windows": static_windows,
        "max_rules_per_layer": max_rules_per_layer,
        "profile": {
            "samples": len(meta["samples"]),
            "sink": sink,
            "block_size": block,
            "influence": meta.get("influence", "signed"),
            "calibration_settings": {
                k: v
                for k, v in meta.get("calibration_settings", {}).items()
                if k in ("lengths", "samples_per_length", "tasks", "seed", "max_answer_tokens", "chat_template")
            },
        },
        "build_seconds": round(t_build, 3),
    }
    if measured_weight and profile.measured is not None:
        m = profile.measured["settings"]
        settings["method"] += f"; plus measured layer-block cost (weight {measured_weight})"
        settings["profile"]["measured"] = {
            "weight": measured_weight,
            "block_layers": m["block_layers"],
            "fractions": m["fractions"],
            "samples_per_length": {n: len(ids) for n, ids in m["samples"].items()},
        }
    plans = []
    for i, sol in enumerate(front):
        idx = expand_assignment(sol.assign, shape, gqa)
        layers = [Layer(heads=[Rule(alpha=cands[r].alpha, beta=cands[r].beta) for r in row]) for row in idx]
        provenance = {
            **settings,
            "achieved_density": lmap(sol.densities),
            "estimated_loss": est(sol),
            "solver": {
                "name": solver,
                "status": sol.status,
                "termination": sol.termination,
                "gap": sol.gap,
                "gap_source": sol.gap_source,
                "time_limit_s": time_limit,
                "mip_gap": mip_gap,
                "solve_seconds_total": round(sum(s.seconds for s in solves), 3),
                "solves": len(solves),
            },
            "selection": {
                "rule": how,
                "chosen_index": chosen,
                "index": i,
                "pareto_size": len(front),
                "pareto": [{"estimated_loss": est(s), "density": lmap(s.densities)} for s in front],
            },
        }
        plan = Plan(format_version=1, model=shape, sink=sink, block_size=block, layers=layers, provenance=provenance)
        for k, n in enumerate(all_lengths):  # exact check through the plan's own density
            if plan.density(n) > budgets[k] + 1e-9:
                raise PlanError(
                    [("density", f"internal: plan density {plan.density(n)} at {n} over budget {budgets[k]}")]
                )
        plans.append(plan)
    return SearchResult(plans[chosen], front, solves, chosen, inst, cands, plans)


def choose_measured(
    result: SearchResult,
    scores: list[float],
    per_length: list[dict[int, float]],
    counts: dict[int, int],
    validation_length: int,
) -> None:
    """Pick the Pareto plan with the lowest measured score (mean loss ratio to dense over the
    measured lengths; ``per_length`` holds each plan's mean loss there), in place."""
    result.chosen = min(range(len(scores)), key=scores.__getitem__)
    result.plan = result.plans[result.chosen]
    where = ", ".join(f"{counts[n]} at {n}" for n in sorted(counts))
    for plan in result.plans:
        sel = plan.provenance["selection"]
        sel["rule"] = (
            f"lowest measured loss of the compressed model relative to dense, averaged over the held-out "
            f"samples' lengths ({where}; {validation_length} is the validation length, never an objective)"
        )
        sel["chosen_index"] = result.chosen
        for entry, score, losses in zip(sel["pareto"], scores, per_length):
            entry["measured_score"] = round(score, 6)
            entry["measured_loss"] = {str(n): round(v, 6) for n, v in losses.items()}
