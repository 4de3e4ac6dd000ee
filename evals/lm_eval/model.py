"""``lm_eval --model moa``: lm-eval's HuggingFace model with a MoA plan applied.

``--model_args pretrained=DIR,plan=PLAN[,dtype=...,device=...]`` where PLAN is a plan file,
``dense`` (the unmodified model: transformers' own attention, batching as in ``hf``) or
``uniform:<density>[@<length>]`` (StreamingLLM at that density, see
``moa_plan.runtime.hf_apply.resolve_plan``). Every other ``hf`` model argument works as there.

Batching: a plan's spans depend on the total length N of each sequence, and padding would both
change N and shift positions, so with a non-dense plan every request runs alone (batch size 1);
a larger ``--batch_size`` is lowered to 1 with a warning. ``plan=dense`` keeps the batch size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (registers the built-in models before ours)
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from moa_plan.plan import PlanError

log = logging.getLogger(__name__)


class PlanArgumentError(SystemExit, ValueError):
    """A bad ``plan=`` argument: the ``lm_eval`` command exits with this one line and status 1 (no
    traceback); Python callers can catch it as a ValueError."""


def check_plan(pretrained: Any, spec: str) -> Any:
    """The plan of ``plan=``, read (and checked against a local model's config) before any weights
    load; the spec string itself when the model is not a local folder (checked when applied)."""
    from moa_plan.build import plan_from_spec
    from moa_plan.io import load_plan
    from moa_plan.model_config import load_model_shape, shape_from_config

    try:
        if isinstance(pretrained, (str, Path)) and Path(pretrained).exists():
            return plan_from_spec(spec, load_model_shape(pretrained), "plan")
        if hasattr(pretrained, "config"):
            return plan_from_spec(spec, shape_from_config(pretrained.config.to_dict()), "plan")
        if not spec.startswith("uniform:"):
            load_plan(spec)
        return spec
    except PlanError as exc:
        from moa_plan.errors import printable  # control characters in a file name stay on one line

        raise PlanArgumentError(
            printable(
                "; ".join(
                    f"moa: plan={spec}: {loc}: {msg}" if loc else f"moa: plan={spec}: {msg}"
                    for loc, msg in exc.problems
                )
            )
        ) from None


@register_model("moa")
class MoALM(HFLM):
    """HFLM whose model attends as a MoA plan says (``moa_plan.runtime.hf_apply.apply_plan``)."""

    def __init__(self, pretrained: Any, plan: str = "dense", **kwargs: Any) -> None:
        self.plan_spec = str(plan)
        checked = None if self.plan_spec == "dense" else check_plan(pretrained, self.plan_spec)
        super().__init__(pretrained=pretrained, **kwargs)
        self.moa_plan = None
        if checked is None:
            return
        from moa_plan.runtime.hf_apply import apply_plan

        apply_plan(self.model, checked)
        self.moa_plan = self.model.moa_plan
        if self.batch_size_per_gpu != 1:
            log.warning(
                "moa: plan %s runs one request at a time (spans depend on each sequence's length; "
                "padding would change them): batch_size %s -> 1",
                self.plan_spec,
                self.batch_size_per_gpu,
            )
            self.batch_size_per_gpu = 1
            self.batch_schedule = 1

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["moa_plan"] = self.plan_spec
        if self.moa_plan is not None:
            info["moa_plan_sink"] = self.moa_plan.sink
            info["moa_plan_provenance"] = self.moa_plan.provenance
        return info
