"""JSON parsed strictly, with located one-line errors: malformed text (line, column), NaN / Infinity
literals and duplicate keys (field path) are problems, since plans and result files are data that
``json`` alone would read silently wrong.
"""

from __future__ import annotations

import json
import os
from typing import Any

from moa_plan.files import MAX_PLAN_BYTES, read_text_limited
from moa_plan.plan import PlanError, key_location


def format_location(loc: tuple[Any, ...]) -> str:
    """('layers', 3, 'heads', 7, 'beta') -> 'layers[3].heads[7].beta'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += key_location(str(part))
    return out.removeprefix(".")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


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


def read_json_limited(path: str | os.PathLike, limit: int = MAX_PLAN_BYTES) -> Any:
    """A JSON file (result files, profile metadata, configs) read and parsed as strictly as a plan."""
    return parse_json(read_text_limited(path, limit))
