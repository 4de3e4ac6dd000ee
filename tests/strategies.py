"""Hypothesis strategies for model shapes, rules and plans (shared by every test module).

``plans()`` draws valid plans in every written form the format allows: a global default rule
only, per-layer defaults with per-head overrides, full per-layer ``heads`` lists, and mixes of
these. Use ``plan.expanded()`` for the canonical form.
"""

from __future__ import annotations

from hypothesis import strategies as st

from moa_plan.plan import FORMAT_VERSION, Layer, ModelShape, Plan, Rule

FORMS = ("global", "compact", "heads", "mixed")


@st.composite
def model_shapes(draw, max_layers: int = 4, max_heads: int = 8) -> ModelShape:
    """A small attention shape; num_key_value_heads always divides num_attention_heads."""
    kv = draw(st.integers(1, max_heads))
    group = draw(st.integers(1, max(1, max_heads // kv)))
    return ModelShape(
        name=draw(st.none() | st.just("tiny-test-model")),
        num_layers=draw(st.integers(1, max_layers)),
        num_attention_heads=kv * group,
        num_key_value_heads=kv,
        head_dim=draw(st.sampled_from([8, 16, 64, 128])),
        max_position_embeddings=draw(st.none() | st.integers(1, 1 << 17)),
    )


def alphas(max_alpha: float = 4096) -> st.SearchStrategy[float]:
    """Span offsets in tokens, negative included, integral or not."""
    m = int(max_alpha)
    return st.one_of(
        st.integers(-m, m).map(float),
        st.floats(-max_alpha, max_alpha, allow_nan=False, allow_infinity=False),
    )


def betas() -> st.SearchStrategy[float]:
    """Growth rates in [0, 1], with the end points 0 and 1 drawn often."""
    return st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.25]), st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False))


@st.composite
def rules(draw, max_alpha: float = 4096) -> Rule:
    """One valid (alpha, beta) rule."""
    return Rule(alpha=draw(alphas(max_alpha)), beta=draw(betas()))


provenances = st.one_of(
    st.just({}),
    st.fixed_dictionaries(
        {"method": st.sampled_from(["test", "moa-search", "uniform"])},
        optional={
            "note": st.text(max_size=20),
            "budget": st.dictionaries(st.sampled_from(["1024", "4096"]), st.floats(0, 1), max_size=2),
            "seed": st.integers(0, 2**31),
        },
    ),
)


@st.composite
def _compact_layer(draw, heads: int, max_alpha: float, have_global: bool) -> Layer:
    """A layer written as default + overrides (or overrides only when every head is covered
    or a global default exists)."""
    idx = draw(st.lists(st.integers(0, heads - 1), unique=True, max_size=heads))
    overrides = {str(h): draw(rules(max_alpha)) for h in idx} or None
    covered = len(idx) == heads
    need_default = not (have_global or covered)
    default = draw(rules(max_alpha)) if need_default or draw(st.booleans()) else None
    return Layer(default=default, overrides=overrides)


@st.composite
def plans(
    draw,
    shape: ModelShape | None = None,
    max_layers: int = 4,
    max_heads: int = 8,
    max_alpha: float = 4096,
    max_sink: int = 128,
    forms: tuple[str, ...] = FORMS,
) -> Plan:
    """A valid plan for ``shape`` (drawn when None), written in one of ``forms``."""
    shape = shape if shape is not None else draw(model_shapes(max_layers, max_heads))
    form = draw(st.sampled_from(forms))
    heads = shape.num_attention_heads
    default = None
    layers = None
    if form == "global":
        default = draw(rules(max_alpha))
    elif form == "heads":
        layers = [
            Layer(heads=draw(st.lists(rules(max_alpha), min_size=heads, max_size=heads)))
            for _ in range(shape.num_layers)
        ]
    else:
        default = draw(st.none() | rules(max_alpha))
        layers = []
        for _ in range(shape.num_layers):
            if form == "mixed" and draw(st.booleans()):
                layers.append(Layer(heads=draw(st.lists(rules(max_alpha), min_size=heads, max_size=heads))))
            else:
                layers.append(draw(_compact_layer(heads, max_alpha, default is not None)))
    return Plan(
        format_version=FORMAT_VERSION,
        model=shape,
        sink=draw(st.integers(0, max_sink)),
        block_size=draw(st.sampled_from([1, 16, 64, 128]) | st.integers(1, 256)),
        default=default,
        layers=layers,
        provenance=draw(provenances),
    )


def lengths(max_n: int = 64) -> st.SearchStrategy[int]:
    """Sequence lengths N >= 1."""
    return st.integers(1, max_n)


@st.composite
def one_layer_plans(draw, n_max: int, head_dims: list[int], const_alpha: tuple[int, int] | None = None) -> Plan:
    """A one-layer plan whose heads mix the span edge cases a KV cache must get right.

    Per head: span 1, span N (beta 1), a constant window (alpha in ``const_alpha``, default
    1..n_max) or a growing one (0 < beta < 1, so spans widen and the ring evicts as N grows).
    """
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.sampled_from([1, 2, 3, 4]))
    sink = draw(st.sampled_from([0, 1, 3]) | st.integers(0, n_max + 5))
    low, high = const_alpha or (1, n_max)
    heads = []
    for _ in range(hq):
        kind = draw(st.sampled_from(["one", "full", "const", "grow"]))
        if kind == "one":
            heads.append(Rule(alpha=1.0, beta=0.0))
        elif kind == "full":
            heads.append(Rule(alpha=0.0, beta=1.0))
        elif kind == "const":
            heads.append(Rule(alpha=float(draw(st.integers(low, high))), beta=0.0))
        else:
            heads.append(
                Rule(alpha=draw(st.floats(-8, 8, allow_nan=False)), beta=draw(st.floats(0.05, 0.9, allow_nan=False)))
            )
    shape = ModelShape(
        num_layers=1, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=draw(st.sampled_from(head_dims))
    )
    return Plan(format_version=FORMAT_VERSION, model=shape, sink=sink, layers=[Layer(heads=heads)])
