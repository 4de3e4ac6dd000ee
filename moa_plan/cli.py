"""The ``moa-plan`` command line.

Each subcommand is a function returning an exit code. Bad input raises PlanError, printed as
``FILE: location: message`` lines with exit 1, never a traceback. The heavy parts (search,
evals, runtime) register their own subcommands through ``register(subparsers)`` in their
``cli`` modules, which must import nothing heavy at registration time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from moa_plan.plan import PlanError

EXTENSIONS = ("moa_plan.search.cli", "moa_plan.evals.cli", "moa_plan.evals.bench")


class UserError(Exception):
    """A located problem in a named input file: printed as 'FILE: location: message' lines."""

    def __init__(self, source: str, error: PlanError):
        self.source = source
        self.error = error
        super().__init__(str(error))


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers in [low, high] (no upper bound when ``high`` is None)."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return convert


def problem_lines(source: str, error: PlanError) -> list[str]:
    """One 'FILE: location: message' line per problem."""
    return [f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}" for loc, msg in error.problems]


def report(source: str, error: PlanError, stream=None) -> None:
    stream = stream or sys.stderr  # looked up per call, so redirected / captured stderr works
    for line in problem_lines(source, error):
        print(line, file=stream)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moa-plan", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from moa_plan import commands

    commands.register(sub)
    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UserError as exc:
        report(exc.source, exc.error)
        return 1
    except PlanError as exc:
        report("moa-plan", exc)
        return 1
    except KeyboardInterrupt:
        print("moa-plan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
