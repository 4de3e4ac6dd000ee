"""The attention methods an evaluation compares, and the plan each uses at a given length.

A method is written on the command line as one of

* ``dense`` - the unmodified model (transformers' own attention);
* ``uniform:<density>`` - StreamingLLM (sink + one fixed window for every head) whose density at
  each evaluated length N is ``density`` (``uniform:<density>@<length>``: one window, sized at
  that length, used at every N);
* ``uniform=<path>`` - StreamingLLM matching the density of the plan in ``<path>`` at each N
  (the paper's "same density" baseline);
* a plan file path, optionally named ``NAME=<path>``.

Plans for a length are built with ``moa_plan.build.uniform_plan``; spans and densities come from
the Plan methods, never re-derived here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from moa_plan.io import check_fits, load_plan, plan_to_json
from moa_plan.plan import ModelShape, Plan, PlanError


@dataclass(frozen=True)
class Method:
    """One evaluated configuration: ``kind`` is 'dense', 'plan', 'uniform' or 'uniform-match'."""

    name: str
    kind: str
    spec: str
    plan: Plan | None = None  # the plan file (kind 'plan'), or the plan matched (kind 'uniform-match')
    density: float | None = None  # kind 'uniform'
    length: int | None = None  # kind 'uniform' with '@<length>'

    def plan_at(self, shape: ModelShape, n: int) -> Plan | None:
        """The plan used at total length ``n`` (None: dense, the model is left as it is)."""
        from moa_plan.build import uniform_plan

        if self.kind == "dense":
            return None
        if self.kind == "plan":
            return self.plan
        if self.kind == "uniform":
            return uniform_plan(shape, self.density, self.length or n)
        assert self.plan is not None
        return uniform_plan(shape, min(1.0, self.plan.density(n)), n, sink=self.plan.sink,
                            block_size=self.plan.block_size)

    def stats(self, shape: ModelShape, n: int) -> dict[str, float]:
        """Density and mean span (window, without sink) over all heads at length ``n``."""
        plan = self.plan_at(shape, n)
        if plan is None:
            return {"density": 1.0, "avg_span": float(n), "sink": 0}
        spans = [s for layer in plan.spans(n) for s in layer]
        return {"density": plan.density(n), "avg_span": sum(spans) / len(spans), "sink": plan.sink}

    def fingerprint(self) -> str:
        """Changes whenever the method would attend differently (plan content, density, ...)."""
        payload = {"kind": self.kind, "density": self.density, "length": self.length,
                   "plan": plan_to_json(self.plan) if self.plan is not None else None}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _load(path: str, shape: ModelShape, where: str) -> Plan:
    try:
        plan = load_plan(path)
        check_fits(plan, shape)
    except PlanError as exc:
        raise PlanError([(f"{where} {path}: {loc}" if loc else f"{where} {path}", msg)
                         for loc, msg in exc.problems]) from None
    return plan


def parse_method(text: str, shape: ModelShape, where: str = "--plan") -> Method:
    """A Method from its command-line form (see the module docstring); PlanError if malformed."""
    text = text.strip()
    if text == "dense":
        return Method("dense", "dense", text)
    if text.startswith("uniform:"):
        density_text, _, length_text = text.removeprefix("uniform:").partition("@")
        try:
            density = float(density_text)
            length = int(length_text) if length_text else None
        except ValueError:
            raise PlanError([(where, f"{text!r}: expected uniform:<density> or uniform:<density>@<length>")]) from None
        if not 0 < density <= 1 or (length is not None and length < 1):
            raise PlanError([(where, f"{text!r}: density must be in (0, 1] and length >= 1")])
        return Method(text, "uniform", text, density=density, length=length)
    if text.startswith("uniform="):
        path = text.removeprefix("uniform=")
        plan = _load(path, shape, where)
        return Method(f"uniform~{Path(path).stem}", "uniform-match", text, plan=plan)
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).stem, text
    if not name:
        raise PlanError([(where, f"{text!r}: empty method name")])
    return Method(name, "plan", text, plan=_load(path, shape, where))


def parse_methods(texts: list[str], shape: ModelShape, where: str = "--plan") -> list[Method]:
    """Several methods; their names must differ."""
    methods = [parse_method(t, shape, where) for t in texts]
    names = [m.name for m in methods]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PlanError([(where, f"two methods named {', '.join(dupes)}: name them NAME=<path>")])
    return methods


def comparison(plan_paths: str | list[str], shape: ModelShape, baselines: list[str]) -> list[Method]:
    """The paper's side-by-side: 'dense' once, then per plan the 'uniform' baseline at that plan's
    density (named 'uniform', or 'uniform~NAME' with several plans) followed by the plan itself."""
    paths = [plan_paths] if isinstance(plan_paths, str) else list(plan_paths)
    unknown = [b for b in baselines if b not in ("dense", "uniform")]
    if unknown:
        raise PlanError([("--baselines", f"unknown baseline {unknown[0]!r}: choose from dense, uniform")])
    methods = [Method("dense", "dense", "dense")] if "dense" in baselines else []
    for path in paths:
        method = parse_method(path, shape)
        if "uniform" in baselines:
            name = "uniform" if len(paths) == 1 else f"uniform~{method.name}"
            methods.append(Method(name, "uniform-match", f"uniform={path}", plan=method.plan))
        methods.append(method)
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise PlanError([("--plan", "two plans have the same name: name them NAME=<path>")])
    return methods
