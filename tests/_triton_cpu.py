"""Import the Triton kernels in interpreter mode (CPU): TRITON_INTERPRET must be set before
triton.jit decorates them, so set it here and reload the kernel modules if something imported
them earlier without it. The interpreter computes bf16 wrong, so CPU tests use fp16/fp32. On a
machine with CUDA the modules that import this are skipped: reloading the kernels as interpreted
would make every GPU test of the same run fail (measured on an H100: 4 of 4 GPU kernel tests fail
after test_kernels_decode.py is collected, all pass alone)."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if torch.cuda.is_available():  # the interpreted kernels would replace the compiled ones for the whole run
    pytest.skip(
        "interpreter tests run where there is no GPU; here the compiled kernels are tested "
        "(test_kernels_gpu.py, test_graph_gpu.py)",
        allow_module_level=True,
    )

os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

# kernels before their launchers: a reloaded launcher then imports the interpreted kernels
_MODULES = (
    "triton_common",
    "triton_prefill_kernel",
    "triton_paged_kernel",
    "triton_decode_kernel",
    "triton_prefill",
    "triton_decode",
    "triton_sink_fold",
    "cudnn_band_prefill",
)


def _compiled(mod) -> bool:
    """Whether the module holds a kernel decorated without the interpreter."""
    return any(type(v).__name__ == "JITFunction" for v in vars(mod).values())


def kernels():
    """(triton_prefill, triton_decode) modules whose kernels run in the interpreter."""
    mods = {}
    for short in _MODULES:
        name = f"moa_plan.runtime.{short}"
        mod = importlib.import_module(name)
        if _compiled(mod):
            mod = importlib.reload(sys.modules[name])
        mods[short] = mod
    return mods["triton_prefill"], mods["triton_decode"]


def band_prefill():
    """The cudnn_band_prefill module with its sink fold running in the interpreter."""
    kernels()
    return sys.modules["moa_plan.runtime.cudnn_band_prefill"]
