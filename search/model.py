"""Loading a local transformers causal LM and its tokenizer for calibration and profiling (offline)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moa_plan.io import load_model_shape, model_folder
from moa_plan.plan import ModelShape, PlanError


def check_model_dir(path: str | os.PathLike) -> Path:
    """A model folder (given as the folder or its config.json) with weights, or a located error."""
    return model_folder(path)


def model_shape(path: str | os.PathLike) -> ModelShape:
    shape = load_model_shape(check_model_dir(path))
    return shape.model_copy(update={"name": model_name(path)})


def model_name(path: str | os.PathLike) -> str:
    """What a shared file should record of a model: its hub-style name from config.json when it
    has one (not a local path), else the folder's name; never a home directory."""
    from moa_plan.io import read_model_config

    path = check_model_dir(path)
    try:
        name = read_model_config(path).get("_name_or_path") or ""
    except PlanError:
        name = ""
    name = name if isinstance(name, str) else ""
    if not name or "/" not in name or Path(name).is_absolute() or name.startswith("."):
        return path.resolve().name
    return name


def load(path: str | os.PathLike, attn_implementation: str = "sdpa", dtype: str = "float32",
         device: str = "auto") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) on ``device`` ('auto': CUDA when available, else CPU);
    never touches the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model folder
        raise PlanError([("--model", f"cannot load a tokenizer from {path}: {exc}")]) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                     attn_implementation=attn_implementation)
    except Exception as exc:  # noqa: BLE001
        raise PlanError([("--model", f"cannot load a causal LM from {path}: {exc}")]) from None
    model.eval()
    model.to(resolve_device(device))
    return model, tok


def resolve_device(device: str) -> str:
    """'auto' as CUDA when available, else CPU; a ``--device`` error for one this machine lacks."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise PlanError([("--device", f"{device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)")]) from None
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise PlanError([("--device", f"{device}: no such CUDA device here")])
    return device
