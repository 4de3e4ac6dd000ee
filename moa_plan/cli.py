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

EXTENSIONS = ("moa_plan.search.cli", "moa_plan.evals.cli", "moa_plan.evals.demo", "moa_plan.evals.bench")


class UserError(Exception):
    """A located problem in a named input file: printed as 'FILE: location: message' lines."""

    def __init__(self, source: str, error: PlanError):
        self.source = source
        self.error = error
        super().__init__(str(error))


def _readable(n: int) -> str:
    """Large powers of two as 2^k (2^40, not 1099511627776)."""
    return f"2^{n.bit_length() - 1}" if n >= 1 << 16 and n & (n - 1) == 0 else str(n)


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers in [low, high] (no upper bound when ``high`` is None)."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {_readable(high)}], got {value}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return convert


def report(source: str, error: PlanError, stream=None) -> None:
    stream = stream or sys.stderr  # looked up per call, so redirected / captured stderr works
    for loc, msg in error.problems:
        print(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}", file=stream)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moa-plan", description="MoA plans: per-head sink + elastic window attention. Validate, inspect, "
                                     "search, run and evaluate them; `moa-plan COMMAND --help` for each command.")
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
