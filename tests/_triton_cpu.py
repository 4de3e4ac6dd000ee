"""Import the Triton kernels in interpreter mode (CPU): TRITON_INTERPRET must be set before
triton.jit decorates them, so set it here and reload the kernel modules if something imported
them earlier without it. The interpreter computes bf16 wrong, so CPU tests use fp16/fp32."""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

triton = __import__("pytest").importorskip("triton")


def kernels():
    """(triton_prefill, triton_decode) modules whose kernels run in the interpreter."""
    mods = []
    for name in ("moa_plan.runtime.triton_prefill", "moa_plan.runtime.triton_decode"):
        mod = importlib.import_module(name)
        kern = getattr(mod, "_prefill_kernel", None) or getattr(mod, "_decode_kernel")
        if type(kern).__name__ != "InterpretedFunction":
            mod = importlib.reload(sys.modules[name])
        mods.append(mod)
    return tuple(mods)
