"""Triton's CPU interpreter (TRITON_INTERPRET=1), which the CPU tests run the kernels under: whether
it is on, and whether this Triton + NumPy pair can run our kernels there.

Triton 3.6's interpreter holds every scalar as a one-element 1-D array and turns a loop bound into
an int with ``int(array)``, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to
Python scalars"); later Triton releases squeeze the array first. Every kernel here loops over key
blocks with bounds computed in the kernel, so with that pair each launch would fail deep inside
the interpreter. A probe kernel finds out once and the launch stops with one line instead.
"""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _loop_bound_probe(out, n):
    total = 0
    for i in range(0, n):
        total += i
    tl.store(out, total)


@functools.cache
def _interpreter_problem() -> str | None:
    import numpy as np
    import torch

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_bound_probe[(1,)](out, 3)
    except Exception:  # noqa: BLE001 - any failure of the probe is the incompatibility reported below
        return (
            f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run kernels with "
            f"computed loop bounds under NumPy {np.__version__}: use a newer Triton or numpy<2.4"
        )
    return None if int(out[0]) == 3 else "Triton's interpreter ran the loop-bound probe wrongly"


def check_interpreter() -> None:
    """Under TRITON_INTERPRET=1, raise RuntimeError (one line) where the interpreter cannot run our
    kernels; a no-op on the GPU."""
    if interpreting():
        problem = _interpreter_problem()
        if problem:
            raise RuntimeError(problem)
