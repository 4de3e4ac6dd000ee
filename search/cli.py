"""`moa-plan calibrate | profile | optimize | search`: each step's output file is the next one's input.

``register`` imports nothing heavy; the handlers import torch / transformers / pyomo lazily.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moa_plan.args import (
    add_run_flags,
    check_device,
    check_output,
    densities,
    float_in,
    lengths,
    names,
    nonnegative,
    positive,
)
from moa_plan.errors import OptionError, Problems


def _extension_lengths(text: str) -> list[int]:
    """Comma-separated lengths, or 0 for none."""
    return [] if text.strip() == "0" else lengths(text)


def _add_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=positive, default=16, help="samples per length (default 16)")
    p.add_argument(
        "--tasks",
        type=names,
        default=["docs"],
        help="comma-separated: docs (natural text, 3 questions; default), kv, multihop, copy; '' for none",
    )
    p.add_argument("--text", help="folder or file of user text (.txt, or .jsonl with text/question)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic tasks (default 0)")
    p.add_argument(
        "--max-answer-tokens", type=positive, default=128, help="longest dense answer per question (default 128)"
    )
    p.add_argument("--batch-size", type=positive, default=16, help="samples generated together (default 16)")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:i]")


def _add_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sink", type=nonnegative, default=64, help="sink tokens every head keeps (default 64)")
    p.add_argument("--block-size", type=positive, default=64, help="plan block size (default 64)")
    p.add_argument(
        "--chunk", type=positive, default=256, help="query rows recomputed at once in the backward pass (default 256)"
    )
    p.add_argument(
        "--signed-influence",
        action="store_true",
        help="sum signed per-entry effects (default: absolute values, as the MoA reference)",
    )


def _add_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--density",
        type=densities,
        required=True,
        help="density budget (mean over heads of (sink + span) / N): one value, or one per length",
    )
    p.add_argument("--validation-length", type=positive, help="held-out length used only to select the plan")
    p.add_argument(
        "--extension-length",
        type=_extension_lengths,
        help="other lengths (shorter or longer) where the density is constrained too, never profiled; default: twice "
        "the longest profiled length; 0 for none",
    )
    p.add_argument(
        "--density-floor",
        type=float_in(0, 1),
        default=0.9,
        help="each optimisation length's density stays >= this x budget (default 0.9; 0: no floor)",
    )
    p.add_argument("--solver", default="glpk", help="any Pyomo solver name: glpk (default), highs, cbc, gurobi...")
    p.add_argument(
        "--time-limit",
        type=float_in(0, 1e9, low_open=True),
        help="seconds per MILP solve; the best feasible plan is kept",
    )
    p.add_argument(
        "--mip-gap", type=float_in(0, 1, high_open=True), help="relative MIP gap at which the solver may stop"
    )
    p.add_argument(
        "--pareto",
        choices=("epsilon", "weighted"),
        default="epsilon",
        help="Pareto front by epsilon-constraint (default) or weighted sums",
    )
    p.add_argument("--weight-steps", type=positive, default=4, help="grid divisions per objective (default 4)")
    p.add_argument("--alpha-step", type=positive, help="alpha grid step in tokens (default: 4 x the block size)")
    p.add_argument(
        "--beta-step", type=float_in(0, 1, low_open=True), default=0.125, help="beta grid step in [0, 1] (default 1/8)"
    )
    p.add_argument("--gqa", action="store_true", help="one rule per KV group (heads sharing a KV head)")
    p.add_argument(
        "--static-windows",
        action="store_true",
        help="only rules with beta 0 (per-head fixed windows: the paper's ablation)",
    )
    p.add_argument(
        "--max-rules-per-layer",
        type=nonnegative,
        default=2,
        help="cap on distinct rules within a layer (default 2; 0: no cap)",
    )
    p.add_argument(
        "--validation-samples",
        type=nonnegative,
        default=0,
        help="measure each Pareto plan's real loss on this many held-out samples at the "
        "validation length and keep the best (default 0: all there are; needs --model, --data)",
    )
    p.add_argument("--plots", help="folder for the Pareto-front and span-map PNGs (default: beside --out)")
    p.add_argument("--out", required=True, help="plan JSON to write")
    add_run_flags(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calibrate", help="build calibration data (dense model's own answers)")
    p.add_argument(
        "--model",
        required=True,
        metavar="CONFIG_OR_DIR",
        help="transformers model folder or its config.json (with weights)",
    )
    p.add_argument("--lengths", type=lengths, required=True, help="token lengths, comma-separated")
    _add_calib(p)
    _add_device(p)
    p.add_argument("--out", required=True, help="calibration file to write (resumed if it exists)")
    add_run_flags(p)
    p.set_defaults(handler=cmd_calibrate)

    p = subparsers.add_parser("profile", help="attention-influence profile of a model on calibration data")
    p.add_argument(
        "--model",
        required=True,
        metavar="CONFIG_OR_DIR",
        help="transformers model folder or its config.json (with weights)",
    )
    p.add_argument("--data", required=True, help="calibration file from `moa-plan calibrate`")
    _add_profile(p)
    _add_device(p)
    p.add_argument("--out", required=True, help="profile folder (resumed if it exists)")
    add_run_flags(p)
    p.set_defaults(handler=cmd_profile)

    p = subparsers.add_parser("optimize", help="choose a plan from a profile under a density budget")
    p.add_argument("--profile", required=True, help="profile folder from `moa-plan profile`")
    p.add_argument(
        "--lengths",
        type=lengths,
        help="optimisation lengths (default: every profiled length except the validation length)",
    )
    p.add_argument(
        "--model",
        metavar="CONFIG_OR_DIR",
        help="model folder or its config.json, for measured validation (with --data)",
    )
    p.add_argument("--data", help="calibration file holding the validation samples")
    _add_device(p)
    _add_opt(p)
    p.set_defaults(handler=cmd_optimize)

    p = subparsers.add_parser("search", help="calibrate + profile + optimize in one go (resumable)")
    p.add_argument(
        "--model",
        required=True,
        metavar="CONFIG_OR_DIR",
        help="transformers model folder or its config.json (with weights)",
    )
    p.add_argument("--lengths", type=lengths, required=True, help="optimisation lengths, comma-separated")
    _add_calib(p)
    _add_profile(p)
    _add_device(p)
    p.add_argument("--work", help="folder for the calibration data and profile (default: OUT.work)")
    _add_opt(p)
    p.set_defaults(handler=cmd_search)


def _log(msg: str) -> None:
    print(msg, flush=True)


def check_optimize_args(
    args: argparse.Namespace, lengths: list[int] | None, sink: int | None = None, block: int | None = None
) -> None:
    """Every optimiser option, checked before any work starts (one located line each); with the
    sink and block size (``search``) also whether the density budget is reachable at every length."""
    from moa_plan.search.select import check_budgets, parse_budgets
    from moa_plan.search.solvers import make_solver

    problems = []
    if lengths and args.validation_length in lengths:
        problems.append(("--validation-length", "must differ from the optimisation lengths"))
    if lengths:
        try:
            if sink is None or block is None or problems:
                parse_budgets(args.density, lengths)
            else:
                check_budgets(
                    args.density,
                    lengths,
                    args.validation_length,
                    _extension(args, lengths),
                    sink,
                    block,
                    args.alpha_step,
                    args.beta_step,
                    args.static_windows,
                )
        except Problems as exc:
            problems += exc.problems
    if problems:
        raise OptionError(problems)
    check_device("--device", args.device, allow_auto=True)
    check_output("--out", args.out)
    if args.plots:
        check_output("--plots", args.plots, folder=True)
    make_solver(args.solver)  # a missing solver is found now, not after the profile (exit 1: not installed)


def _extension(args: argparse.Namespace, lengths: list[int]) -> list[int]:
    if args.extension_length is None:
        return [2 * max(lengths + ([args.validation_length] if args.validation_length else []))]
    return args.extension_length


def cmd_calibrate(args: argparse.Namespace) -> int:
    from moa_plan.search import calibration

    check_device("--device", args.device, allow_auto=True)
    check_output("--out", args.out)
    t0 = time.perf_counter()
    out = calibration.build(
        args.model,
        args.out,
        args.lengths,
        args.samples,
        args.tasks,
        args.seed,
        args.max_answer_tokens,
        args.text,
        args.overwrite,
        not args.quiet,
        args.batch_size,
        args.device,
    )
    _log(f"calibration data: {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from moa_plan.search import profile

    check_device("--device", args.device, allow_auto=True)
    check_output("--out", args.out, folder=True)
    t0 = time.perf_counter()
    out = profile.run_profile(
        args.model,
        args.data,
        args.out,
        args.sink,
        args.block_size,
        args.chunk,
        args.overwrite,
        not args.quiet,
        args.signed_influence,
        args.device,
    )
    _log(f"profile: {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _optimize(
    args: argparse.Namespace,
    profile_dir: str | Path,
    lengths: list[int] | None,
    model: str | None = None,
    data: str | Path | None = None,
) -> int:
    from moa_plan.io import save_plan
    from moa_plan.search import plots, profile, select

    t0 = time.perf_counter()
    prof = profile.load_profile(profile_dir)
    opt_lengths = lengths or [n for n in prof.lengths if n != args.validation_length]
    res = select.optimize_profile(
        prof,
        args.density,
        lengths,
        args.validation_length,
        args.solver,
        args.time_limit,
        args.mip_gap,
        args.weight_steps,
        args.alpha_step or 4 * int(prof.meta["block_size"]),
        args.beta_step,
        args.gqa,
        args.max_rules_per_layer or None,
        not args.quiet,
        args.density_floor or None,
        _extension(args, opt_lengths),
        args.pareto,
        args.static_windows,
    )
    agreement = profile.split_half_agreement(prof, res.candidates, sorted(set(opt_lengths)))
    measured = None
    out = Path(args.out)
    plot_dir = Path(args.plots) if args.plots else out.parent
    stem = out.name.removesuffix(".json")
    if model and data and args.validation_length:
        from moa_plan.run import Run
        from moa_plan.runtime import load as loader
        from moa_plan.search import calibration, loss

        calib, samples = calibration.load_dataset(data)
        held = [s for s in samples if s["length"] == args.validation_length]
        held = held[: args.validation_samples] if args.validation_samples else held
        if not held:
            raise OptionError([("--data", f"no samples of the validation length {args.validation_length}")])
        settings = {
            "model": loader.model_name(model),
            "calibration_settings": calib,
            "samples": [s["id"] for s in held],
        }
        with Run(
            plot_dir / f"{stem}.validation.json", "validate", settings, overwrite=args.overwrite, quiet=args.quiet
        ) as run:
            rows = loss.measured_losses(model, held, res.plans, run, args.device)
        measured = [sum(r) / len(r) for r in rows]
        select.choose_measured(res, measured, args.validation_length, len(held))
    plan = res.plan
    lens = plan.provenance["lengths"] + ([args.validation_length] if args.validation_length else [])
    plots.pareto_png(res, plot_dir / f"{stem}.pareto.png")
    plots.span_map_png(plan, lens, plot_dir / f"{stem}.spans.png")
    plan.provenance["profile_split_half_spearman"] = agreement
    plan.provenance["optimize_seconds"] = round(time.perf_counter() - t0, 3)
    write_candidates(res, measured, plot_dir / f"{stem}.candidates.md")
    save_plan(plan, out)
    prov = plan.provenance
    _log(
        f"plan: {out} | density {json.dumps(prov['achieved_density'])} | est. loss "
        f"{json.dumps(prov['estimated_loss'])} | {prov['solver']['name']} {prov['solver']['termination']} "
        f"gap {prov['solver']['gap']} | {prov['selection']['pareto_size']} Pareto plans | "
        f"split-half Spearman {json.dumps(agreement)} | {prov['optimize_seconds']:.1f} s"
    )
    return 0


def write_candidates(res, measured: list[float] | None, path: Path) -> None:
    """The Pareto candidates (estimated losses, densities, measured loss) as a markdown table."""
    from moa_plan.files import write_atomic

    plans = res.plans
    lens = list(plans[0].provenance["achieved_density"])
    est = list(plans[0].provenance["estimated_loss"])
    head = (
        ["#"]
        + [f"est. loss @{n}" for n in est]
        + [f"density @{n}" for n in lens]
        + (["measured loss"] if measured else [])
        + ["chosen"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, plan in enumerate(plans):
        p = plan.provenance
        row = (
            [str(i)]
            + [f"{p['estimated_loss'][n]:.4g}" for n in est]
            + [f"{p['achieved_density'][n]:.4f}" for n in lens]
            + ([f"{measured[i]:.4f}"] if measured else [])
            + (["**yes**"] if i == res.chosen else [""])
        )
        lines.append("| " + " | ".join(row) + " |")
    write_atomic(
        path,
        f"Pareto candidates of {path.name.removesuffix('.candidates.md')}: "
        f"{plans[0].provenance['selection']['rule'] if res.plan is plans[res.chosen] else ''}\n\n"
        + "\n".join(lines)
        + "\n",
    )


def cmd_optimize(args: argparse.Namespace) -> int:
    check_optimize_args(args, args.lengths)
    return _optimize(args, args.profile, args.lengths, args.model, args.data)


def cmd_search(args: argparse.Namespace) -> int:
    from moa_plan.search import calibration, profile

    work = Path(args.work) if args.work else Path(str(args.out) + ".work")
    lengths = sorted(set(args.lengths))
    all_lengths = lengths + ([args.validation_length] if args.validation_length else [])
    check_optimize_args(args, lengths, args.sink, args.block_size)
    from moa_plan.runtime import load as loader

    loader.resolve(args.model)
    loader.resolve_device(args.device)
    times = {}
    t0 = time.perf_counter()
    data = calibration.build(
        args.model,
        work / "calibration.json",
        all_lengths,
        args.samples,
        args.tasks,
        args.seed,
        args.max_answer_tokens,
        args.text,
        args.overwrite,
        not args.quiet,
        args.batch_size,
        args.device,
    )
    times["calibrate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prof = profile.run_profile(
        args.model,
        data,
        work / "profile",
        args.sink,
        args.block_size,
        args.chunk,
        args.overwrite,
        not args.quiet,
        args.signed_influence,
        args.device,
    )
    times["profile"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rc = _optimize(args, prof, lengths, args.model, data)
    times["optimize"] = time.perf_counter() - t0
    _log("step times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    return rc
