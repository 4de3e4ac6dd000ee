"""The attention methods an evaluation compares, and the plan each uses at a given length.

A method is written on the command line as one of

* ``dense`` - the unmodified model (transformers' own attention);
* ``uniform:<density>`` - StreamingLLM, elastic: every head sees the sink + a window of
  density*N - sink keys, so its density (the paper's: mean attended keys / N) is ``density`` at
  every N (``uniform:<density>@<length>``: one fixed window, sized at that length, used at every N);
* ``uniform=<path>`` - StreamingLLM matching the density of the plan in ``<path>`` at each N
  (the paper's "same density" baseline);
* a plan file path, optionally named ``NAME=<path>``.

Plan strings are read by ``moa_plan.build.plan_from_spec`` (the one grammar every command
shares); spans and densities come from the Plan methods, never re-derived here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from moa_plan.build import plan_from_spec, uniform_plan
from moa_plan.errors import OptionError
from moa_plan.io import plan_to_json
from moa_plan.plan import ModelShape, Plan, PlanError


@dataclass(frozen=True)
class Method:
    """One evaluated configuration: ``kind`` is 'dense', 'plan' or 'uniform-match'."""

    name: str
    kind: str
    spec: str
    plan: Plan | None = None  # the plan used (kind 'plan'), or the plan matched (kind 'uniform-match')

    def plan_at(self, shape: ModelShape, n: int) -> Plan | None:
        """The plan used at total length ``n`` (None: dense, the model is left as it is)."""
        if self.kind == "dense":
            return None
        if self.kind == "plan":
            return self.plan
        assert self.plan is not None
        return uniform_plan(shape, self.plan.density(n), sink=self.plan.sink, block_size=self.plan.block_size)

    def stats(self, shape: ModelShape, n: int) -> dict[str, float]:
        """Density (the paper's), attention fraction, KV-cache fraction and mean span (window,
        without sink) over all heads at length ``n``."""
        plan = self.plan_at(shape, n)
        if plan is None:
            return {
                "density": 1.0,
                "attention_fraction": 1.0,
                "kv_cache_fraction": 1.0,
                "avg_span": float(n),
                "sink": 0,
            }
        return {
            "density": plan.density(n),
            "attention_fraction": plan.attention_fraction(n),
            "kv_cache_fraction": plan.kv_cache_fraction(n),
            "avg_span": plan.mean_span(n),
            "sink": plan.sink,
        }

    def fingerprint(self) -> str:
        """Changes whenever the method would attend differently (plan content, density, ...)."""
        payload = {"kind": self.kind, "plan": plan_to_json(self.plan) if self.plan is not None else None}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _plan(text: str, shape: ModelShape, where: str) -> Plan:
    """``plan_from_spec``; a malformed 'uniform:...' string is a bad option (exit 2), a bad file names the file."""
    try:
        return plan_from_spec(text, shape, where)
    except PlanError as exc:
        if exc.source is not None or isinstance(exc, OptionError):
            raise
        raise OptionError(exc.problems) from None


def parse_method(text: str, shape: ModelShape, where: str = "--plan") -> Method:
    """A Method from its command-line form (see the module docstring); PlanError if malformed."""
    text = text.strip()
    if text == "dense":
        return Method("dense", "dense", text)
    if text.startswith("uniform:"):
        return Method(text, "plan", text, plan=_plan(text, shape, where))
    if text.startswith("uniform="):
        path = text.removeprefix("uniform=")
        plan = _plan(path, shape, where)
        return Method(f"uniform~{Path(path).stem}", "uniform-match", text, plan=plan)
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).stem, text
    if not name:
        raise OptionError([(where, f"{text!r}: empty method name")])
    return Method(name, "plan", text, plan=_plan(path, shape, where))


def check_plan_files(texts: list[str], where: str = "--plan") -> None:
    """Read every plan file named in method strings, before any model is loaded or converted (the
    shape check follows once the model's config is known)."""
    from moa_plan.io import load_plan

    for text in texts:
        text = text.strip()
        if text == "dense" or text.startswith("uniform:"):
            continue
        path = text.removeprefix("uniform=") if text.startswith("uniform=") else text.partition("=")[2] or text
        try:
            load_plan(path)
        except PlanError as exc:
            raise PlanError(
                [(f"{where} {text}: {loc}" if loc else f"{where} {text}", msg) for loc, msg in exc.problems]
            ) from None


def parse_methods(texts: list[str], shape: ModelShape, where: str = "--plan") -> list[Method]:
    """Several methods; their names must differ."""
    methods = [parse_method(t, shape, where) for t in texts]
    names = [m.name for m in methods]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise OptionError([(where, f"two methods named {', '.join(dupes)}: name them NAME=<path>")])
    return methods


def comparison(plan_paths: str | list[str], shape: ModelShape, baselines: list[str]) -> list[Method]:
    """The paper's side-by-side: 'dense' once, then per plan the 'uniform' baseline at that plan's
    density (named 'uniform', or 'uniform~NAME' with several plans) followed by the plan itself."""
    paths = [plan_paths] if isinstance(plan_paths, str) else list(plan_paths)
    unknown = [b for b in baselines if b not in ("dense", "uniform")]
    if unknown:
        raise OptionError([("--baselines", f"unknown baseline {unknown[0]!r}: choose from dense, uniform")])
    methods = [Method("dense", "dense", "dense")] if "dense" in baselines else []
    for path in paths:
        method = parse_method(path, shape)
        if "uniform" in baselines:
            name = "uniform" if len(paths) == 1 else f"uniform~{method.name}"
            methods.append(Method(name, "uniform-match", f"uniform={path}", plan=method.plan))
        methods.append(method)
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise OptionError([("--plan", "two plans have the same name: name them NAME=<path>")])
    return methods
