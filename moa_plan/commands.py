"""Plan-format subcommands of ``moa-plan`` (validate, show, density, uniform, import/export, schema)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the plan-format subcommands."""
