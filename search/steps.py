"""The work of `moa-plan calibrate | profile | optimize | search`: one call each, on a settings
object (``settings.py``); each step's output file is the next one's input. Torch, transformers and
Pyomo are imported lazily, inside the steps."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from moa_plan.args import check_device, check_output
from moa_plan.errors import OptionError, Problems
from moa_plan.search.settings import CalibrateSettings, OptimizeSettings, ProfileSettings, SearchSettings


def _log(msg: str) -> None:
    print(msg, flush=True)


def calibrate(s: CalibrateSettings) -> int:
    from moa_plan.search import calibration

    check_device("--device", s.device, allow_auto=True)
    check_output("--out", s.out)
    t0 = time.perf_counter()
    out = calibration.build(s)
    _log(f"calibration data: {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def profile(s: ProfileSettings) -> int:
    from moa_plan.search import profile

    check_device("--device", s.device, allow_auto=True)
    check_output("--out", s.out, folder=True)
    t0 = time.perf_counter()
    out = profile.run_profile(s)
    _log(f"profile: {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def check_optimize(s: OptimizeSettings, sink: int | None = None, block: int | None = None) -> None:
    """Every optimiser option, checked before any work starts (one located line each); with the
    sink and block size (``search``) also whether the density budget is reachable at every length."""
    from moa_plan.search.select import check_budgets, parse_budgets
    from moa_plan.search.solvers import make_solver

    lengths = s.lengths
    problems = []
    if lengths and s.validation_length in lengths:
        problems.append(("--validation-length", "must differ from the optimisation lengths"))
    if lengths:
        try:
            if sink is None or block is None or problems:
                parse_budgets(s.density, lengths)
            else:
                check_budgets(
                    s.density,
                    lengths,
                    s.validation_length,
                    s.extension(lengths),
                    sink,
                    block,
                    s.alpha_step,
                    s.beta_step,
                    s.static_windows,
                )
        except Problems as exc:
            problems += exc.problems
    if problems:
        raise OptionError(problems)
    check_device("--device", s.device, allow_auto=True)
    check_output("--out", s.out)
    if s.plots:
        check_output("--plots", s.plots, folder=True)
    make_solver(s.solver)  # a missing solver is found now, not after the profile (exit 1: not installed)


def optimize(s: OptimizeSettings) -> int:
    check_optimize(s)
    return _optimize(s)


def _optimize(s: OptimizeSettings) -> int:
    """Optimise the profile ``s.profile``: the Pareto plans, their measured validation when
    ``s.model`` and ``s.data`` are given, the chosen plan, its plots and the candidates table."""
    from moa_plan.io import save_plan
    from moa_plan.search import plots, profile, select

    t0 = time.perf_counter()
    prof = profile.load_profile(s.profile)
    opt_lengths = s.lengths or [n for n in prof.lengths if n != s.validation_length]
    res = select.optimize_profile(
        prof,
        s.density,
        s.lengths,
        s.validation_length,
        s.solver,
        s.time_limit,
        s.mip_gap,
        s.weight_steps,
        s.alpha_step or 4 * int(prof.meta["block_size"]),
        s.beta_step,
        s.gqa,
        s.max_rules_per_layer or None,
        not s.quiet,
        s.density_floor or None,
        s.extension(opt_lengths),
        s.pareto,
        s.static_windows,
        s.measured_weight,
    )
    agreement = profile.split_half_agreement(prof, res.candidates, sorted(set(opt_lengths)))
    measured = None
    out = Path(s.out)
    plot_dir = Path(s.plots) if s.plots else out.parent
    stem = out.name.removesuffix(".json")
    if s.model and s.data and s.validation_length:
        measured = _measure_candidates(s, prof, res, sorted(set(opt_lengths)), plot_dir / f"{stem}.validation.json")
    plan = res.plan
    lens = plan.provenance["lengths"] + ([s.validation_length] if s.validation_length else [])
    plots.pareto_png(res, plot_dir / f"{stem}.pareto.png")
    plots.span_map_png(plan, lens, plot_dir / f"{stem}.spans.png")
    plan.provenance["profile_split_half_spearman"] = agreement
    plan.provenance["optimize_seconds"] = round(time.perf_counter() - t0, 3)
    write_candidates(res, measured, plot_dir / f"{stem}.candidates.md")
    for i, cand in enumerate(res.plans):  # every Pareto plan, so a choice can be re-examined later
        save_plan(cand, plot_dir / f"{stem}.candidates" / f"{i}.json")
    save_plan(plan, out)
    prov = plan.provenance
    ref = prov["selection"].get("uniform_reference")
    _log(
        f"plan: {out} | density {json.dumps(prov['achieved_density'])} | est. loss "
        f"{json.dumps(prov['estimated_loss'])} | {prov['solver']['name']} {prov['solver']['termination']} "
        f"gap {prov['solver']['gap']} | {prov['selection']['pareto_size']} Pareto plans | "
        + (
            f"measured score {measured['score'][res.chosen]:.4f} vs uniform {ref['score']:.4f} (ratio to dense) | "
            if ref
            else ""
        )
        + f"split-half Spearman {json.dumps(agreement)} | {prov['optimize_seconds']:.1f} s"
    )
    return 0


def _measure_candidates(s: OptimizeSettings, prof, res, opt_lengths: list[int], path: Path) -> dict:
    """Measure every Pareto plan, the uniform window and dense on held-out samples: all samples of
    the validation length (never an objective) and, with ``select`` 'all', the samples the profile
    held out at the optimisation lengths. A plan's score is the mean over those lengths of its mean
    loss divided by dense's there: the reference scores the validation length alone, which on
    SmolLM2 chose plans that gave up the shortest length. Chooses in place; returns the table."""
    from moa_plan.build import dense_plan
    from moa_plan.run import Run
    from moa_plan.runtime import load as loader
    from moa_plan.search import calibration, loss, select

    calib, samples = calibration.load_dataset(s.data)
    held = [x for x in samples if x["length"] == s.validation_length]
    held = held[: s.validation_samples] if s.validation_samples else held
    if not held:
        raise OptionError([("--data", f"no samples of the validation length {s.validation_length}")])
    if s.select == "all":
        ids = set(prof.meta.get("held_out", []))
        held += [x for x in samples if x["id"] in ids and x["length"] in opt_lengths]
    counts = {n: sum(x["length"] == n for x in held) for n in sorted({x["length"] for x in held})}
    settings = {"model": loader.model_name(s.model), "calibration_settings": calib, "samples": [x["id"] for x in held]}
    reference = uniform_reference(res.plan)
    with Run(path, "validate", settings, overwrite=s.overwrite, quiet=s.quiet) as run:
        rows = loss.measured_losses(s.model, held, [*res.plans, reference, dense_plan(res.plan.model)], run, s.device)
    per_length = [  # rows: the Pareto plans, then the uniform window, then dense
        {n: sum(v for v, x in zip(r, held) if x["length"] == n) / c for n, c in counts.items()} for r in rows
    ]
    dense = per_length[-1]
    score = [sum(p[n] / dense[n] for n in counts) / len(counts) for p in per_length]
    select.choose_measured(res, score[:-2], per_length[:-2], counts, s.validation_length)
    for plan in res.plans:
        plan.provenance["selection"]["uniform_reference"] = {
            "density": reference.provenance["target_density"],
            "measured_loss": {str(n): round(v, 6) for n, v in per_length[-2].items()},
            "score": round(score[-2], 6),
        }
    return {"lengths": list(counts), "per_length": per_length, "score": score}


def search(s: SearchSettings) -> int:
    """Calibrate, profile and optimise in one go; every option is checked before the first step."""
    check_optimize(s.optimize, s.profile.sink, s.profile.block_size)
    from moa_plan.runtime import load as loader
    from moa_plan.search import calibration, profile

    loader.resolve(s.calibrate.model)
    loader.resolve_device(s.calibrate.device)
    times = {}
    t0 = time.perf_counter()
    data = calibration.build(s.calibrate)
    times["calibrate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prof = profile.run_profile(dataclasses.replace(s.profile, data=data))
    times["profile"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rc = _optimize(dataclasses.replace(s.optimize, profile=prof, model=s.calibrate.model, data=data))
    times["optimize"] = time.perf_counter() - t0
    _log("step times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    return rc


def uniform_reference(plan):
    """The StreamingLLM window at the plan's tightest budget: measured beside the Pareto plans, so
    the candidates table says whether the search beats the uniform window on held-out samples."""
    from moa_plan.build import uniform_plan

    budget = min(plan.provenance["budget"].values())
    return uniform_plan(plan.model, budget, plan.sink, plan.block_size)


def write_candidates(res, measured: dict | None, path: Path) -> None:
    """The Pareto candidates (estimated losses, densities, measured losses and score) as a markdown
    table; with measurements, rows for the uniform window at the same budget and for dense."""
    from moa_plan.files import write_atomic

    plans = res.plans
    lens = list(plans[0].provenance["achieved_density"])
    est = list(plans[0].provenance["estimated_loss"])
    mlens = measured["lengths"] if measured else []
    head = (
        ["#"]
        + [f"est. loss @{n}" for n in est]
        + [f"density @{n}" for n in lens]
        + [f"measured loss @{n}" for n in mlens]
        + (["score (ratio to dense)"] if measured else [])
        + ["chosen"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(k: int) -> list[str]:
        if not measured:
            return []
        return [f"{measured['per_length'][k][n]:.4f}" for n in mlens] + [f"{measured['score'][k]:.4f}"]

    for i, plan in enumerate(plans):
        p = plan.provenance
        row = (
            [str(i)]
            + [f"{p['estimated_loss'][n]:.4g}" for n in est]
            + [f"{p['achieved_density'][n]:.4f}" for n in lens]
            + cells(i)
            + (["**yes**"] if i == res.chosen else [""])
        )
        lines.append("| " + " | ".join(row) + " |")
    if measured:
        blank = [""] * (len(est) + len(lens))
        lines.append("| " + " | ".join(["uniform (reference)", *blank, *cells(len(plans)), ""]) + " |")
        lines.append("| " + " | ".join(["dense", *blank, *cells(len(plans) + 1), ""]) + " |")
    write_atomic(
        path,
        f"Pareto candidates of {path.name.removesuffix('.candidates.md')}: "
        f"{plans[0].provenance['selection']['rule'] if res.plan is plans[res.chosen] else ''}"
        + "; every candidate's plan is in the `.candidates/` folder beside this file\n\n"
        + "\n".join(lines)
        + "\n",
    )
