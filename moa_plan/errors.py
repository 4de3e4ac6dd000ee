"""The error types every command prints as located one-line problems (never a traceback).

``Problems`` carries (location, message) pairs and the file they are in. ``PlanError`` is for
plans and their pairing with a model; ``UsageError`` for every other bad input (data files,
result files, model folders), ``SettingError`` for a bad environment setting (``SettingUnavailable``
for one this installation cannot honour); ``OptionError`` for a bad command-line option (exit 2).
"""

from __future__ import annotations

import re

MAX_REPORTED = 50  # problems shown per file (printed lines, or an exception's message); the rest are counted


def printable(text: str, limit: int | None = None) -> str:
    """``text`` safe for a terminal line: control characters and lone surrogates escaped as in
    JSON (so a name cannot move the cursor or recolour the screen), cut to ``limit`` characters."""
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return re.sub(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)


class Problems(Exception):
    """Located problems: ``problems`` holds (location, message) pairs, ``source`` the file they
    are in when one is (printed first: ``FILE: location: message``)."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        shown = problems[:MAX_REPORTED]
        text = "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in shown)
        if len(problems) > MAX_REPORTED:
            text += f"; ... and {len(problems) - MAX_REPORTED} more problems"
        super().__init__(printable(f"{source}: {text}" if source else text))


class PlanError(Problems):
    """A plan (or its pairing with a model) is invalid."""


class UsageError(Problems):
    """Bad input that is not a plan: a data or result file, a model folder, a setting."""


class SettingError(UsageError, ValueError):
    """A bad environment setting (location: ``VAR=value``); a ValueError too, as before it had a type."""

    def __init__(self, env: str, value: str, message: str):
        super().__init__([(f"{env}={value!r}", message)])


class SettingUnavailable(SettingError, RuntimeError):
    """A valid setting this installation cannot honour (its kernels or extra are missing); a
    RuntimeError too, as before it had a type."""


class OptionError(UsageError):
    """A bad command-line option (location: the flag): printed as 'moa-plan CMD: --flag: message', exit 2."""


class UserError(Exception):
    """A located problem in a named input file: printed as 'FILE: location: message' lines."""

    def __init__(self, source: str, error: Problems):
        self.source = source
        self.error = error
        super().__init__(str(error))


def problem_lines(source: str, error: Problems) -> list[str]:
    """One 'FILE: location: message' line per problem."""
    return [f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}" for loc, msg in error.problems]


def report(source: str, error: Problems, stream=None) -> None:
    """One line per problem, at most MAX_REPORTED of them (then a count), control characters escaped."""
    import sys

    stream = stream or sys.stderr  # looked up per call, so redirected / captured stderr works
    problems = error.problems
    if len(problems) > MAX_REPORTED:
        problems = problems[:MAX_REPORTED] + [("", f"... and {len(problems) - MAX_REPORTED} more problems")]
    for line in problem_lines(source, Problems(problems)):
        print(printable(line), file=stream)
