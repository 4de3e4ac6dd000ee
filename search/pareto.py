"""The Pareto front of the plan optimiser over several objective lengths.

Default, the **epsilon-constraint** method: minimise the first objective (plus a tiny multiple of the
others, so no optimum is weakly dominated) subject to ``loss_k <= eps_k`` for the others, over a grid of
eps between each objective's own optimum and its worst value at the other optima; unlike weighted sums
this also finds Pareto plans in non-convex parts of the front. ``weighted``: one MILP per weight vector
on a simplex grid (range-normalised). The distinct non-dominated solutions form the Pareto set;
selection happens in ``select.py``.
"""

from __future__ import annotations

import itertools

from moa_plan.plan import PlanError
from moa_plan.search.optimize import Infeasible, Instance, Solution, build_model, check_feasible, solve
from moa_plan.search.solvers import SOLVER_ALIASES, make_solver

WEIGHT_FLOOR = 1e-3


def weight_grid(n_obj: int, steps: int) -> list[list[float]]:
    """Weight vectors on the simplex with ``steps`` divisions (a single [1.0] for one objective)."""
    if n_obj == 1:
        return [[1.0]]
    out = []
    for combo in itertools.product(range(steps + 1), repeat=n_obj):
        if sum(combo) == steps:
            out.append([max(c / steps, WEIGHT_FLOOR) for c in combo])
    return out


def pareto(
    inst: Instance,
    solver: str = "glpk",
    steps: int = 4,
    time_limit: float | None = None,
    mip_gap: float | None = None,
    progress: bool = True,
    method: str = "epsilon",
) -> tuple[list[Solution], list[Solution]]:
    """(non-dominated distinct solutions, every solve): epsilon-constraint (default) or weighted sums."""
    from tqdm import tqdm

    check_feasible(inst)
    if SOLVER_ALIASES.get(solver, solver) == "appsi_highs":
        # appsi's persistent interface loses track of re-added constraints (Pyomo raises an
        # internal error on the second epsilon bound): one fresh model per solve
        opt = m = None
    else:
        opt = make_solver(solver)
        m = build_model(inst)
    objs = inst.objectives
    solves: list[Solution] = []
    if method == "weighted" or len(objs) == 1:
        for w in tqdm(weight_grid(len(objs), steps), desc="optimize", disable=not progress):
            solves.append(
                solve(inst, w, solver, time_limit, mip_gap, model=m, opt=opt, known=[x.assign for x in solves])
            )
    elif method == "epsilon":
        bar = tqdm(total=len(objs) + (steps + 1) ** (len(objs) - 1), desc="optimize", disable=not progress)
        anchors = []  # each objective on its own (others weighted WEIGHT_FLOOR): the payoff table
        for i in range(len(objs)):
            anchors.append(
                solve(
                    inst,
                    [1.0 if j == i else WEIGHT_FLOOR for j in range(len(objs))],
                    solver,
                    time_limit,
                    mip_gap,
                    model=m,
                    opt=opt,
                    known=[a.assign for a in anchors],
                )
            )
            bar.update()
        solves += anchors
        grids = []
        for k in objs[1:]:
            lo, hi = min(a.losses[k] for a in anchors), max(a.losses[k] for a in anchors)
            grids.append([lo + (hi - lo) * t / steps for t in range(steps + 1)])
        w = [1.0] + [WEIGHT_FLOOR] * (len(objs) - 1)
        for bounds in itertools.product(*grids):
            eps = {k: b * (1 + 1e-9) + 1e-12 for k, b in zip(objs[1:], bounds)}
            try:
                solves.append(
                    solve(
                        inst,
                        w,
                        solver,
                        time_limit,
                        mip_gap,
                        model=m,
                        opt=opt,
                        eps=eps,
                        known=[x.assign for x in solves],
                    )
                )
            except Infeasible:
                pass  # a bound below what the time-limited solver can reach
            bar.update()
        bar.close()
    else:
        raise PlanError([("--pareto", f"unknown method {method!r}: choose epsilon or weighted")])
    unique: dict[tuple[int, ...], Solution] = {}
    for s in solves:
        unique.setdefault(tuple(s.assign), s)
    cands = list(unique.values())

    def dominated(a: Solution, b: Solution) -> bool:  # b dominates a
        le = all(b.losses[k] <= a.losses[k] + 1e-12 for k in objs)
        lt = any(b.losses[k] < a.losses[k] - 1e-12 for k in objs)
        return le and lt

    front = [a for a in cands if not any(dominated(a, b) for b in cands if b is not a)]
    front.sort(key=lambda s: [s.losses[k] for k in objs])
    return front, solves
