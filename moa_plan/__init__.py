"""moa-plan: Mixture of Sparse Attention plans (format, runtime, search, evals)."""

from importlib import metadata as _metadata

from moa_plan.io import load_plan, plan_from_data, plan_from_json, save_plan
from moa_plan.model_config import check_fits, load_model_shape
from moa_plan.plan import FORMAT_VERSION, Layer, ModelShape, Plan, PlanError, Rule
from moa_plan.semantics import head_density, span, visible, visible_pairs

__all__ = [
    "FORMAT_VERSION",
    "Layer",
    "ModelShape",
    "Plan",
    "PlanError",
    "Rule",
    "check_fits",
    "head_density",
    "load_model_shape",
    "load_plan",
    "plan_from_data",
    "plan_from_json",
    "save_plan",
    "span",
    "visible",
    "visible_pairs",
]
try:  # the one version source is pyproject.toml, read from the installed metadata
    __version__ = _metadata.version("moa-plan")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
