"""Pydantic models of a plan file, and its span / density queries.

A plan may be written compactly (a global default rule, per-layer defaults with per-head
overrides); ``Plan.expanded()`` gives the one canonical form, where every layer lists every
head's rule and nothing else.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from moa_plan import semantics

FORMAT_VERSION = 1
# Sanity bounds (real models have <= 128 of each): a compact plan cannot make tools expand
# billions of heads.
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_LENGTH = 2**40  # sequence lengths stay far below 2**53, where alpha + beta*N stops being exact


class PlanError(Exception):
    """A plan (or its pairing with a model) is invalid; ``problems`` holds (location, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in problems))


def key_location(key: str) -> str:
    """How an object key appears in a location: ``.name``, or ``["odd key"]`` (JSON-escaped,
    so a key holding a newline cannot break the one-line-per-problem output)."""
    return f".{key}" if re.fullmatch(r"[A-Za-z0-9_]+", key) else f"[{json.dumps(key)}]"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Rule(_Strict):
    """Elastic span rule of one query head: span(N) = min(N, max(1, floor(alpha + beta*N)))."""

    alpha: float = Field(description="Span offset in tokens; may be negative.")
    beta: float = Field(description="Span growth per token of input length, in [0, 1].",
                        json_schema_extra={"minimum": 0, "maximum": 1})

    @field_validator("beta")
    @classmethod
    def _beta_in_unit_interval(cls, beta: float) -> float:
        if not 0.0 <= beta <= 1.0:
            raise ValueError("must be in [0, 1]")
        return beta

    @field_serializer("alpha", "beta")
    def _integral_as_int(self, value: float) -> float | int:
        return int(value) if float(value).is_integer() and abs(value) < 2**53 else value

    def span(self, n: int) -> int:
        return semantics.span(self.alpha, self.beta, n)


class ModelShape(_Strict):
    """The attention shape a plan fits (from the model's transformers config)."""

    name: str | None = Field(default=None, description="Model name or path, informative.")
    revision: str | None = Field(default=None, description="Model revision, informative.")
    num_layers: int = Field(ge=1, le=MAX_LAYERS, description="Decoder layers (config num_hidden_layers).")
    num_attention_heads: int = Field(ge=1, le=MAX_HEADS, description="Query heads per layer.")
    num_key_value_heads: int = Field(ge=1, description="KV heads per layer; divides num_attention_heads (GQA).")
    head_dim: int = Field(ge=1, description="Size of one head's query / key vector.")
    max_position_embeddings: int | None = Field(default=None, ge=1, le=MAX_LENGTH,
                                                description="Longest context the model was trained for.")

    @model_validator(mode="after")
    def _gqa_groups_divide(self) -> ModelShape:
        if self.num_attention_heads % self.num_key_value_heads:
            raise PlanError([("model.num_key_value_heads",
                              f"must divide num_attention_heads ({self.num_attention_heads})")])
        return self

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


class Layer(_Strict):
    """Rules of one layer: either every head listed in ``heads``, or a ``default`` plus ``overrides``."""

    heads: list[Rule] | None = Field(default=None, description="One rule per query head (canonical form).")
    default: Rule | None = Field(default=None, description="Rule of heads not listed in overrides.")
    overrides: dict[str, Rule] | None = Field(
        default=None, description="Per-head rules keyed by the head index as a decimal string.",
        json_schema_extra={"propertyNames": {"pattern": "^(0|[1-9][0-9]*)$"}})


class Plan(_Strict):
    """A MoA plan: the elastic span rule of every attention head of every layer."""

    format_version: Literal[1] = Field(description="Version of this file format; this release reads 1.")
    model: ModelShape
    sink: int = Field(default=64, ge=0, description="Initial tokens every head always sees.")
    block_size: int = Field(default=64, ge=1, description="Granularity of the search and prefill kernel.")
    default: Rule | None = Field(default=None, description="Rule of every head not given elsewhere.")
    layers: list[Layer] | None = Field(default=None, description="One entry per layer (canonical form).")
    provenance: dict[str, Any] = Field(default_factory=dict, description="How the plan was made; free-form.")

    @model_validator(mode="after")
    def _fits_its_shape(self) -> Plan:
        problems = _shape_problems(self)
        if problems:
            raise PlanError(problems)
        return self

    # ---- resolution of the compact form -------------------------------------------------
    def rules(self) -> list[list[Rule]]:
        """The rule of every head, ``rules()[layer][head]``."""
        shape = self.model
        out = []
        for l in range(shape.num_layers):
            layer = self.layers[l] if self.layers is not None else Layer()
            if layer.heads is not None:
                out.append(list(layer.heads))
                continue
            base = layer.default or self.default
            overrides = layer.overrides or {}
            out.append([overrides.get(str(h), base) for h in range(shape.num_attention_heads)])
        return out

    def expanded(self) -> Plan:
        """The canonical form: every layer lists every head; no defaults, no overrides."""
        layers = [Layer(heads=heads) for heads in self.rules()]
        return Plan(format_version=self.format_version, model=self.model, sink=self.sink,
                    block_size=self.block_size, layers=layers, provenance=self.provenance)

    # ---- queries --------------------------------------------------------------------------
    def alphas(self) -> list[list[float]]:
        return [[r.alpha for r in layer] for layer in self.rules()]

    def betas(self) -> list[list[float]]:
        return [[r.beta for r in layer] for layer in self.rules()]

    def spans(self, n: int) -> list[list[int]]:
        """Span of every query head at total length ``n``."""
        return [[r.span(n) for r in layer] for layer in self.rules()]

    def _layer_ratios(self, n: int, count, total: int) -> list[float]:
        return [sum(count(s, self.sink, n) for s in layer) / (total * len(layer)) for layer in self.spans(n)]

    def _ratio(self, n: int, count, total: int) -> float:
        """Mean over heads of count(span) / total, as one correctly rounded division of exact integers."""
        spans = self.spans(n)
        return (sum(count(s, self.sink, n) for layer in spans for s in layer)
                / (total * sum(len(layer) for layer in spans)))

    def density(self, n: int) -> float:
        """The plan's density at length ``n`` (the MoA paper's): mean over query heads of
        ``min(n, sink + span) / n``, the keys the newest query attends to."""
        return self._ratio(n, semantics.attended_keys, n)

    def layer_densities(self, n: int) -> list[float]:
        """Density of each layer's heads at length ``n``."""
        return self._layer_ratios(n, semantics.attended_keys, n)

    def attention_fraction(self, n: int) -> float:
        """Fraction of the causal n x n triangle the plan computes (prefill work), mean over heads."""
        return self._ratio(n, semantics.visible_pairs, semantics.causal_pairs(n))

    def layer_attention_fractions(self, n: int) -> list[float]:
        return self._layer_ratios(n, semantics.visible_pairs, semantics.causal_pairs(n))

    def kv_cache_fraction(self, n: int) -> float:
        """Slots the per-KV-head cache holds at length ``n`` over a dense cache's (memory)."""
        slots = self.kv_slots(n)
        return sum(map(sum, slots)) / (n * sum(map(len, slots)))

    def kv_spans(self, n: int) -> list[list[int]]:
        """Per layer, per KV head: the largest span among the query heads sharing it."""
        g = self.model.group_size
        return [[max(layer[k * g:(k + 1) * g]) for k in range(self.model.num_key_value_heads)]
                for layer in self.spans(n)]

    def kv_slots(self, n_max: int) -> list[list[int]]:
        """KV cache slots each (layer, KV head) needs to serve every length up to ``n_max``.

        Spans never shrink as N grows (beta >= 0) so the largest need is at ``n_max``.
        """
        return [[semantics.kv_slots(s, self.sink, n_max) for s in layer] for layer in self.kv_spans(n_max)]


def _shape_problems(plan: Plan) -> list[tuple[str, str]]:
    shape = plan.model
    problems: list[tuple[str, str]] = []
    if plan.layers is None:
        if plan.default is None:
            problems.append(("layers", "required unless a global 'default' rule is given"))
        return problems
    if len(plan.layers) != shape.num_layers:
        problems.append(("layers", f"has {len(plan.layers)} entries, model.num_layers is {shape.num_layers}"))
    for l, layer in enumerate(plan.layers):
        where = f"layers[{l}]"
        if layer.heads is not None:
            if layer.default is not None or layer.overrides is not None:
                problems.append((where, "give either 'heads' or 'default'/'overrides', not both"))
            if len(layer.heads) != shape.num_attention_heads:
                problems.append((f"{where}.heads", f"has {len(layer.heads)} entries, "
                                 f"model.num_attention_heads is {shape.num_attention_heads}"))
            continue
        for key in layer.overrides or {}:
            if not (key.isdigit() and int(key) < shape.num_attention_heads and str(int(key)) == key):
                problems.append((f"{where}.overrides{key_location(key)}",
                                 f"must be a head index in 0..{shape.num_attention_heads - 1}"))
        covered = len(layer.overrides or {}) == shape.num_attention_heads
        if layer.default is None and plan.default is None and not covered:
            problems.append((where, "needs 'heads', a 'default' rule, or a global 'default'"))
    return problems
