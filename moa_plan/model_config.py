"""A model's transformers ``config.json`` read as its attention shape, and the check that a plan fits it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from moa_plan.files import MAX_CONFIG_BYTES
from moa_plan.io import validation_problems
from moa_plan.plan import ModelShape, Plan, PlanError
from moa_plan.strict_json import read_json_limited


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """A transformers ``config.json`` (or a folder holding one) as a dict; errors as PlanError."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    data = read_json_limited(path, MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise PlanError([("", "a model config must be a JSON object")])
    return data


def model_folder(path: str | os.PathLike) -> Path:
    """The folder of a model given as a folder or as its ``config.json``, for commands that run the
    model: a ``--model`` error when it holds no config.json or no weights."""
    p = Path(path)
    folder = p.parent if p.is_file() and p.name == "config.json" else p
    if not folder.is_dir():
        raise PlanError([("--model", f"{path}: not a model folder or its config.json")])
    if not (folder / "config.json").is_file():
        raise PlanError([("--model", f"{folder} has no config.json (expected a transformers model folder)")])
    if not any(f.suffix in (".safetensors", ".bin") for f in folder.iterdir()):
        raise PlanError(
            [
                (
                    "--model",
                    f"{folder} has a config.json but no weights (*.safetensors, *.bin): this command runs the model",
                )
            ]
        )
    return folder


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """The attention shape of a transformers config (Llama-family field names, text_config aware)."""
    text_config = config.get("text_config")
    config = text_config if isinstance(text_config, dict) and text_config else config
    try:
        heads = int(config["num_attention_heads"])
        layers = int(config["num_hidden_layers"])
        kv = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        max_pos = config.get("max_position_embeddings")
        max_pos = int(max_pos) if max_pos else None
    except (KeyError, TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
        raise PlanError([("", f"model config lacks a usable attention shape ({type(exc).__name__}: {exc})")]) from None
    name = config.get("_name_or_path")
    name = name if isinstance(name, str) and name else None
    try:
        return ModelShape(
            name=name,
            num_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
        )
    except ValidationError as exc:
        raise PlanError([(f"model.{loc}", msg) for loc, msg in validation_problems(exc)]) from None


def load_model_shape(path: str | os.PathLike) -> ModelShape:
    return shape_from_config(read_model_config(path))


def shape_mismatches(plan: Plan, shape: ModelShape) -> list[tuple[str, str]]:
    """Located differences between a plan's model shape and a model's."""
    problems = []
    for field in ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
        have, want = getattr(plan.model, field), getattr(shape, field)
        if have != want:
            problems.append((f"model.{field}", f"is {have}, the model has {want}"))
    return problems


def check_fits(plan: Plan, shape: ModelShape) -> None:
    problems = shape_mismatches(plan, shape)
    if problems:
        raise PlanError(problems)
