"""The plan optimiser: a Pyomo MILP choosing one candidate rule per head (or per KV group).

Variables: binary x[u, r], unit u = one query head (or, in GQA mode, one KV group whose query
heads share a rule), r = candidate rule; ``sum_r x[u, r] == 1``. For every constrained length
N_k: ``sum_{u,r} heads(u) * density_r(N_k) * x[u, r] <= d_k * total_heads`` (plan density is the
mean over heads). Optional: at most ``max_rules_per_layer`` distinct rules per layer (binary
y[l, r] >= x[u, r]).

Optional lower bounds ``floors[k]`` on the density (the reference keeps each length within
0.9x-1x of the budget, so the budget is used rather than left on the table).

Multi-objective problems are solved as several weighted MILPs (one ``solve`` each); the front
over them is built in ``pareto.py``, the solver programs are found and configured in ``solvers.py``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moa_plan.plan import PlanError
from moa_plan.search.solvers import (
    SOLVER_ALIASES,
    apply_limits,
    glpk_log_gap,
    make_solver,
    result_gap,
    takes_warm_start,
)

DENSITY_TOL = 1e-9  # absolute: the plan's exact density may exceed its budget by float rounding only


@dataclass
class Instance:
    """One optimisation problem. ``cost[u][r][k]``, ``dens[r][k]`` over all ``lengths``."""

    cost: list[list[list[float]]]
    dens: list[list[float]]
    weight: list[int]
    layer: list[int]
    lengths: list[int]
    objectives: list[int]
    budgets: dict[int, float]
    max_rules_per_layer: int | None = None
    floors: dict[int, float] = field(default_factory=dict)

    @property
    def total_heads(self) -> int:
        return sum(self.weight)

    def loss(self, assign: list[int], k: int) -> float:
        return sum(self.cost[u][r][k] for u, r in enumerate(assign))

    def density(self, assign: list[int], k: int) -> float:
        return sum(self.weight[u] * self.dens[r][k] for u, r in enumerate(assign)) / self.total_heads


@dataclass
class Solution:
    assign: list[int]
    weights: list[float]
    status: str
    termination: str
    gap: float | None
    seconds: float
    losses: dict[int, float] = field(default_factory=dict)
    densities: dict[int, float] = field(default_factory=dict)
    gap_source: str = "solver"


def min_density(inst: Instance, k: int) -> float:
    """Smallest mean density reachable at length k (every unit on its sparsest rule)."""
    return min(row[k] for row in inst.dens)


class Infeasible(PlanError):
    """No plan meets the constraints (budgets, floors, epsilon bounds) together."""


def check_feasible(inst: Instance) -> None:
    """Per-length infeasibility: a located error naming the smallest achievable density."""
    problems = []
    for k, budget in inst.budgets.items():
        lo = min_density(inst, k)
        if budget < lo - 1e-12:
            problems.append(
                (
                    f"density at length {inst.lengths[k]}",
                    f"budget {budget:.4f} is infeasible: the smallest achievable density with these "
                    f"candidate rules and sink is {lo:.4f}",
                )
            )
    for k, floor in inst.floors.items():
        hi = max(row[k] for row in inst.dens)
        if floor > hi + 1e-12:
            problems.append(
                (
                    f"density at length {inst.lengths[k]}",
                    f"floor {floor:.4f} is above the largest achievable density {hi:.4f}",
                )
            )
    if problems:
        raise Infeasible(problems)


def satisfies(inst: Instance, assign: list[int], eps: dict[int, float] | None = None) -> bool:
    """Whether an assignment meets every constraint of the instance (and the epsilon bounds)."""
    for k, budget in inst.budgets.items():
        if inst.density(assign, k) > budget + DENSITY_TOL:
            return False
    for k, floor in inst.floors.items():
        if inst.density(assign, k) < floor - DENSITY_TOL:
            return False
    for k, bound in (eps or {}).items():
        if inst.loss(assign, k) > bound:
            return False
    cap = inst.max_rules_per_layer
    if cap is not None:
        per_layer: dict[int, set[int]] = {}
        for u, r in enumerate(assign):
            per_layer.setdefault(inst.layer[u], set()).add(r)
        if any(len(rs) > cap for rs in per_layer.values()):
            return False
    return True


def feasible_start(
    inst: Instance, objective: list[float], known: list[list[int]], eps: dict[int, float] | None = None
) -> list[int] | None:
    """The best known plan meeting every constraint, as a MIP start: earlier solutions, and every
    plan giving all units one rule that meets the budgets and floors on its own (the uniform
    window is one). A time-limited solve then never ends without a plan when one is known."""
    units = len(inst.cost)
    pool = [a for a in known if len(a) == units]
    for r, row in enumerate(inst.dens):
        if all(row[k] <= b + DENSITY_TOL for k, b in inst.budgets.items()) and all(
            row[k] >= f - DENSITY_TOL for k, f in inst.floors.items()
        ):
            pool.append([r] * units)
    best, best_value = None, math.inf
    for a in pool:
        if satisfies(inst, a, eps):
            value = sum(objective[u * len(inst.dens) + r] for u, r in enumerate(a))
            if value < best_value:
                best, best_value = a, value
    return best


def build_model(inst: Instance) -> Any:
    """The Pyomo model of an instance, without objective."""
    import pyomo.environ as pyo
    from pyomo.core.expr.numeric_expr import LinearExpression

    units, rules = len(inst.cost), len(inst.dens)
    m = pyo.ConcreteModel()
    m.U = pyo.RangeSet(0, units - 1)
    m.R = pyo.RangeSet(0, rules - 1)
    m.x = pyo.Var(m.U, m.R, domain=pyo.Binary)
    m.one = pyo.Constraint(m.U, rule=lambda m, u: sum(m.x[u, r] for r in range(rules)) == 1)
    total = inst.total_heads
    m.density = pyo.ConstraintList()
    for k, budget in sorted(inst.budgets.items()):
        coefs, xs = [], []
        for u in range(units):
            for r in range(rules):
                coefs.append(inst.weight[u] * inst.dens[r][k])
                xs.append(m.x[u, r])
        expr = LinearExpression(constant=0.0, linear_coefs=coefs, linear_vars=xs)
        # exactly the budget (no margin below it: the elastic StreamingLLM rule meets it exactly);
        # the returned plan is re-checked from its exact densities in ``solve``
        m.density.add(expr <= budget * total)
    for k, floor in sorted(inst.floors.items()):
        expr = LinearExpression(
            constant=0.0,
            linear_coefs=[inst.weight[u] * inst.dens[r][k] for u in range(units) for r in range(rules)],
            linear_vars=[m.x[u, r] for u in range(units) for r in range(rules)],
        )
        m.density.add(expr >= floor * total)
    m.eps = pyo.ConstraintList()  # epsilon bounds of one solve, refilled by solve()
    cap = inst.max_rules_per_layer
    if cap is not None:
        if cap < 1:
            raise PlanError([("--max-rules-per-layer", "must be >= 1")])
        layers = sorted(set(inst.layer))
        m.L = pyo.Set(initialize=layers)
        m.y = pyo.Var(m.L, m.R, domain=pyo.Binary)
        m.link = pyo.Constraint(m.U, m.R, rule=lambda m, u, r: m.x[u, r] <= m.y[inst.layer[u], r])
        m.cap = pyo.Constraint(m.L, rule=lambda m, l: sum(m.y[l, r] for r in range(rules)) <= cap)
    return m


def objective_scales(inst: Instance) -> dict[int, float]:
    """Range of each objective over the instance (best-per-unit vs worst-per-unit sums)."""
    scales = {}
    for k in inst.objectives:
        lo = sum(min(c[k] for c in row) for row in inst.cost)
        hi = sum(max(c[k] for c in row) for row in inst.cost)
        scales[k] = max(hi - lo, 1e-12)
    return scales


def _set_objective(
    m: Any, inst: Instance, weights: list[float], scales: dict[int, float], eps: dict[int, float] | None = None
) -> list[float]:
    """Set the weighted objective (and the epsilon bounds); returns its coefficients, unit-major."""
    import pyomo.environ as pyo
    from pyomo.core.expr.numeric_expr import LinearExpression

    if hasattr(m, "obj"):
        m.del_component(m.obj)
    if hasattr(m, "eps"):
        m.eps.clear()
        for k, bound in sorted((eps or {}).items()):
            m.eps.add(
                LinearExpression(
                    constant=0.0,
                    linear_coefs=[c[k] for row in inst.cost for c in row],
                    linear_vars=[m.x[u, r] for u, row in enumerate(inst.cost) for r in range(len(row))],
                )
                <= bound
            )
    coefs, xs = [], []
    for u, row in enumerate(inst.cost):
        for r, c in enumerate(row):
            coefs.append(sum(w * c[k] / scales[k] for w, k in zip(weights, inst.objectives)))
            xs.append(m.x[u, r])
    m.obj = pyo.Objective(expr=LinearExpression(constant=0.0, linear_coefs=coefs, linear_vars=xs), sense=pyo.minimize)
    return coefs


def _load_start(m: Any, inst: Instance, assign: list[int]) -> None:
    """Set the model's variables to an assignment (a MIP start, or the kept plan)."""
    for u in range(len(inst.cost)):
        for r in range(len(inst.dens)):
            m.x[u, r].set_value(1 if assign[u] == r else 0)
    if hasattr(m, "y"):
        used = {(inst.layer[u], r) for u, r in enumerate(assign)}
        for layer, r in m.y:
            m.y[layer, r].set_value(1 if (layer, r) in used else 0)


def solve(
    inst: Instance,
    weights: list[float],
    solver: str = "glpk",
    time_limit: float | None = None,
    mip_gap: float | None = None,
    model: Any = None,
    opt: Any = None,
    eps: dict[int, float] | None = None,
    known: list[list[int]] | None = None,
) -> Solution:
    """Solve one weighted MILP (with ``loss_k <= eps[k]`` bounds if given); a time limit keeps the
    best feasible solution and reports its gap. The best feasible plan among ``known`` and the
    one-rule plans is the MIP start where the solver takes one, and the answer when the solver
    finds nothing in time. Raises ``Infeasible`` when nothing fits."""
    import pyomo.environ as pyo
    from pyomo.opt import TerminationCondition as TC

    check_feasible(inst)
    opt = opt or make_solver(solver)
    m = model or build_model(inst)
    coefs = _set_objective(m, inst, weights, objective_scales(inst), eps)
    kwargs = apply_limits(opt, SOLVER_ALIASES.get(solver, solver), time_limit, mip_gap)
    start = feasible_start(inst, coefs, known or [], eps)
    if start is not None and takes_warm_start(opt):
        _load_start(m, inst, start)
        kwargs["warmstart"] = True
    log = None
    if solver == "glpk":  # keep glpsol's log: it holds the branch-and-bound gap Pyomo does not parse
        fd, log = tempfile.mkstemp(prefix="moa-glpk-", suffix=".log")
        os.close(fd)
        kwargs["logfile"] = log
    t0 = time.perf_counter()
    try:
        results = opt.solve(m, load_solutions=False, **kwargs)
        log_text = Path(log).read_text(errors="replace") if log else ""
    except RuntimeError as exc:  # e.g. appsi raising on infeasible with load_solutions
        raise PlanError([("solver", f"{solver} failed: {exc}")]) from None
    finally:
        if log:
            Path(log).unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    term = results.solver.termination_condition
    if log_text and "TIME LIMIT EXCEEDED" in log_text:
        term = TC.maxTimeLimit
    if term in (TC.infeasible, TC.infeasibleOrUnbounded):
        lows = ", ".join(f"{inst.lengths[k]}: {min_density(inst, k):.4f}" for k in sorted(inst.budgets))
        raise Infeasible(
            [
                (
                    "density",
                    f"the budgets {dict((inst.lengths[k], b) for k, b in inst.budgets.items())} "
                    f"(floors {dict((inst.lengths[k], b) for k, b in inst.floors.items())}) cannot be met "
                    f"together{' within the epsilon bounds' if eps else ''} (solver: infeasible); smallest "
                    f"achievable density per length on its own: {lows}",
                )
            ]
        )
    n_solutions = len(getattr(results, "solution", []) or [])
    found = n_solutions > 0 or term in (TC.optimal, TC.locallyOptimal, TC.feasible)
    if found:
        try:
            m.solutions.load_from(results)
        except Exception as exc:  # noqa: BLE001
            if start is None:
                raise PlanError(
                    [("solver", f"{solver} returned no loadable solution (termination: {term}): {exc}")]
                ) from None
            found = False
    if found:
        assign = []
        for u in range(len(inst.cost)):
            vals = [pyo.value(m.x[u, r], exception=False) or 0.0 for r in range(len(inst.dens))]
            assign.append(max(range(len(vals)), key=vals.__getitem__))
        if start is not None and not satisfies(inst, assign):
            found = False  # a time-limited solver may hand back an unfinished point (epsilon
            # bounds are not re-checked: they only steer the front, and solvers meet them to a tolerance)
    if not found:
        if start is None:
            raise PlanError(
                [
                    (
                        "solver",
                        f"{solver} found no feasible plan (termination: {term}, "
                        f"status: {results.solver.status}); give it more --time-limit",
                    )
                ]
            )
        _load_start(m, inst, start)  # the known plan stands; its gap is measured below
        assign, term = list(start), f"{term} (kept the start plan)"
    gap = result_gap(results) if found else None
    if term == TC.optimal and gap is None:
        gap = 0.0
    if gap is None and log_text:
        gap = glpk_log_gap(log_text)
    gap_source = "solver"
    if gap is None:  # a valid (weaker) bound every solver can give: the LP relaxation
        bound = lp_bound(inst, weights, opt)
        value = pyo.value(m.obj)
        if bound is not None:
            gap, gap_source = abs(value - bound) / max(abs(value), 1e-12), "LP relaxation"
    sol = Solution(
        assign=assign,
        weights=list(weights),
        status=str(results.solver.status),
        termination=str(term),
        gap=gap,
        seconds=seconds,
        gap_source=gap_source,
    )
    for k in range(len(inst.lengths)):
        sol.losses[k] = inst.loss(assign, k)
        sol.densities[k] = inst.density(assign, k)
    for k, budget in inst.budgets.items():
        if sol.densities[k] > budget + DENSITY_TOL:
            raise PlanError(
                [
                    (
                        "solver",
                        f"{solver} returned a plan of density {sol.densities[k]:.6f} at length "
                        f"{inst.lengths[k]}, over the budget {budget}",
                    )
                ]
            )
    return sol


def lp_bound(inst: Instance, weights: list[float], opt: Any) -> float | None:
    """Optimal value of the LP relaxation of the weighted problem (a lower bound), or None."""
    import pyomo.environ as pyo

    m = build_model(inst)
    pyo.TransformationFactory("core.relax_integer_vars").apply_to(m)
    _set_objective(m, inst, weights, objective_scales(inst))
    try:
        res = opt.solve(m, load_solutions=False)
        m.solutions.load_from(res)
        return float(pyo.value(m.obj))
    except Exception:  # noqa: BLE001 - a bound is optional information
        return None
