"""Pydantic models of a plan file, and its span / density queries.

A plan may be written compactly (a global default rule, per-layer defaults with per-head
overrides); ``Plan.expanded()`` gives the one canonical form, where every layer lists every
head's rule and nothing else.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from moa_plan import semantics
from moa_plan.errors import PlanError

FORMAT_VERSION = 1
# Limits of a plan (spec/README.md, "Limits"). Real models stay far inside them; they exist so
# that a few bytes of compact plan cannot make a tool expand, print or allocate without bound,
# and so that a plan that validates is usable by every command.
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_TOTAL_HEADS = 65536  # num_layers * num_attention_heads (Llama-3-405B: 126 * 128 = 16128)
MAX_HEAD_DIM = 65536
MAX_LENGTH = 2**40  # sequence lengths stay far below 2**53, where alpha + beta*N stops being exact
MAX_NAME_CHARS = 256  # model.name, model.revision
MAX_PROVENANCE_DEPTH = 32  # nesting of objects / lists inside provenance


def key_location(key: str) -> str:
    """How an object key appears in a location: ``.name``, or ``["odd key"]`` (JSON-escaped,
    so a key holding a newline cannot break the one-line-per-problem output)."""
    return f".{key}" if re.fullmatch(r"[A-Za-z0-9_]+", key) else f"[{json.dumps(key)}]"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone UTF-16 surrogate (JSON can write "\\ud800"; no UTF-8 output can)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _provenance_problem(value: Any) -> tuple[str, str] | None:
    """The first place in provenance that later steps could not handle: nesting deeper than
    MAX_PROVENANCE_DEPTH, a lone surrogate in a key or string, a non-finite number."""
    stack = [("provenance", value, 1)]
    while stack:  # iterative, so the check itself cannot hit the recursion limit
        where, item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_PROVENANCE_DEPTH:
                return where, f"nested deeper than {MAX_PROVENANCE_DEPTH} levels"
            if isinstance(item, dict):
                for key, sub in item.items():
                    if not isinstance(key, str) or has_lone_surrogate(key):
                        return where, f"key {key!r} is not a valid Unicode string"
                    stack.append((where + key_location(key), sub, depth + 1))
            else:
                stack += [(f"{where}[{i}]", sub, depth + 1) for i, sub in enumerate(item)]
        elif isinstance(item, str):
            if has_lone_surrogate(item):
                return where, "holds a lone surrogate (not valid Unicode text)"
        elif isinstance(item, float) and not math.isfinite(item):
            return where, "must be a finite number"
        elif item is not None and not isinstance(item, (bool, int, float)):
            return where, f"must be JSON data, got {type(item).__name__}"
    return None


class Rule(_Strict):
    """Elastic span rule of one query head: span(N) = min(N, max(1, floor(alpha + beta*N)))."""

    alpha: float = Field(ge=-MAX_LENGTH, le=MAX_LENGTH, description="Span offset in tokens; may be negative.")
    beta: float = Field(
        description="Span growth per token of input length, in [0, 1].", json_schema_extra={"minimum": 0, "maximum": 1}
    )

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


_NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"  # one printable line


class ModelShape(_Strict):
    """The attention shape a plan fits (from the model's transformers config)."""

    name: str | None = Field(
        default=None, max_length=MAX_NAME_CHARS, pattern=_NO_CONTROL, description="Model name or path, informative."
    )
    revision: str | None = Field(
        default=None, max_length=MAX_NAME_CHARS, pattern=_NO_CONTROL, description="Model revision, informative."
    )
    num_layers: int = Field(ge=1, le=MAX_LAYERS, description="Decoder layers (config num_hidden_layers).")
    num_attention_heads: int = Field(ge=1, le=MAX_HEADS, description="Query heads per layer.")
    num_key_value_heads: int = Field(ge=1, description="KV heads per layer; divides num_attention_heads (GQA).")
    head_dim: int = Field(ge=1, le=MAX_HEAD_DIM, description="Size of one head's query / key vector.")
    max_position_embeddings: int | None = Field(
        default=None, ge=1, le=MAX_LENGTH, description="Longest context the model was trained for."
    )

    @field_validator("name", "revision")
    @classmethod
    def _valid_unicode(cls, text: str | None) -> str | None:
        if text is not None and has_lone_surrogate(text):
            raise ValueError("holds a lone surrogate (not valid Unicode text)")
        return text

    @model_validator(mode="after")
    def _gqa_groups_divide(self) -> ModelShape:
        if self.num_attention_heads % self.num_key_value_heads:
            raise PlanError(
                [("model.num_key_value_heads", f"must divide num_attention_heads ({self.num_attention_heads})")]
            )
        if self.num_layers * self.num_attention_heads > MAX_TOTAL_HEADS:
            raise PlanError(
                [
                    (
                        "model",
                        f"num_layers * num_attention_heads is {self.num_layers * self.num_attention_heads}, "
                        f"more than the {MAX_TOTAL_HEADS} query heads a plan may have",
                    )
                ]
            )
        return self

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


class Layer(_Strict):
    """Rules of one layer: either every head listed in ``heads``, or a ``default`` plus ``overrides``."""

    heads: list[Rule] | None = Field(default=None, description="One rule per query head (canonical form).")
    default: Rule | None = Field(default=None, description="Rule of heads not listed in overrides.")
    overrides: dict[str, Rule] | None = Field(
        default=None,
        description="Per-head rules keyed by the head index as a decimal string.",
        json_schema_extra={"propertyNames": {"pattern": "^(0|[1-9][0-9]*)$"}},
    )


class Plan(_Strict):
    """A MoA plan: the elastic span rule of every attention head of every layer."""

    format_version: Literal[1] = Field(description="Version of this file format; this release reads 1.")
    model: ModelShape
    sink: int = Field(default=64, ge=0, le=MAX_LENGTH, description="Initial tokens every head always sees.")
    block_size: int = Field(
        default=64, ge=1, le=MAX_LENGTH, description="Granularity of the search and prefill kernel."
    )
    default: Rule | None = Field(default=None, description="Rule of every head not given elsewhere.")
    layers: list[Layer] | None = Field(default=None, description="One entry per layer (canonical form).")
    provenance: dict[str, Any] = Field(
        default_factory=dict,
        description=f"How the plan was made; free-form JSON, nested at most {MAX_PROVENANCE_DEPTH} levels deep.",
    )

    @field_validator("provenance")
    @classmethod
    def _usable_provenance(cls, value: dict[str, Any]) -> dict[str, Any]:
        problem = _provenance_problem(value)
        if problem:
            raise PlanError([problem])
        return value

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
        return Plan(
            format_version=self.format_version,
            model=self.model,
            sink=self.sink,
            block_size=self.block_size,
            layers=layers,
            provenance=self.provenance,
        )

    # ---- queries --------------------------------------------------------------------------
    def alphas(self) -> list[list[float]]:
        return [[r.alpha for r in layer] for layer in self.rules()]

    def betas(self) -> list[list[float]]:
        return [[r.beta for r in layer] for layer in self.rules()]

    def spans(self, n: int) -> list[list[int]]:
        """Span of every query head at total length ``n``."""
        span = _span_memo(n)
        return [[span(r) for r in layer] for layer in self.rules()]

    def span_counts(self, n: int) -> list[Counter[int]]:
        """Per layer, how many query heads have each span at length ``n``. Linear in the size of
        the plan as written (one span per distinct rule), so summaries of a compact plan of a
        big model cost what the plan's few rules cost, not layers x heads."""
        span, h = _span_memo(n), self.model.num_attention_heads
        out: list[Counter[int]] = []
        for l in range(self.model.num_layers):
            if self.layers is None and out:
                out.append(out[0])  # every layer is the global default; read-only, shared
                continue
            layer = self.layers[l] if self.layers is not None else Layer()
            counts: Counter[int] = Counter()
            if layer.heads is not None:
                counts.update(span(r) for r in layer.heads)
            else:
                overrides = layer.overrides or {}
                counts.update(span(r) for r in overrides.values())
                if len(overrides) < h:
                    counts[span(layer.default or self.default)] += h - len(overrides)
            out.append(counts)
        return out

    def kv_span_counts(self, n: int) -> list[Counter[int]]:
        """Per layer, how many KV heads have each KV span (the largest span of the query heads
        sharing the KV head) at length ``n``; linear in the plan's size as ``span_counts``."""
        span, g, hkv = _span_memo(n), self.model.group_size, self.model.num_key_value_heads
        out: list[Counter[int]] = []
        for l in range(self.model.num_layers):
            if self.layers is None and out:
                out.append(out[0])
                continue
            layer = self.layers[l] if self.layers is not None else Layer()
            if layer.heads is not None:
                spans = [span(r) for r in layer.heads]
                out.append(Counter(max(spans[k * g : (k + 1) * g]) for k in range(hkv)))
                continue
            groups: dict[int, list[int]] = {}
            for key, r in (layer.overrides or {}).items():
                groups.setdefault(int(key) // g, []).append(span(r))
            base = layer.default or self.default
            counts = Counter(max(s + ([span(base)] if len(s) < g else [])) for s in groups.values())
            if len(groups) < hkv:
                counts[span(base)] += hkv - len(groups)
            out.append(counts)
        return out

    def mean_spans(self, n: int) -> list[float]:
        """Mean span of each layer's query heads at length ``n``."""
        h = self.model.num_attention_heads
        return [sum(s * c for s, c in counts.items()) / h for counts in self.span_counts(n)]

    def mean_span(self, n: int) -> float:
        """Mean span over all query heads at length ``n``."""
        total = sum(s * c for counts in self.span_counts(n) for s, c in counts.items())
        return total / (self.model.num_layers * self.model.num_attention_heads)

    def _layer_ratios(self, n: int, count, total: int) -> list[float]:
        h = self.model.num_attention_heads
        return [
            sum(count(s, self.sink, n) * c for s, c in counts.items()) / (total * h) for counts in self.span_counts(n)
        ]

    def _ratio(self, n: int, count, total: int) -> float:
        """Mean over heads of count(span) / total, as one correctly rounded division of exact integers."""
        heads = self.model.num_layers * self.model.num_attention_heads
        return sum(count(s, self.sink, n) * c for counts in self.span_counts(n) for s, c in counts.items()) / (
            total * heads
        )

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
        slots = sum(
            semantics.kv_slots(s, self.sink, n) * c for counts in self.kv_span_counts(n) for s, c in counts.items()
        )
        return slots / (n * self.model.num_layers * self.model.num_key_value_heads)

    def kv_spans(self, n: int) -> list[list[int]]:
        """Per layer, per KV head: the largest span among the query heads sharing it."""
        g = self.model.group_size
        return [
            [max(layer[k * g : (k + 1) * g]) for k in range(self.model.num_key_value_heads)] for layer in self.spans(n)
        ]

    def kv_slots(self, n_max: int) -> list[list[int]]:
        """KV cache slots each (layer, KV head) needs to serve every length up to ``n_max``.

        Spans never shrink as N grows (beta >= 0) so the largest need is at ``n_max``.
        """
        return [[semantics.kv_slots(s, self.sink, n_max) for s in layer] for layer in self.kv_spans(n_max)]


def _span_memo(n: int):
    """span(rule) at length ``n``, evaluated once per distinct (alpha, beta)."""
    memo: dict[tuple[float, float], int] = {}

    def span(r: Rule) -> int:
        key = (r.alpha, r.beta)
        if key not in memo:
            memo[key] = r.span(n)
        return memo[key]

    return span


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
                problems.append(
                    (
                        f"{where}.heads",
                        f"has {len(layer.heads)} entries, model.num_attention_heads is {shape.num_attention_heads}",
                    )
                )
            continue
        for key in layer.overrides or {}:
            if not (key.isdigit() and int(key) < shape.num_attention_heads and str(int(key)) == key):
                problems.append(
                    (
                        f"{where}.overrides{key_location(key)}",
                        f"must be a head index in 0..{shape.num_attention_heads - 1}",
                    )
                )
        covered = len(layer.overrides or {}) == shape.num_attention_heads
        if layer.default is None and plan.default is None and not covered:
            problems.append((where, "needs 'heads', a 'default' rule, or a global 'default'"))
    return problems
