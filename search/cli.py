"""`moa-plan calibrate | profile | optimize | search`: each step's output file is the next one's input.

``register`` imports nothing heavy; the handlers import torch / transformers / pyomo lazily.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moa_plan.plan import PlanError


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _tasks(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, default=4, help="samples per length (default 4)")
    p.add_argument("--tasks", type=_tasks, default=["kv", "multihop", "copy"],
                   help="synthetic tasks, comma-separated (kv, multihop, copy); '' for none")
    p.add_argument("--text", help="folder or file of user text (.txt, or .jsonl with text/question)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-answer-tokens", type=int, default=16)


def _add_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sink", type=int, default=64, help="sink tokens every head keeps (default 64)")
    p.add_argument("--block-size", type=int, default=64, help="plan block size; alpha grid step (default 64)")
    p.add_argument("--chunk", type=int, default=256, help="query rows recomputed at once in the backward pass")


def _add_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--density", type=_floats, required=True,
                   help="density budget: one value, or one per optimisation length")
    p.add_argument("--validation-length", type=int, help="held-out length used only to select the plan")
    p.add_argument("--solver", default="glpk", help="any Pyomo solver name: glpk (default), highs, cbc, gurobi...")
    p.add_argument("--time-limit", type=float, help="seconds per MILP solve; the best feasible plan is kept")
    p.add_argument("--mip-gap", type=float, help="relative MIP gap at which the solver may stop")
    p.add_argument("--weight-steps", type=int, default=4, help="divisions of the weight simplex (default 4)")
    p.add_argument("--alpha-step", type=int, help="alpha grid step in tokens (default: the block size)")
    p.add_argument("--beta-step", type=float, default=0.1, help="beta grid step in [0, 1] (default 0.1)")
    p.add_argument("--gqa", action="store_true", help="one rule per KV group (heads sharing a KV head)")
    p.add_argument("--max-rules-per-layer", type=int, help="cap on distinct rules within a layer")
    p.add_argument("--plots", help="folder for the Pareto-front and span-map PNGs (default: beside --out)")
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calibrate", help="build calibration data (dense model's own answers)")
    p.add_argument("--model", required=True, help="transformers model folder")
    p.add_argument("--lengths", type=_ints, required=True, help="token lengths, comma-separated")
    _add_calib(p)
    p.add_argument("--out", required=True, help="calibration JSONL to write (resumed if it exists)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_calibrate)

    p = subparsers.add_parser("profile", help="attention-influence profile of a model on calibration data")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="calibration JSONL from `moa-plan calibrate`")
    _add_profile(p)
    p.add_argument("--out", required=True, help="profile folder (resumed if it exists)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_profile)

    p = subparsers.add_parser("optimize", help="choose a plan from a profile under a density budget")
    p.add_argument("--profile", required=True, help="profile folder from `moa-plan profile`")
    p.add_argument("--lengths", type=_ints, help="optimisation lengths (default: every profiled length "
                   "except the validation length)")
    _add_opt(p)
    p.set_defaults(handler=cmd_optimize)

    p = subparsers.add_parser("search", help="calibrate + profile + optimize in one go (resumable)")
    p.add_argument("--model", required=True)
    p.add_argument("--lengths", type=_ints, required=True, help="optimisation lengths, comma-separated")
    _add_calib(p)
    _add_profile(p)
    p.add_argument("--work", help="folder for the calibration data and profile (default: OUT.work)")
    _add_opt(p)
    p.set_defaults(handler=cmd_search)


def _log(msg: str) -> None:
    print(msg, flush=True)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from moa_plan.search import calibration

    t0 = time.perf_counter()
    out = calibration.build(args.model, args.out, args.lengths, args.samples, args.tasks, args.seed,
                            args.max_answer_tokens, args.text, args.overwrite, not args.quiet)
    _log(f"calibration data: {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from moa_plan.search import profile

    t0 = time.perf_counter()
    out = profile.run_profile(args.model, args.data, args.out, args.sink, args.block_size, args.chunk,
                              args.overwrite, not args.quiet)
    _log(f"profile: {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _optimize(args: argparse.Namespace, profile_dir: str | Path, lengths: list[int] | None) -> int:
    from moa_plan.io import save_plan
    from moa_plan.search import plots, profile, select

    t0 = time.perf_counter()
    prof = profile.load_profile(profile_dir)
    if args.validation_length is not None and args.validation_length < 1:
        raise PlanError([("--validation-length", "must be >= 1")])
    if args.weight_steps < 1:
        raise PlanError([("--weight-steps", "must be >= 1")])
    res = select.optimize_profile(prof, args.density, lengths, args.validation_length, args.solver,
                                  args.time_limit, args.mip_gap, args.weight_steps, args.alpha_step,
                                  args.beta_step, args.gqa, args.max_rules_per_layer, not args.quiet)
    out = Path(args.out)
    plot_dir = Path(args.plots) if args.plots else out.parent
    stem = out.name.removesuffix(".json")
    plan = res.plan
    lens = plan.provenance["lengths"] + ([args.validation_length] if args.validation_length else [])
    plots.pareto_png(res, plot_dir / f"{stem}.pareto.png")
    plots.span_map_png(plan, lens, plot_dir / f"{stem}.spans.png")
    plan.provenance["optimize_seconds"] = round(time.perf_counter() - t0, 3)
    save_plan(plan, out)
    prov = plan.provenance
    _log(f"plan: {out} | density {json.dumps(prov['achieved_density'])} | est. loss "
         f"{json.dumps(prov['estimated_loss'])} | {prov['solver']['name']} {prov['solver']['termination']} "
         f"gap {prov['solver']['gap']} | {prov['selection']['pareto_size']} Pareto plans | "
         f"{prov['optimize_seconds']:.1f} s")
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    return _optimize(args, args.profile, args.lengths)


def cmd_search(args: argparse.Namespace) -> int:
    from moa_plan.search import calibration, profile

    work = Path(args.work) if args.work else Path(str(args.out) + ".work")
    lengths = sorted(set(args.lengths))
    all_lengths = lengths + ([args.validation_length] if args.validation_length else [])
    if args.validation_length in lengths:
        raise PlanError([("--validation-length", "must differ from the optimisation lengths")])
    times = {}
    t0 = time.perf_counter()
    data = calibration.build(args.model, work / "calibration.jsonl", all_lengths, args.samples, args.tasks,
                             args.seed, args.max_answer_tokens, args.text, False, not args.quiet)
    times["calibrate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prof = profile.run_profile(args.model, data, work / "profile", args.sink, args.block_size, args.chunk,
                               False, not args.quiet)
    times["profile"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rc = _optimize(args, prof, lengths)
    times["optimize"] = time.perf_counter() - t0
    _log("step times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    return rc
