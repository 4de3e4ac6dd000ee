"""The ``moa-plan`` command line.

Each subcommand is a function returning an exit code. Bad input raises PlanError, printed as
``FILE: location: message`` lines with exit 1, never a traceback; a bad option is one line
``moa-plan CMD: --flag: message`` with exit 2, whether argparse or a handler finds it. The
heavy parts (search, evals, runtime) register their own subcommands through
``register(subparsers)`` in their ``cli`` modules, which must import nothing heavy at
registration time.

This module is also the one place for checking options before any work starts: the argparse
types ``int_in`` / ``float_in`` and ``check_output`` / ``check_device``, which raise
``OptionError``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from moa_plan.plan import MAX_REPORTED, PlanError, printable

EXTENSIONS = ("moa_plan.search.cli", "moa_plan.evals.cli", "moa_plan.evals.demo", "moa_plan.evals.bench",
              "moa_plan.evals.bench_cpu")


class UserError(Exception):
    """A located problem in a named input file: printed as 'FILE: location: message' lines."""

    def __init__(self, source: str, error: PlanError):
        self.source = source
        self.error = error
        super().__init__(str(error))


class OptionError(PlanError):
    """A bad command-line option (location: the flag): printed as 'moa-plan CMD: --flag: message', exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line 'moa-plan CMD: --flag: message' (exit 2), not usage + error."""

    def error(self, message: str) -> None:
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def float_in(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` accepting finite numbers in the interval (``*_open``: bound excluded)."""
    shown = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"must be in {shown}, got {text}")
        return value

    return convert


def check_output(flag: str, path: str | os.PathLike, folder: bool = False) -> None:
    """OptionError unless an output (a file, or with ``folder`` a folder) can be written at
    ``path``: checked before any work, so a long run cannot fail at its first write."""
    path = Path(path)
    if folder:
        if path.exists() and not path.is_dir():
            raise OptionError([(flag, f"{path} exists and is not a folder")])
        target_dir = path
    else:
        if path.is_dir():
            raise OptionError([(flag, f"{path} is a folder; give a file name")])
        if path.exists() and not path.is_file():
            raise OptionError([(flag, f"{path} is not a regular file")])
        target_dir = path.parent
    existing = target_dir
    while not existing.exists():  # the nearest folder that exists must let us create what is missing
        existing = existing.parent
    if not existing.is_dir():
        raise OptionError([(flag, f"{existing} is not a folder")])
    try:
        fd, probe = tempfile.mkstemp(prefix=".moa-plan-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OptionError([(flag, f"cannot write in {existing}: {exc.strerror or exc}")]) from None


def check_device(flag: str, text: str, allow_auto: bool = False) -> None:
    """OptionError unless ``text`` names a torch device this machine has ('auto' if allowed)."""
    if allow_auto and text == "auto":
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise OptionError([(flag, f"not a torch device: {text!r} (use cpu, cuda or cuda:N"
                                  f"{', or auto' if allow_auto else ''})")]) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError([(flag, f"{text}: CUDA is not available on this machine")])
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError([(flag, f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")])
    elif device.type != "cpu":
        raise OptionError([(flag, f"{text}: only cpu and cuda devices are supported")])


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


def problem_lines(source: str, error: PlanError) -> list[str]:
    """One 'FILE: location: message' line per problem."""
    return [f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}" for loc, msg in error.problems]


def report(source: str, error: PlanError, stream=None) -> None:
    """One line per problem, at most MAX_REPORTED of them (then a count), control characters escaped."""
    stream = stream or sys.stderr  # looked up per call, so redirected / captured stderr works
    problems = error.problems
    if len(problems) > MAX_REPORTED:
        problems = problems[:MAX_REPORTED] + [("", f"... and {len(problems) - MAX_REPORTED} more problems")]
    for line in problem_lines(source, PlanError(problems)):
        print(printable(line), file=stream)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    except OptionError as exc:
        report(_prog(args), exc)
        return 2
    except PlanError as exc:
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


if __name__ == "__main__":  # python -m moa_plan.cli: run the imported module, whose classes the commands share
    from moa_plan.cli import main as _main

    sys.exit(_main())
