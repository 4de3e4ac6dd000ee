"""A plan on a transformers model: ``apply_plan`` (check the plan fits, select the 'moa' attention of
``hf``, refuse inputs it cannot honour) and ``load_model``; the model's ``generate`` then supplies a
``MoACache`` sized prompt + max_new_tokens unless given a cache."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from moa_plan.build import plan_for_pretrained, plan_from_spec
from moa_plan.model_config import check_fits, read_model_config, shape_from_config
from moa_plan.plan import Plan, PlanError
from moa_plan.runtime.hf import ATTN_NAME, CACHE_ARG, MoACache, PlanState, check_call, register


def model_shape(model: PreTrainedModel):
    """The attention shape of a transformers model (from its config)."""
    config = model.config.get_text_config(decoder=True)
    shape = shape_from_config(config.to_dict())
    name = getattr(model.config, "_name_or_path", None) or None
    return shape.model_copy(update={"name": name}) if name else shape


def resolve_plan(plan: Plan | str | os.PathLike, model: PreTrainedModel) -> Plan:
    """A Plan from a Plan or a plan string (``moa_plan.build.plan_from_spec``: a file, 'dense',
    'uniform:<density>' or 'uniform:<density>@<length>')."""
    if isinstance(plan, Plan):
        return plan
    return plan_from_spec(str(plan), model_shape(model))


def _attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int) and type(m).__name__.endswith("Attention")
    ]


def apply_plan(model: PreTrainedModel, plan: Plan | str | os.PathLike) -> PreTrainedModel:
    """Make ``model`` attend as ``plan`` says (in place; returns the model).

    Checks the plan fits the model's attention shape (PlanError with located problems), registers
    and selects the 'moa' attention, stores the plan (``model.moa_plan``, ``config.moa_plan``) and
    makes ``model.generate`` use a ``MoACache`` unless a cache is passed.
    """
    plan = resolve_plan(plan, model)
    check_fits(plan, model_shape(model))
    modules = _attention_modules(model)
    found = sorted({m.layer_idx for m in modules})
    if found != list(range(plan.model.num_layers)):
        raise PlanError(
            [
                (
                    "model",
                    f"{type(model).__name__}: found attention modules for layers {found}, "
                    f"expected 0..{plan.model.num_layers - 1} (not a supported Llama-family model?)",
                )
            ]
        )
    register()
    decoder = model.get_decoder()
    if getattr(decoder, "_moa_input_check", None) is None:
        decoder._moa_input_check = decoder.register_forward_pre_hook(check_call, with_kwargs=True)
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        raise PlanError([("model", f"{type(model).__name__} does not accept a custom attention implementation")])
    state = PlanState(plan)
    for m in modules:
        m.moa_state = state
    model.moa_plan = plan
    model.config.moa_plan = plan.model_dump(mode="json", exclude_none=True)
    model.generate = functools.partial(_generate, model)
    return model


def _generation_length(model: PreTrainedModel, args: tuple, kwargs: dict) -> int | None:
    """Prompt + new tokens of a generate call, or None when it cannot be told."""
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if inputs is None and kwargs.get("inputs_embeds") is not None:
        inputs = kwargs["inputs_embeds"]
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        return None
    config = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens", config.max_new_tokens)
    if new is not None:
        return inputs.shape[1] + int(new)
    total = kwargs.get("max_length", config.max_length)
    return int(total) if total is not None else None


def _generate(model: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
    """``generate`` with a MoACache of n_max = prompt + max_new_tokens unless a cache is given; plain
    greedy decoding on CUDA replays one captured decode step (``graph_generate``)."""
    wants_cache = (
        kwargs.get("cache") is None
        and kwargs.get("past_key_values") is None
        and kwargs.get("use_cache", True) is not False
        and kwargs.get("cache_implementation") is None
    )
    if wants_cache:
        from moa_plan.runtime.graph_generate import fast_path, generate_greedy

        fast = fast_path(model, args, kwargs)
        if fast is not None:
            return generate_greedy(model, **fast)
        n_max = _generation_length(model, args, kwargs)
        if n_max is not None:
            kwargs[CACHE_ARG] = MoACache(model, n_max)
    return type(model).generate(model, *args, **kwargs)


def load_model(
    pretrained: str | os.PathLike, plan: Plan | str | os.PathLike | None = None, **from_pretrained_kwargs: Any
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(pretrained, **kwargs)`` with ``plan`` applied.

    ``plan``: a Plan, a plan file, 'dense', 'uniform:<density>[@<length>]', or None for the plan
    stored in the model's config by ``apply_plan`` + ``save_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    if Path(pretrained).is_dir():
        read_model_config(pretrained)  # a config transformers would read without bound is refused first
    if plan is not None:
        plan = plan_for_pretrained(plan, pretrained)  # a bad plan is reported before any weights are read
    model = AutoModelForCausalLM.from_pretrained(pretrained, **from_pretrained_kwargs)
    if plan is None:
        stored = getattr(model.config, "moa_plan", None)
        if stored is None:
            raise PlanError([("plan", f"none given and {pretrained} stores none")])
        from moa_plan.io import plan_from_data

        plan = plan_from_data(stored)
    return apply_plan(model, plan)
