"""moa_plan.runtime: attention that follows a plan (dense reference, Triton kernels, KV cache, transformers).

``apply_plan``, ``load_model`` and ``MoACache`` live in ``moa_plan.runtime.hf``; they are loaded on
first use so that importing the kernels or the cache does not import transformers.
"""

from typing import Any

_HF_NAMES = ("apply_plan", "load_model", "MoACache", "moa_attention_forward")
__all__ = [*_HF_NAMES, "memory_report"]


def __getattr__(name: str) -> Any:
    if name in _HF_NAMES:
        from moa_plan.runtime import hf

        return getattr(hf, name)
    if name == "memory_report":
        from moa_plan.runtime.cache import memory_report

        return memory_report
    raise AttributeError(f"module 'moa_plan.runtime' has no attribute {name!r}")
