"""moa_plan.runtime: attention that follows a plan (dense reference, Triton kernels, KV cache, transformers).

``apply_plan`` and ``load_model`` live in ``moa_plan.runtime.hf_apply``, ``MoACache`` and the attention
function in ``moa_plan.runtime.hf``; they are loaded on first use so that importing the kernels or
the cache does not import transformers.
"""

from typing import Any

_HF_NAMES = {"apply_plan": "hf_apply", "load_model": "hf_apply", "MoACache": "hf", "moa_attention_forward": "hf"}
__all__ = [*_HF_NAMES, "memory_report"]


def __getattr__(name: str) -> Any:
    if name in _HF_NAMES:
        import importlib

        return getattr(importlib.import_module(f"moa_plan.runtime.{_HF_NAMES[name]}"), name)
    if name == "memory_report":
        from moa_plan.runtime.cache import memory_report

        return memory_report
    raise AttributeError(f"module 'moa_plan.runtime' has no attribute {name!r}")
