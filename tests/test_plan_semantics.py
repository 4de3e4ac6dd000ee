"""Span / mask / density properties of the normative semantics (spec/README.md, "Semantics")."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import alphas, betas, model_shapes, plans

from moa_plan import semantics
from moa_plan.plan import FORMAT_VERSION, Plan, Rule

SETTINGS = settings(max_examples=60, deadline=None)


def brute_pairs(span_: int, sink: int, n: int) -> int:
    """Count the mask by its definition: query i sees key j <= i iff j < sink or i - j < span."""
    return sum(1 for i in range(n) for j in range(i + 1) if j < sink or i - j < span_)


@SETTINGS
@given(alphas(200), betas(), st.integers(0, 40), st.integers(1, 48))
def test_visible_pairs_equals_brute_force_count(alpha, beta, sink, n):
    s = semantics.span(alpha, beta, n)
    assert 1 <= s <= n
    assert s == min(n, max(1, math.floor(alpha + beta * n)))
    assert semantics.visible_pairs(s, sink, n) == brute_pairs(s, sink, n)
    assert all(semantics.visible(i, j, s, sink) == (j < sink or i - j < s) for i in range(n) for j in range(i + 1))


def brute_last_query_keys(span_: int, sink: int, n: int) -> int:
    """Count the keys the newest query (i = n - 1) sees, by the visibility rule."""
    return sum(1 for j in range(n) if semantics.visible(n - 1, j, span_, sink))


@settings(max_examples=40, deadline=None)
@given(plans(max_layers=3, max_heads=4, max_alpha=64, max_sink=12), st.integers(1, 40))
def test_plan_density_equals_brute_force_count_of_the_last_querys_keys(plan, n):
    """The paper's density: mean over heads of the keys the newest query attends to, over N."""
    spans = plan.spans(n)
    heads = plan.model.num_layers * plan.model.num_attention_heads
    keys = [[brute_last_query_keys(s, plan.sink, n) for s in layer] for layer in spans]
    assert plan.density(n) == sum(map(sum, keys)) / (heads * n)
    for layer, d in zip(keys, plan.layer_densities(n)):
        assert d == pytest.approx(sum(layer) / (len(layer) * n))
    for layer in plan.rules():
        for r in layer:
            assert (
                semantics.head_density(r.alpha, r.beta, plan.sink, n)
                == brute_last_query_keys(r.span(n), plan.sink, n) / n
            )


@settings(max_examples=25, deadline=None)
@given(plans(max_layers=3, max_heads=4, max_alpha=64, max_sink=12), st.integers(1, 40))
def test_attention_fraction_equals_brute_force_mask(plan, n):
    spans = plan.spans(n)
    total = sum(brute_pairs(s, plan.sink, n) for layer in spans for s in layer)
    heads = plan.model.num_layers * plan.model.num_attention_heads
    assert plan.attention_fraction(n) == total / (heads * n * (n + 1) // 2)
    for layer, f in zip(spans, plan.layer_attention_fractions(n)):
        assert f == pytest.approx(sum(brute_pairs(s, plan.sink, n) for s in layer) / (len(layer) * n * (n + 1) / 2))


@settings(max_examples=25, deadline=None)
@given(plans(max_layers=3, max_heads=8, max_alpha=300, max_sink=20), st.integers(1, 600))
def test_kv_cache_fraction_equals_the_runtimes_allocated_slots(plan, n):
    pytest.importorskip("torch")
    from moa_plan.runtime.cache import memory_report, plan_layouts

    slots = sum(layout.slots for layout in plan_layouts(plan, n))
    shape = plan.model
    assert plan.kv_cache_fraction(n) == slots / (shape.num_layers * shape.num_key_value_heads * n)
    assert plan.kv_cache_fraction(n) == pytest.approx(memory_report(plan, n).ratio)


def test_density_matches_reference_plan_mask():
    torch = pytest.importorskip("torch")
    from moa_plan.runtime.reference import plan_mask

    plan = Plan(
        format_version=FORMAT_VERSION,
        model={"num_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
        sink=3,
        layers=[
            {
                "heads": [
                    {"alpha": -5, "beta": 0.5},
                    {"alpha": 2, "beta": 0},
                    {"alpha": 0, "beta": 1},
                    {"alpha": 7.9, "beta": 0.25},
                ]
            }
        ],
    )
    for n in (1, 5, 17, 33):
        mask = plan_mask(torch.tensor(plan.spans(n)[0]), plan.sink, n, n)
        assert plan.attention_fraction(n) == int(mask.sum()) / (4 * n * (n + 1) // 2)
        assert plan.density(n) == int(mask[..., -1, :].sum()) / (4 * n)


@SETTINGS
@given(alphas(300), alphas(300), betas(), betas(), st.integers(0, 16), st.integers(1, 400))
def test_span_and_density_monotone_in_alpha_and_beta(a1, a2, b1, b2, sink, n):
    lo_a, hi_a = sorted((a1, a2))
    lo_b, hi_b = sorted((b1, b2))
    assert semantics.span(lo_a, b1, n) <= semantics.span(hi_a, b1, n)
    assert semantics.span(a1, lo_b, n) <= semantics.span(a1, hi_b, n)
    assert semantics.head_density(lo_a, b1, sink, n) <= semantics.head_density(hi_a, b1, sink, n)
    assert semantics.head_density(a1, lo_b, sink, n) <= semantics.head_density(a1, hi_b, sink, n)


@SETTINGS
@given(alphas(300), betas(), st.integers(1, 3000))
def test_window_start_never_moves_back_as_length_grows(alpha, beta, n):
    """The newest query (i = N - 1) has window start N - span(N), non-decreasing in N because
    beta <= 1 makes span grow by at most one per token: a key that left never comes back."""
    starts = [semantics.window_start(m - 1, semantics.span(alpha, beta, m)) for m in range(n, n + 64)]
    assert starts == sorted(starts)
    assert all(b - a in (0, 1) for a, b in zip(starts, starts[1:]))


@SETTINGS
@given(plans(max_layers=3, max_heads=8, max_alpha=300, max_sink=20), st.integers(1, 600))
def test_kv_spans_and_slots_cover_every_query_head_of_the_group(plan, n):
    g = plan.model.group_size
    spans, kv_spans, slots = plan.spans(n), plan.kv_spans(n), plan.kv_slots(n)
    for layer, kv_layer, slot_layer in zip(spans, kv_spans, slots):
        assert len(kv_layer) == plan.model.num_key_value_heads
        for h, s in enumerate(layer):
            assert s <= kv_layer[h // g]
            assert slot_layer[h // g] == min(n, plan.sink + kv_layer[h // g])
        assert all(s in layer[k * g : (k + 1) * g] for k, s in enumerate(kv_layer))
    # spans never shrink as N grows, so slots at n_max cover every shorter length
    for m in (1, max(1, n // 2), n):
        assert all(a <= b for x, y in zip(plan.kv_slots(m), slots) for a, b in zip(x, y))


def test_worked_example_of_the_spec():
    """The numbers printed in spec/README.md's worked example."""
    rule = Rule(alpha=-2, beta=0.5)
    assert rule.span(10) == 3
    assert semantics.visible_pairs(3, 2, 10) == 40
    assert semantics.head_attention_fraction(-2, 0.5, 2, 10) == 40 / 55
    assert semantics.head_density(-2, 0.5, 2, 10) == 5 / 10
    assert semantics.kv_slots(3, 2, 10) == 5


def test_double_evaluation_of_alpha_plus_beta_n():
    # 0.1 + 0.7 * 10 = 7.1 exactly in doubles? floor must follow IEEE-754, not exact decimals
    assert semantics.span(0.1, 0.7, 10) == math.floor(0.1 + 0.7 * 10)
    assert semantics.span(0, 0.29, 100) == 28  # 0.29 * 100 == 28.999999999999996 in doubles (spec/README.md)
    assert semantics.span(-1e9, 0.0, 5) == 1 and semantics.span(1e9, 1.0, 5) == 5


@settings(max_examples=20, deadline=None)
@given(model_shapes(), st.integers(1, 5000))
def test_dense_plan_has_density_one(shape, n):
    plan = Plan(format_version=FORMAT_VERSION, model=shape, default=Rule(alpha=0, beta=1))
    assert plan.density(n) == plan.attention_fraction(n) == plan.kv_cache_fraction(n) == 1.0
    assert plan.kv_slots(n) == [[n] * shape.num_key_value_heads] * shape.num_layers


def test_moa_reference_streamingllm_half_is_half_plus_sink_over_n():
    """The MoA reference's StreamingLLM baseline at '50%' (alpha 0, beta 0.5, 64 sink tokens)."""
    from moa_plan.build import plan_from_moa

    shape = {"num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
    from moa_plan.plan import ModelShape

    plan = plan_from_moa({"alphas": [[0] * 4] * 2, "betas": [[0.5] * 4] * 2}, ModelShape(**shape))
    assert plan.density(2048) == 0.53125
    for n in (256, 1000, 4096, 8192, 12345):
        assert plan.density(n) == pytest.approx(0.5 + 64 / n, abs=1 / n)
