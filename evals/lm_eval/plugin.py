"""Registration of the ``moa`` model and of our task folder with lm-eval (called by the .pth hook).

Kept free of torch / transformers imports: the model class is registered by import path and is
only imported when lm-eval asks for the ``moa`` model.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

MODEL_NAME = "moa"
MODEL_TARGET = "moa_plan.evals.lm_eval.model:MoALM"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def include_path() -> Path:
    """The folder holding the ``moa_longeval_lines`` / ``moa_passkey`` task YAMLs."""
    return TASKS_DIR


def register_model() -> None:
    """Register ``moa`` in lm-eval's model registry (lazy import path; idempotent)."""
    import lm_eval.models  # noqa: F401  (fills the registry with the built-in models first)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def on_models_module(module: ModuleType) -> None:
    """Post-import callback for ``lm_eval.models``."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def _with_our_tasks(include: Any) -> Any:
    paths = [] if include is None else list(include) if isinstance(include, (list, tuple)) else [include]
    resolved = set()
    for p in paths:
        try:
            resolved.add(Path(p).resolve())
        except (TypeError, OSError):
            pass
    if TASKS_DIR in resolved:
        return include
    return paths + [str(TASKS_DIR)]


def on_task_manager_module(module: ModuleType) -> None:
    """Post-import callback for ``lm_eval.tasks.manager``: our tasks join the default task folders."""
    cls = getattr(module, "TaskManager", None)
    if cls is None or getattr(cls.__init__, "_moa_plan_tasks", False):
        return
    original = cls.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        if bound.arguments.get("include_defaults", True):
            bound.arguments["include_path"] = _with_our_tasks(bound.arguments.get("include_path"))
        original(*bound.args, **bound.kwargs)

    __init__._moa_plan_tasks = True  # type: ignore[attr-defined]
    cls.__init__ = __init__
