"""The flags of `moa-plan calibrate | profile | optimize | search`, parsed into the settings
objects of ``settings.py`` and handed to one call of ``steps.py`` each.

``register`` imports nothing heavy; the steps import torch / transformers / pyomo lazily.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moa_plan.args import (
    add_model_flag,
    add_run_flags,
    densities,
    float_in,
    lengths,
    names,
    nonnegative,
    positive,
    settings_from,
)
from moa_plan.search.settings import CalibrateSettings, OptimizeSettings, ProfileSettings, SearchSettings


def _extension_lengths(text: str) -> list[int]:
    """Comma-separated lengths, or 0 for none."""
    return [] if text.strip() == "0" else lengths(text)


def _add_calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=positive, default=16, help="samples per length (default 16)")
    p.add_argument(
        "--tasks",
        type=names,
        default=["docs"],
        help="comma-separated: docs (natural text, 3 questions; default), kv, multihop, copy, needle; '' for none",
    )
    p.add_argument("--text", help="folder or file of user text (.txt, or .jsonl with text/question)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic tasks (default 0)")
    p.add_argument(
        "--max-answer-tokens", type=positive, default=128, help="longest dense answer per question (default 128)"
    )
    p.add_argument(
        "--keep-wrong-answers",
        action="store_true",
        help="keep kv / multihop / copy samples whose dense answer misses the right one (default: left out)",
    )
    p.add_argument("--batch-size", type=positive, default=16, help="samples generated together (default 16)")


def _add_model(p: argparse.ArgumentParser) -> None:
    """The model the command runs, and where."""
    add_model_flag(p, "transformers model folder or its config.json (with weights)")
    _add_device(p)


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
    p.add_argument(
        "--hold-out",
        type=nonnegative,
        default=0,
        help="samples per length (the last ones) kept out of the profile, on which the search measures "
        "its candidate plans at every optimisation length (default 0)",
    )
    p.add_argument(
        "--measure-blocks",
        type=nonnegative,
        default=0,
        help="also measure the loss increase of narrowing each block of this many layers (all else dense), "
        "which the optimiser adds to the first-order influence (default 0: off)",
    )
    p.add_argument(
        "--measure-samples",
        type=positive,
        default=16,
        help="profiled samples per length the block measurement uses (default 16)",
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
        "--measured-weight",
        type=float_in(0, 1e6),
        default=1.0,
        help="weight of the profile's measured block cost (profile --measure-blocks) against the first-order "
        "influence; 1 (default): equal totals when every head keeps half its keys; 0: influence only",
    )
    p.add_argument(
        "--validation-samples",
        type=nonnegative,
        default=0,
        help="measure each Pareto plan's real loss on this many held-out samples at the "
        "validation length and keep the best (default 0: all there are; needs --model, --data)",
    )
    p.add_argument(
        "--select",
        choices=("all", "validation"),
        default="all",
        help="measured selection: 'all' (default) scores a plan by its mean loss ratio to dense over the "
        "validation length and every optimisation length with held-out samples (profile --hold-out); "
        "'validation': loss at the validation length only, as the MoA reference",
    )
    p.add_argument("--plots", help="folder for the Pareto-front and span-map PNGs (default: beside --out)")
    p.add_argument("--out", required=True, help="plan JSON to write")
    add_run_flags(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calibrate", help="build calibration data (dense model's own answers)")
    _add_model(p)
    p.add_argument("--lengths", type=lengths, required=True, help="token lengths, comma-separated")
    _add_calib(p)
    p.add_argument("--out", required=True, help="calibration file to write (resumed if it exists)")
    add_run_flags(p)
    p.set_defaults(handler=_calibrate)

    p = subparsers.add_parser("profile", help="attention-influence profile of a model on calibration data")
    _add_model(p)
    p.add_argument("--data", required=True, help="calibration file from `moa-plan calibrate`")
    _add_profile(p)
    p.add_argument("--out", required=True, help="profile folder (resumed if it exists)")
    add_run_flags(p)
    p.set_defaults(handler=_profile)

    p = subparsers.add_parser("optimize", help="choose a plan from a profile under a density budget")
    p.add_argument("--profile", required=True, help="profile folder from `moa-plan profile`")
    p.add_argument(
        "--lengths",
        type=lengths,
        help="optimisation lengths (default: every profiled length except the validation length)",
    )
    add_model_flag(p, "model folder or its config.json, for measured validation (with --data)", required=False)
    p.add_argument("--data", help="calibration file holding the validation samples")
    _add_device(p)
    _add_opt(p)
    p.set_defaults(handler=_optimize)

    p = subparsers.add_parser("search", help="calibrate + profile + optimize in one go (resumable)")
    _add_model(p)
    p.add_argument("--lengths", type=lengths, required=True, help="optimisation lengths, comma-separated")
    _add_calib(p)
    _add_profile(p)
    p.add_argument("--work", help="folder for the calibration data and profile (default: OUT.work)")
    _add_opt(p)
    p.set_defaults(handler=_search)


def _calibrate(args: argparse.Namespace) -> int:
    from moa_plan.search import steps

    return steps.calibrate(settings_from(CalibrateSettings, args))


def _profile(args: argparse.Namespace) -> int:
    from moa_plan.search import steps

    return steps.profile(settings_from(ProfileSettings, args))


def _optimize(args: argparse.Namespace) -> int:
    from moa_plan.search import steps

    return steps.optimize(settings_from(OptimizeSettings, args))


def search_settings(args: argparse.Namespace) -> SearchSettings:
    """The three steps of `search`: the calibration file and profile under ``--work`` (default
    OUT.work); the calibration covers the validation length too."""
    work = Path(args.work) if args.work else Path(str(args.out) + ".work")
    opt_lengths = sorted(set(args.lengths))
    all_lengths = opt_lengths + ([args.validation_length] if args.validation_length else [])
    return SearchSettings(
        calibrate=settings_from(CalibrateSettings, args, lengths=all_lengths, out=work / "calibration.json"),
        profile=settings_from(ProfileSettings, args, data=None, out=work / "profile"),
        optimize=settings_from(OptimizeSettings, args, lengths=opt_lengths),
    )


def _search(args: argparse.Namespace) -> int:
    from moa_plan.search import steps

    return steps.search(search_settings(args))
