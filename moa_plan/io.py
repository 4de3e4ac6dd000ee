"""Reading and writing plan files and model configs, with located, one-line errors.

Plan files are data: parsed with ``json`` only, size-limited, never executed or unpickled.
Every input file (plans, configs, result files, profiles) is read by ``read_bytes_limited``:
only regular files, and never more than a limit, so a FIFO or a link to /dev/zero cannot hang
a command. Every write goes to a temporary file in the target folder and is renamed into place.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from moa_plan.plan import FORMAT_VERSION, ModelShape, Plan, PlanError, key_location

MAX_PLAN_BYTES = 64 * 1024 * 1024
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_RESULT_BYTES = 1024 * 1024 * 1024  # result files and profile metadata
STALE_TMP_SECONDS = 600  # a writer renames its temporary file within seconds; older ones were orphaned by a kill


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
    ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in (err.get("ctx") or {}).items()}
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"must be <= {ctx.get('le')}"
    if kind == "string_unicode":
        return "holds a lone surrogate (not valid Unicode text)"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind == "string_pattern_mismatch":
        return "must be one line without control characters"
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


class _Constant(str):
    """Marks where a NaN / Infinity literal sat, to locate it after parsing."""


def _constant_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], str]]:
    if isinstance(value, _Constant):
        return [(path, str(value))]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [found for key, item in items for found in _constant_paths(item, path + (key,))]


class _Duplicated(dict):
    """An object in which some key occurred twice (``keys`` lists them), to locate it after parsing."""

    keys: list[str]


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        obj = _Duplicated(obj)
        seen: set[str] = set()
        obj.keys = [k for k, _ in pairs if k in seen or seen.add(k)]
    return obj


def _duplicate_paths(value: Any) -> list[tuple[tuple[Any, ...], str]]:
    found, stack = [], [((), value)]
    while stack:  # iterative: the document may be nested as deep as json accepts
        path, item = stack.pop()
        if isinstance(item, _Duplicated):
            found += [(path, key) for key in dict.fromkeys(item.keys)]
        entries = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        stack += [(path + (k,), v) for k, v in entries]
    return sorted(found, key=str)


def parse_json(text: str) -> Any:
    """Parse JSON text strictly. Malformed JSON (line, column), NaN / Infinity literals and
    duplicate keys (field path) are located problems; a leading UTF-8 BOM is skipped."""
    text = text.removeprefix("\ufeff")
    try:
        return _check_duplicates(json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_pairs))
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
    raise PlanError(
        [(format_location(path), f"{name} is not valid JSON; must be a finite number") for path, name in found[:20]]
    )


def _check_duplicates(data: Any) -> Any:
    if isinstance(data, (dict, list)):
        found = _duplicate_paths(data)
        if found:
            raise PlanError(
                [
                    (format_location(path + (key,)), "duplicate key (a JSON object names each key once)")
                    for path, key in found[:20]
                ]
            )
    return data


def plan_from_json(text: str) -> Plan:
    """Parse and validate plan JSON text; every problem is a located PlanError."""
    return plan_from_data(parse_json(text))


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes_limited(path: str | os.PathLike, limit: int | None = MAX_PLAN_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (None: no limit); errors as PlanError.

    Anything else (a FIFO, a device such as /dev/zero, a folder) is refused before it is read,
    since its ``st_size`` says nothing; the read itself stops after ``limit + 1`` bytes, so a
    file that grows meanwhile (or a /proc file, whose size is 0) is still bounded.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise PlanError([("", f"cannot read: {_kind(st.st_mode)}, not a regular file")])
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # a FIFO swapped in cannot block
    except OSError as exc:
        raise PlanError([("", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PlanError([("", f"cannot read: {_kind(st.st_mode)}, not a regular file")])
        if limit is not None and st.st_size > limit:
            raise PlanError([("", f"file is {st.st_size} bytes, larger than the {limit}-byte limit")])
        chunks, total = [], 0
        while limit is None or total <= limit:
            chunk = os.read(fd, 1 << 20 if limit is None else min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise PlanError([("", f"cannot read: {exc.strerror or exc}")]) from None
    finally:
        os.close(fd)
    if limit is not None and total > limit:
        raise PlanError([("", f"file is larger than the {limit}-byte limit")])
    return b"".join(chunks)


def read_text_limited(path: str | os.PathLike, limit: int = MAX_PLAN_BYTES) -> str:
    """Read a UTF-8 text file (``read_bytes_limited``; a BOM is dropped); errors as PlanError."""
    raw = read_bytes_limited(path, limit).removeprefix(b"\xef\xbb\xbf")
    if not raw.strip():
        raise PlanError([("", "file is empty")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError([("", f"not UTF-8 text (byte {exc.start})")]) from None


def read_json_limited(path: str | os.PathLike, limit: int = MAX_PLAN_BYTES) -> Any:
    """A JSON file (result files, profile metadata, configs) read and parsed as strictly as a plan."""
    return parse_json(read_text_limited(path, limit))


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


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, else 0666 less the process umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.NAME.*.tmp`` siblings left by a writer that was killed before its rename."""
    cutoff = time.time() - STALE_TMP_SECONDS
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if tmp.lstat().st_mtime < cutoff:
                tmp.unlink()


def check_writable_target(path: str | os.PathLike) -> None:
    """OSError unless ``path`` is absent or a regular file: a rename must never replace a folder,
    a device (``/dev/null``) or a FIFO."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise OSError(0, f"{_kind(st.st_mode)}, not a regular file")


def write_atomic(path: str | os.PathLike, text: str | bytes) -> None:
    """Write a file through a temporary sibling and rename, so no half-written file is ever seen;
    the folder is synced after the rename, so the new name survives a crash."""
    path = Path(path)
    check_writable_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
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
    with contextlib.suppress(OSError):  # not every file system can sync a folder
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def exclusive(path: str | os.PathLike):
    """Hold an exclusive lock on ``path`` (a result file several runs might resume) for the block.

    A second writer would otherwise overwrite the first one's cells with its own; it is refused
    instead. The lock (``flock`` on a hidden ``.NAME.lock`` sibling) ends with the process, kill -9
    included.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PlanError(
                [("", "another moa-plan run is writing this file now; wait for it or choose another output")],
                source=str(path),
            ) from None
        yield
    finally:
        os.close(fd)


def save_plan(plan: Plan, path: str | os.PathLike) -> None:
    """Write a plan as JSON, atomically."""
    write_atomic(path, plan_to_json(plan))


# ---- model configs -------------------------------------------------------------------------


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """A transformers ``config.json`` (or a folder holding one) as a dict; errors as PlanError."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    data = read_json_limited(path, MAX_CONFIG_BYTES)
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
        raise PlanError(
            [
                (
                    "--model",
                    f"{folder} has a config.json but no weights (*.safetensors, *.bin): this command runs the model",
                )
            ]
        )
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
        return ModelShape(
            name=name,
            num_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
        )
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
