"""Time the optimiser on a Llama-3-8B-sized synthetic instance (32 layers x 32 heads, 3 lengths).

Influence is random but structured like a real profile: every head has an importance weight
(log-normal, larger in early and late layers) and a reach (how far back its useful keys lie); a
rule's influence at length N is the head's synthetic diag profile summed beyond the rule's
span (``influence.rule_influence``), so sparser rules always cost more, as in real profiles.

    python -m moa_plan.search.bench_optimizer --solver glpk --time-limit 300
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time


def synthetic_instance(
    layers: int = 32,
    heads: int = 32,
    lengths=(2048, 4096, 8192),
    alpha_step: int = 512,
    beta_step: float = 0.1,
    sink: int = 64,
    density: float = 0.5,
    seed: int = 0,
):
    import torch

    from moa_plan.search import optimize as opt
    from moa_plan.search.influence import rule_influence
    from moa_plan.search.rules import candidate_grid, density_table

    rng = random.Random(seed)
    lengths = list(lengths)
    cands = candidate_grid(lengths, alpha_step, beta_step)
    units = layers * heads
    cost = torch.zeros(units, len(cands), len(lengths), dtype=torch.float64)
    for u in range(units):
        l = u // heads
        depth = abs(l / max(1, layers - 1) - 0.5) * 2  # 1 at the ends, 0 in the middle
        weight = math.exp(rng.gauss(0, 1)) * (0.5 + depth)
        reach = rng.choice([0.02, 0.05, 0.2, 0.5, 1.0]) * rng.uniform(0.5, 1.5)  # fraction of N
        for k, n in enumerate(lengths):
            d = torch.arange(n, dtype=torch.float64)
            diag = weight * torch.exp(-d / (reach * n)) / (reach * n) * (1 + 0.1 * rng.gauss(0, 1))
            diag[0] = 0.0
            cost[u, :, k] = rule_influence(diag, [c.span(n) for c in cands])
    inst = opt.Instance(
        cost=cost.tolist(),
        dens=density_table(cands, sink, lengths),
        weight=[1] * units,
        layer=[u // heads for u in range(units)],
        lengths=lengths,
        objectives=list(range(len(lengths))),
        budgets={k: density for k in range(len(lengths))},
    )
    return inst, cands


def main(argv: list[str] | None = None) -> int:
    from moa_plan.search import optimize as opt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--solver", default="glpk")
    p.add_argument("--time-limit", type=float, default=300)
    p.add_argument("--alpha-step", type=int, default=256)
    p.add_argument("--beta-step", type=float, default=0.1)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--weights", default="1,1,1", help="objective weights of the timed solve")
    p.add_argument("--max-rules-per-layer", type=int)
    p.add_argument("--mip-gap", type=float, help="relative gap at which the solver may stop")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    inst, cands = synthetic_instance(alpha_step=args.alpha_step, beta_step=args.beta_step, density=args.density)
    inst.max_rules_per_layer = args.max_rules_per_layer
    t_inst = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = opt.build_model(inst)
    t_build = time.perf_counter() - t0
    w = [float(x) for x in args.weights.split(",")]
    t0 = time.perf_counter()
    sol = opt.solve(inst, w, args.solver, time_limit=args.time_limit, mip_gap=args.mip_gap, model=model)
    total = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "heads": len(inst.cost),
                "rules": len(cands),
                "lengths": inst.lengths,
                "binaries": len(inst.cost) * len(cands),
                "solver": args.solver,
                "weights": w,
                "max_rules_per_layer": args.max_rules_per_layer,
                "mip_gap": args.mip_gap,
                "time_limit": args.time_limit,
                "termination": sol.termination,
                "status": sol.status,
                "gap": sol.gap,
                "gap_source": sol.gap_source,
                "solver_seconds": round(sol.seconds, 2),
                "solve_call_seconds": round(total, 2),
                "model_build_seconds": round(t_build, 2),
                "instance_seconds": round(t_inst, 2),
                "densities": {str(inst.lengths[k]): round(v, 4) for k, v in sol.densities.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
