"""Shared command-line argument types and checks: one comma-list parser, one flag style
(``--lengths 1024,4096``), and the checks every command runs before any work starts.

Argparse ``type`` functions raise ``ArgumentTypeError`` (argparse prints one line, exit 2);
the ``check_*`` functions raise ``OptionError`` naming the flag.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from moa_plan.errors import OptionError
from moa_plan.plan import MAX_LENGTH


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line 'moa-plan CMD: --flag: message' (exit 2), not usage + error."""

    def error(self, message: str) -> None:
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


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


def comma_list(item: Callable[[str], object], empty: bool = False) -> Callable[[str], list]:
    """An argparse ``type`` for 'a,b,c' (spaces allowed): each part converted by ``item`` (an
    argparse type), in the given order; '' is the empty list only when ``empty``."""

    def convert(text: str) -> list:
        parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
        if not parts and not empty:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        out = []
        for part in parts:
            try:
                out.append(item(part))
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(f"{part}: {exc}") from None
        return out

    return convert


def choice_list(choices: tuple[str, ...] | list[str], empty: bool = False) -> Callable[[str], list[str]]:
    """An argparse ``type`` for a comma list of names from ``choices``."""

    def item(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return text

    return comma_list(item, empty)


positive = int_in(1)
nonnegative = int_in(0)
length = int_in(1, MAX_LENGTH)
lengths = comma_list(length)
density = float_in(0, 1, low_open=True)
densities = comma_list(density)
names = comma_list(str, empty=True)


def add_model_flag(p: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    """``--model``: a model folder or its config.json (what each command accepts beyond that, in ``help``)."""
    p.add_argument("--model", required=required, metavar="CONFIG_OR_DIR", help=help)


def add_run_flags(p: argparse.ArgumentParser, overwrite: bool = True) -> None:
    """The flags of every long job: --quiet (--no-progress is its old, hidden name) and --overwrite."""
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)
    if overwrite:
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="start the output afresh (default: resume it; a settings mismatch is refused)",
        )


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
        raise OptionError(
            [(flag, f"not a torch device: {text!r} (use cpu, cuda or cuda:N{', or auto' if allow_auto else ''})")]
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError([(flag, f"{text}: CUDA is not available on this machine")])
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError([(flag, f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")])
    elif device.type != "cpu":
        raise OptionError([(flag, f"{text}: only cpu and cuda devices are supported")])


def check_dtype(flag: str, text: str) -> None:
    """OptionError unless ``text`` names a floating-point torch dtype."""
    import torch

    dtype = getattr(torch, text, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise OptionError([(flag, f"not a floating-point torch dtype: {text!r} (e.g. float32, bfloat16)")])


def settings_from(cls, args: argparse.Namespace, **override):
    """A typed settings object (a dataclass) from parsed arguments: each field is the flag of
    the same name; ``override`` replaces or adds values."""
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **override})
