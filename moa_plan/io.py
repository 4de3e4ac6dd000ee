"""Reading and writing plan files, with located, one-line errors.

Plan files are data: parsed with ``json`` only (strictly, ``strict_json``), size-limited
(``files``), never executed or unpickled; saved atomically, one rule per line.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

from pydantic import ValidationError

from moa_plan.files import read_text_limited, write_atomic
from moa_plan.plan import FORMAT_VERSION, Plan, PlanError
from moa_plan.strict_json import format_location, parse_json

_MESSAGES = {
    "missing": "required field is missing",
    "extra_forbidden": "unknown field",
    "finite_number": "must be a finite number",
    "float_type": "must be a number",
    "int_type": "must be an integer",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "bool_type": "must be true or false",
    "string_unicode": "holds a lone surrogate (not valid Unicode text)",
    "string_pattern_mismatch": "must be one line without control characters",
    # filled from the error's context (a missing key reads None)
    "greater_than_equal": "must be >= {ge}",
    "less_than_equal": "must be <= {le}",
    "literal_error": "must be {expected}",
    "string_too_long": "must be at most {max_length} characters",
}


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind not in _MESSAGES:
        return err["msg"].removeprefix("Value error, ")
    ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in (err.get("ctx") or {}).items()}
    return _MESSAGES[kind].format_map(defaultdict(lambda: None, ctx))


def _dedupe(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Union-typed fields report one error per branch; keep one line per location."""
    seen: dict[str, str] = {}
    for loc, msg in problems:
        seen.setdefault(loc, msg)
    return list(seen.items())


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        # drop pydantic's union-branch tags such as 'list[Rule]' / 'function-after[...]'
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in {"str", "int", "float"})))
        problems.append((format_location(loc), _message(err)))
    return _dedupe(problems)


def plan_from_data(data: Any) -> Plan:
    """Validate already-parsed JSON data as a plan; raise PlanError with located problems."""
    if not isinstance(data, dict):
        raise PlanError([("", "a plan must be a JSON object")])
    if "format_version" not in data and "model" not in data and "num_hidden_layers" in data:
        raise PlanError(
            [
                (
                    "",
                    "this is a transformers model config, not a plan: pass it as --model "
                    "(e.g. moa-plan uniform --model CONFIG --density 0.5 --out plan.json)",
                )
            ]
        )
    version = data.get("format_version")
    if "format_version" in data and (type(version) is not int or version != FORMAT_VERSION):  # not True / 1.0
        raise PlanError([("format_version", f"unsupported version {version!r}; this moa-plan reads {FORMAT_VERSION}")])
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(validation_problems(exc)) from None


def plan_from_json(text: str) -> Plan:
    """Parse and validate plan JSON text; every problem is a located PlanError."""
    return plan_from_data(parse_json(text))


def load_plan(path: str | os.PathLike) -> Plan:
    """Load and validate a plan file. Raises PlanError naming the file and each location."""
    try:
        return plan_from_json(read_text_limited(path))
    except PlanError as exc:
        raise PlanError(exc.problems, source=str(path)) from None


def dumps_readable(value: Any, indent: str = "") -> str:
    """Plain JSON for hand editing: an object or list holding only scalars (a rule, a short
    list) stays on one line when short; everything else is indented by two spaces."""
    if not isinstance(value, (dict, list)) or not value:
        return json.dumps(value, allow_nan=False)
    if all(not isinstance(v, (dict, list)) for v in (value.values() if isinstance(value, dict) else value)):
        flat = json.dumps(value, allow_nan=False)  # only here: dumping every level would be quadratic in depth
        if len(flat) + len(indent) <= 100:
            return flat
    inner = indent + "  "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps_readable(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    items = [inner + dumps_readable(v, inner) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + indent + "]"


def plan_to_json(plan: Plan) -> str:
    """The plan as plain JSON text, one rule per line."""
    data = plan.model_dump(mode="json", exclude_none=True)
    return dumps_readable(data) + "\n"


def plan_schema() -> dict[str, Any]:
    """The JSON Schema of a plan file, generated from the models (spec/plan.schema.json)."""
    schema = Plan.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/moa-plan/moa-plan/spec/plan.schema.json",
        **schema,
    }


def plan_schema_json() -> str:
    return json.dumps(plan_schema(), indent=2) + "\n"


def save_plan(plan: Plan, path: str | os.PathLike) -> None:
    """Write a plan as JSON, atomically."""
    write_atomic(path, plan_to_json(plan))
