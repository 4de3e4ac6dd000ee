"""Reading and writing plan files and model configs, with located, one-line errors.

Plan files are data: parsed with ``json`` only, size-limited, never executed or unpickled.
Every write goes to a temporary file in the target folder and is renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from moa_plan.plan import FORMAT_VERSION, ModelShape, Plan, PlanError, key_location

MAX_PLAN_BYTES = 64 * 1024 * 1024


def format_location(loc: tuple[Any, ...]) -> str:
    """('layers', 3, 'heads', 7, 'beta') -> 'layers[3].heads[7].beta'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += key_location(str(part))
    return out.removeprefix(".")


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
}


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    ctx = err.get("ctx") or {}
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"must be <= {ctx.get('le')}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


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


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def plan_from_data(data: Any) -> Plan:
    """Validate already-parsed JSON data as a plan; raise PlanError with located problems."""
    if not isinstance(data, dict):
        raise PlanError([("", "a plan must be a JSON object")])
    if "format_version" not in data and "model" not in data and "num_hidden_layers" in data:
        raise PlanError([("", "this is a transformers model config, not a plan: pass it as --model "
                              "(e.g. moa-plan uniform --model CONFIG --density 0.5 --out plan.json)")])
    version = data.get("format_version")
    if "format_version" in data and (type(version) is not int or version != FORMAT_VERSION):  # not True / 1.0
        raise PlanError([("format_version", f"unsupported version {version!r}; this moa-plan reads {FORMAT_VERSION}")])
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(validation_problems(exc)) from None


class _Constant(str):
    """Marks where a NaN / Infinity literal sat, to locate it after parsing."""


def _constant_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], str]]:
    if isinstance(value, _Constant):
        return [(path, str(value))]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [found for key, item in items for found in _constant_paths(item, path + (key,))]


def parse_json(text: str) -> Any:
    """Parse JSON text strictly. Malformed JSON (line, column) and NaN / Infinity literals
    (field path) are located problems."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise PlanError([(f"line {exc.lineno}, column {exc.colno}", f"invalid JSON: {exc.msg}")]) from None
    except RecursionError:
        raise PlanError([("", "JSON nested too deeply")]) from None
    except ValueError as exc:  # NaN / Infinity, or an integer literal too long to convert
        message = str(exc)
    found = []
    if message.endswith("is not valid JSON"):
        try:
            found = _constant_paths(json.loads(text, parse_constant=_Constant))
        except (ValueError, RecursionError):
            pass
    if not found:
        raise PlanError([("", message)])
    raise PlanError([(format_location(path), f"{name} is not valid JSON; must be a finite number")
                     for path, name in found[:20]])


def plan_from_json(text: str) -> Plan:
    """Parse and validate plan JSON text; every problem is a located PlanError."""
    return plan_from_data(parse_json(text))


def read_text_limited(path: str | os.PathLike, limit: int = MAX_PLAN_BYTES) -> str:
    """Read a UTF-8 file, refusing files larger than ``limit`` bytes; errors as PlanError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise PlanError([("", f"file is {size} bytes, larger than the {limit}-byte limit")])
        raw = path.read_bytes()
    except OSError as exc:
        raise PlanError([("", f"cannot read: {exc.strerror or exc}")]) from None
    if not raw.strip():
        raise PlanError([("", "file is empty")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError([("", f"not UTF-8 text (byte {exc.start})")]) from None


def load_plan(path: str | os.PathLike) -> Plan:
    """Load and validate a plan file. Raises PlanError whose problems name the location."""
    return plan_from_json(read_text_limited(path))


def dumps_readable(value: Any, indent: str = "") -> str:
    """Plain JSON for hand editing: an object or list holding only scalars (a rule, a short
    list) stays on one line when short; everything else is indented by two spaces."""
    flat = json.dumps(value, allow_nan=False)
    if not isinstance(value, (dict, list)):
        return flat
    scalars = all(not isinstance(v, (dict, list)) for v in (value.values() if isinstance(value, dict) else value))
    if not value or (scalars and len(flat) + len(indent) <= 100):
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
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://github.com/moa-plan/moa-plan/spec/plan.schema.json", **schema}


def plan_schema_json() -> str:
    return json.dumps(plan_schema(), indent=2) + "\n"


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, else 0666 less the process umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomic(path: str | os.PathLike, text: str | bytes) -> None:
    """Write a file through a temporary sibling and rename, so no half-written file is ever seen."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; give the file ordinary permissions
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_plan(plan: Plan, path: str | os.PathLike) -> None:
    """Write a plan as JSON, atomically."""
    write_atomic(path, plan_to_json(plan))


# ---- model configs -------------------------------------------------------------------------

def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """A transformers ``config.json`` (or a folder holding one) as a dict; errors as PlanError."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    data = parse_json(read_text_limited(path, limit=16 * 1024 * 1024))
    if not isinstance(data, dict):
        raise PlanError([("", "a model config must be a JSON object")])
    return data


def model_folder(path: str | os.PathLike) -> Path:
    """The folder of a model given as a folder or as its ``config.json``, for commands that run the
    model: a ``--model`` error when it holds no config.json or no weights."""
    p = Path(path)
    folder = p.parent if p.is_file() and p.name == "config.json" else p
    if not folder.is_dir():
        raise PlanError([("--model", f"{path}: not a model folder or its config.json")])
    if not (folder / "config.json").is_file():
        raise PlanError([("--model", f"{folder} has no config.json (expected a transformers model folder)")])
    if not any(f.suffix in (".safetensors", ".bin") for f in folder.iterdir()):
        raise PlanError([("--model", f"{folder} has a config.json but no weights (*.safetensors, *.bin): "
                                     "this command runs the model")])
    return folder


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """The attention shape of a transformers config (Llama-family field names, text_config aware)."""
    text_config = config.get("text_config")
    config = text_config if isinstance(text_config, dict) and text_config else config
    try:
        heads = int(config["num_attention_heads"])
        layers = int(config["num_hidden_layers"])
        kv = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        max_pos = config.get("max_position_embeddings")
        max_pos = int(max_pos) if max_pos else None
    except (KeyError, TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
        raise PlanError([("", f"model config lacks a usable attention shape ({type(exc).__name__}: {exc})")]) from None
    name = config.get("_name_or_path")
    name = name if isinstance(name, str) and name else None
    try:
        return ModelShape(name=name, num_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                          head_dim=head_dim, max_position_embeddings=max_pos)
    except ValidationError as exc:
        raise PlanError([(f"model.{loc}", msg) for loc, msg in validation_problems(exc)]) from None


def load_model_shape(path: str | os.PathLike) -> ModelShape:
    return shape_from_config(read_model_config(path))


def shape_mismatches(plan: Plan, shape: ModelShape) -> list[tuple[str, str]]:
    """Located differences between a plan's model shape and a model's."""
    problems = []
    for field in ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
        have, want = getattr(plan.model, field), getattr(shape, field)
        if have != want:
            problems.append((f"model.{field}", f"is {have}, the model has {want}"))
    return problems


def check_fits(plan: Plan, shape: ModelShape) -> None:
    problems = shape_mismatches(plan, shape)
    if problems:
        raise PlanError(problems)


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
