"""Import the Triton kernels in interpreter mode (CPU): TRITON_INTERPRET must be set before
triton.jit decorates them, so set it here and reload the kernel modules if something imported
them earlier without it. The interpreter computes bf16 wrong, so CPU tests use fp16/fp32."""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

triton = __import__("pytest").importorskip("triton")

# kernels before their launchers: a reloaded launcher then imports the interpreted kernels
_MODULES = (
    "triton_common",
    "triton_prefill_kernel",
    "triton_paged_kernel",
    "triton_decode_kernel",
    "triton_prefill",
    "triton_decode",
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
