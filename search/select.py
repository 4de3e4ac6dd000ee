"""From a profile and a budget to the chosen plan: instance building, Pareto selection, provenance.

Selection (MOA.md step 3): among the Pareto plans, the one with the lowest estimated loss at
the held-out validation length, which is profiled but never an objective. The validation
length's density is still *constrained* to the budget (a constraint is not an objective, and a
plan over budget at an unseen length would be useless). Without a validation length the plan
with the lowest sum of range-normalised objectives is chosen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from moa_plan.plan import Layer, ModelShape, Plan, PlanError, Rule
from moa_plan.search import optimize as opt_mod
from moa_plan.search.rules import Candidate, candidate_grid, density_table


@dataclass
class SearchResult:
    plan: Plan
    front: list[opt_mod.Solution]
    solves: list[opt_mod.Solution]
    chosen: int
    instance: opt_mod.Instance
    candidates: list[Candidate]


def build_instance(table: Any, cands: list[Candidate], shape: ModelShape, sink: int, lengths: list[int],
                   objectives: list[int], budgets: dict[int, float], gqa: bool = False,
                   max_rules_per_layer: int | None = None) -> opt_mod.Instance:
    """An optimiser instance from an influence table [layers*heads, rules, len(lengths)]."""
    heads, layers = shape.num_attention_heads, shape.num_layers
    cost = table.tolist()
    if gqa:
        g = shape.group_size
        units, weight, layer_of = [], [], []
        for l in range(layers):
            for kv in range(shape.num_key_value_heads):
                members = [l * heads + kv * g + i for i in range(g)]
                units.append([[sum(cost[h][r][k] for h in members) for k in range(len(lengths))]
                              for r in range(len(cands))])
                weight.append(g)
                layer_of.append(l)
        cost = units
    else:
        weight = [1] * (layers * heads)
        layer_of = [u // heads for u in range(layers * heads)]
    return opt_mod.Instance(cost=cost, dens=density_table(cands, sink, lengths), weight=weight, layer=layer_of,
                            lengths=list(lengths), objectives=list(objectives), budgets=dict(budgets),
                            max_rules_per_layer=max_rules_per_layer)


def expand_assignment(assign: list[int], shape: ModelShape, gqa: bool) -> list[list[int]]:
    """Rule index of every [layer][head] from a per-unit assignment."""
    heads = shape.num_attention_heads
    if not gqa:
        return [assign[l * heads:(l + 1) * heads] for l in range(shape.num_layers)]
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


def optimize_profile(profile: Any, density: list[float], lengths: list[int] | None = None,
                     validation_length: int | None = None, solver: str = "glpk", time_limit: float | None = None,
                     mip_gap: float | None = None, steps: int = 4, alpha_step: int | None = None,
                     beta_step: float = 0.1, gqa: bool = False, max_rules_per_layer: int | None = None,
                     progress: bool = True) -> SearchResult:
    """Search a plan from a loaded profile (see module docstring for the selection rule)."""
    from moa_plan.search.profile import influence_table

    meta = profile.meta
    shape = ModelShape.model_validate(meta["model_shape"])
    sink, block = int(meta["sink"]), int(meta["block_size"])
    have = profile.lengths
    if lengths is None:
        lengths = [n for n in have if n != validation_length]
    lengths = sorted(set(lengths))
    if validation_length is not None and validation_length in lengths:
        raise PlanError([("--validation-length", f"{validation_length} is also an optimisation length; "
                          "it must be held out")])
    for n in lengths + ([validation_length] if validation_length else []):
        if n not in have:
            raise PlanError([("lengths", f"length {n} was not profiled (profile has {have})")])
    if not lengths:
        raise PlanError([("lengths", "no optimisation length left (the profile only has the validation length)")])
    all_lengths = lengths + ([validation_length] if validation_length else [])
    budgets_list = parse_budgets(density, lengths)
    budgets = {k: b for k, b in enumerate(budgets_list)}
    if validation_length:
        budgets[len(lengths)] = min(budgets_list)
    t0 = time.perf_counter()
    cands = candidate_grid(all_lengths, alpha_step or block, beta_step)
    table = influence_table(profile, cands, all_lengths)
    inst = build_instance(table, cands, shape, sink, all_lengths, list(range(len(lengths))), budgets, gqa,
                          max_rules_per_layer)
    t_build = time.perf_counter() - t0
    front, solves = opt_mod.pareto(inst, solver, steps, time_limit, mip_gap, progress)
    if validation_length:
        kv = len(lengths)
        chosen = min(range(len(front)), key=lambda i: front[i].losses[kv])
        how = f"lowest estimated loss at the held-out validation length {validation_length}"
    else:
        scales = opt_mod.objective_scales(inst)
        chosen = min(range(len(front)), key=lambda i: sum(front[i].losses[k] / scales[k] for k in inst.objectives))
        how = "lowest sum of range-normalised losses (no validation length given)"
    best = front[chosen]
    idx = expand_assignment(best.assign, shape, gqa)
    layers = [Layer(heads=[Rule(alpha=cands[r].alpha, beta=cands[r].beta) for r in row]) for row in idx]

    def lmap(values: dict[int, float]) -> dict[str, float]:
        return {str(all_lengths[k]): round(v, 8) for k, v in values.items()}

    provenance = {
        "tool": "moa-plan search",
        "density": "paper",
        "method": "MoA attention-influence profile + Pyomo MILP (weighted sums over a simplex weight grid, "
                  "Pareto filter, selection at a held-out length)",
        "model": meta.get("model"),
        "budget": {str(n): b for n, b in zip(lengths, budgets_list)},
        "validation_budget": budgets.get(len(lengths)) if validation_length else None,
        "lengths": lengths,
        "validation_length": validation_length,
        "achieved_density": lmap(best.densities),
        "estimated_loss": lmap(best.losses),
        "solver": {"name": solver, "status": best.status, "termination": best.termination, "gap": best.gap,
                   "gap_source": best.gap_source,
                   "time_limit_s": time_limit, "mip_gap": mip_gap,
                   "solve_seconds_total": round(sum(s.seconds for s in solves), 3), "solves": len(solves)},
        "selection": {"rule": how, "chosen_index": chosen, "weights": best.weights, "pareto_size": len(front),
                      "pareto": [{"weights": s.weights, "loss": lmap(s.losses), "density": lmap(s.densities)}
                                 for s in front]},
        "candidates": {"count": len(cands), "alpha_step": alpha_step or block, "beta_step": beta_step},
        "gqa_shared_rules": gqa,
        "max_rules_per_layer": max_rules_per_layer,
        "profile": {"samples": len(meta["samples"]), "sink": sink, "block_size": block,
                    "calibration_settings": {k: v for k, v in meta.get("calibration_settings", {}).items()
                                             if k in ("lengths", "samples_per_length", "tasks", "seed",
                                                      "max_answer_tokens", "chat_template")}},
        "build_seconds": round(t_build, 3),
    }
    plan = Plan(format_version=1, model=shape, sink=sink, block_size=block, layers=layers, provenance=provenance)
    for k, n in enumerate(all_lengths):  # exact check through the plan's own density
        if plan.density(n) > budgets[k] + 1e-9:
            raise PlanError([("density", f"internal: plan density {plan.density(n)} at {n} over budget {budgets[k]}")])
    return SearchResult(plan, front, solves, chosen, inst, cands)
