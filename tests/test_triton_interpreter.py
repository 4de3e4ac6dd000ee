"""The interpreter check: a working interpreter passes the probe, a broken one stops a launch with
one line (Triton 3.6's interpreter under NumPy 2.4 is the known case)."""

from __future__ import annotations

import pytest

from moa_plan.runtime import triton_interpreter


def test_probe_passes_on_this_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_interpreter._interpreter_problem.cache_clear()
    try:
        assert triton_interpreter._interpreter_problem() is None
        triton_interpreter.check_interpreter()
    finally:
        triton_interpreter._interpreter_problem.cache_clear()


def test_broken_interpreter_gives_one_line(monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

            return launch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_interpreter, "_loop_bound_probe", Broken())
    triton_interpreter._interpreter_problem.cache_clear()
    try:
        with pytest.raises(RuntimeError) as err:
            triton_interpreter.check_interpreter()
        assert "\n" not in str(err.value) and "numpy<2.4" in str(err.value)
    finally:
        triton_interpreter._interpreter_problem.cache_clear()


def test_no_check_on_the_gpu_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_interpreter, "_interpreter_problem", lambda: "must not be called")
    triton_interpreter.check_interpreter()
