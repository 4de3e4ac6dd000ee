"""``lm_eval --model moa``: lm-eval's HuggingFace model with a MoA plan applied.

``--model_args pretrained=DIR,plan=PLAN[,dtype=...,device=...]`` where PLAN is a plan file,
``dense`` (the unmodified model: transformers' own attention, batching as in ``hf``) or
``uniform:<density>[@<length>]`` (StreamingLLM at that density, see
``moa_plan.runtime.hf.resolve_plan``). Every other ``hf`` model argument works as there.

Batching: a plan's spans depend on the total length N of each sequence, and padding would both
change N and shift positions, so with a non-dense plan every request runs alone (batch size 1);
a larger ``--batch_size`` is lowered to 1 with a warning. ``plan=dense`` keeps the batch size.
"""

from __future__ import annotations

import logging
from typing import Any

import lm_eval.models  # noqa: F401  (registers the built-in models before ours)
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from moa_plan.plan import PlanError

log = logging.getLogger(__name__)


@register_model("moa")
class MoALM(HFLM):
    """HFLM whose model attends as a MoA plan says (``moa_plan.runtime.hf.apply_plan``)."""

    def __init__(self, pretrained: Any, plan: str = "dense", **kwargs: Any) -> None:
        from moa_plan.build import plan_for_pretrained

        self.plan_spec = str(plan)
        self.moa_plan = None
        planned: Any = self.plan_spec
        try:  # a plan file is read (bounded), validated and fitted before the model is loaded
            if self.plan_spec != "dense":
                planned = plan_for_pretrained(self.plan_spec, pretrained)
        except PlanError as exc:
            raise ValueError(f"moa: plan={exc if exc.source else f'{self.plan_spec}: {exc}'}") from None
        super().__init__(pretrained=pretrained, **kwargs)
        if self.plan_spec == "dense":
            return
        from moa_plan.runtime.hf import apply_plan

        try:
            apply_plan(self.model, planned)
        except PlanError as exc:
            raise ValueError(f"moa: plan={exc if exc.source else f'{self.plan_spec}: {exc}'}") from None
        self.moa_plan = self.model.moa_plan
        if self.batch_size_per_gpu != 1:
            log.warning("moa: plan %s runs one request at a time (spans depend on each sequence's length; "
                        "padding would change them): batch_size %s -> 1", self.plan_spec, self.batch_size_per_gpu)
            self.batch_size_per_gpu = 1
            self.batch_schedule = 1

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["moa_plan"] = self.plan_spec
        if self.moa_plan is not None:
            info["moa_plan_sink"] = self.moa_plan.sink
            info["moa_plan_provenance"] = self.moa_plan.provenance
        return info
