"""moa_plan.runtime.vllm: serve any MoA plan with vLLM, through vLLM's public extension points.

vLLM runs ``register`` (entry point group ``vllm.general_plugins``) once in every process it
starts, so it only registers, idempotently: ``MoABackend`` (``moa_plan.runtime.vllm.backend``) for
the ``CUSTOM`` slot (``--attention-backend CUSTOM`` on CUDA), and, when a plan is given, as the
override of ``CPU_ATTN`` on CPU (vLLM's CPU platform picks ``CPU_ATTN`` whatever is selected).

The plan is the environment variable ``MOA_PLAN`` (every vLLM process inherits it): a plan file,
``dense``, ``uniform:<density>`` or ``uniform:<density>@<length>`` (``moa_plan.build.plan_from_spec``).
It is checked against the served model's config where the model is first known: in the front
process of ``vllm serve MODEL_DIR`` or of the OpenAI server module (one ``FILE: location: message`` line per problem on stderr,
exit 1, before any engine starts), else when vLLM builds the model (``MoAPlanError``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moa_plan.build import plan_from_spec
from moa_plan.errors import problem_lines
from moa_plan.plan import ModelShape, Plan, PlanError

PLAN_ENV = "MOA_PLAN"
BACKEND_PATH = "moa_plan.runtime.vllm.backend.MoABackend"
_registered = False


@dataclass(frozen=True)
class LocalRules:
    """This rank's share of the plan: rules of its query heads, every layer."""

    alphas: Any  # torch.Tensor, float64 [L, H_local]
    betas: Any
    sink: int


def local_rules(plan, rank: int, heads: int) -> LocalRules:
    """Rules of query heads [rank * heads, (rank + 1) * heads) of every layer (vLLM's TP split)."""
    lo, hi = rank * heads, (rank + 1) * heads
    if hi > plan.model.num_attention_heads:
        raise MoAPlanError(
            f"{PLAN_ENV}: rank {rank} holds query heads {lo}..{hi - 1}, the plan has {plan.model.num_attention_heads}"
        )
    import torch

    alphas = torch.tensor([row[lo:hi] for row in plan.alphas()], dtype=torch.float64)
    betas = torch.tensor([row[lo:hi] for row in plan.betas()], dtype=torch.float64)
    return LocalRules(alphas, betas, plan.sink)


class MoAPlanError(RuntimeError):
    """The plan in MOA_PLAN is unreadable or does not fit the served model; str() is the located lines."""


def plan_spec() -> str | None:
    """The MOA_PLAN setting, or None when unset or empty."""
    return os.environ.get(PLAN_ENV, "").strip() or None


def resolve(spec: str, shape: ModelShape) -> Plan:
    """The plan named by ``spec`` for a model of this shape; MoAPlanError with the same lines as
    ``moa-plan validate PLAN --model MODEL`` (the file is the source; MOA_PLAN for a plan string)."""
    is_string = spec == "dense" or spec.startswith("uniform:")
    try:
        return plan_from_spec(spec, shape, where="")
    except PlanError as exc:
        raise MoAPlanError("\n".join(problem_lines(PLAN_ENV if is_string else spec, exc))) from None
    except (OSError, ValueError) as exc:
        raise MoAPlanError(f"{spec}: cannot process: {type(exc).__name__}: {exc}") from None


def served_model(argv: list[str]) -> str | None:
    """MODEL of a ``vllm serve MODEL ...`` / ``vllm serve --model MODEL ...`` or ``python -m
    vllm.entrypoints.openai.api_server --model MODEL ...`` command line, else None."""
    serve = len(argv) >= 3 and argv[1] == "serve"
    if not (serve or (argv and Path(argv[0]).name == "api_server.py")):
        return None
    if serve and not argv[2].startswith("-"):
        return argv[2]
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return None


def check_served_model(argv: list[str]) -> None:
    """In ``vllm serve`` with a local model folder: refuse a bad plan before vLLM starts anything
    (the lines on stderr, exit 1). Models vLLM must fetch are checked when it builds them."""
    spec, model = plan_spec(), served_model(argv)
    if spec is None or model is None or not (Path(model) / "config.json").is_file():
        return
    from moa_plan.model_config import load_model_shape

    try:
        shape = load_model_shape(model)
    except PlanError:
        return  # vLLM reports an unusable config itself
    try:
        resolve(spec, shape)
    except MoAPlanError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from None


def register() -> None:
    """The vLLM general plugin: register the backend (see the module docstring). Idempotent."""
    global _registered
    if _registered:
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    if plan_spec() is not None:
        check_served_model(sys.argv)
        if current_platform.is_cpu():
            register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
    _registered = True
