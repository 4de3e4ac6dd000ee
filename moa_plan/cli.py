"""The ``moa-plan`` command line.

Each subcommand is a function returning an exit code. Bad input raises a ``Problems`` error
(``moa_plan.errors``), printed as ``FILE: location: message`` lines with exit 1, never a
traceback; a bad option is one line ``moa-plan CMD: --flag: message`` with exit 2, whether
argparse or a handler finds it. The heavy parts (search, evals, runtime) register their own
subcommands through ``register(subparsers)`` in their ``cli`` modules, which must import
nothing heavy at registration time. Argument types and option checks live in ``moa_plan.args``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from moa_plan import commands
from moa_plan.args import Parser
from moa_plan.errors import MAX_REPORTED, OptionError, Problems, UserError, report

__all__ = ["MAX_REPORTED", "build_parser", "main"]

EXTENSIONS = (
    "moa_plan.search.cli",
    "moa_plan.evals.cli",
    "moa_plan.evals.demo",
    "moa_plan.evals.bench.cli",
    "moa_plan.evals.bench.cpu",
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moa-plan",
        description="MoA plans: per-head sink + elastic window attention. Validate, inspect, "
        "search, run and evaluate them; `moa-plan COMMAND --help` for each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    except OptionError as exc:
        report(_prog(args), exc)
        return 2
    except Problems as exc:
        report(exc.source or "moa-plan", exc)
        return 1
    except KeyboardInterrupt:
        print("moa-plan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: not an error of ours
        sys.stderr.close()
        return 0


def _prog(args: argparse.Namespace) -> str:
    words = ["moa-plan", args.command] + ([args.eval_command] if getattr(args, "eval_command", None) else [])
    return " ".join(words)


if __name__ == "__main__":  # python -m moa_plan.cli
    sys.exit(main())
