"""Plan builders: the uniform StreamingLLM baseline and the MoA reference format."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import model_shapes, plans

from moa_plan import semantics
from moa_plan.build import plan_from_moa, plan_from_spec, plan_to_moa, uniform_exact_from, uniform_plan, uniform_span
from moa_plan.plan import ModelShape, PlanError

SHAPE = ModelShape(
    num_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096
)


@settings(max_examples=80, deadline=None)
@given(model_shapes(), st.floats(0.001, 1.0), st.integers(1, 20_000), st.integers(0, 256))
def test_uniform_plan_has_its_density_at_every_length(shape, density, n, sink):
    plan = uniform_plan(shape, density, sink=sink)
    rule = plan.default
    assert (rule.alpha, rule.beta) == (-sink, density)
    assert len({s for layer in plan.spans(n) for s in layer}) == 1
    exact_from = plan.provenance["exact_from_length"]
    assert exact_from == uniform_exact_from(density, sink)
    if n >= exact_from:  # within one token of d * N, never over it by more than float rounding
        assert abs(plan.density(n) - density) <= 1 / n + 1e-12
    else:  # the window is one token: density (sink + 1) / N, over the target
        assert plan.spans(n)[0][0] == 1 and plan.density(n) == min(n, sink + 1) / n


@settings(max_examples=80, deadline=None)
@given(model_shapes(), st.floats(0.001, 1.0), st.integers(1, 20_000), st.integers(0, 256))
def test_static_uniform_plan_is_the_largest_fixed_window_within_budget(shape, density, n, sink):
    try:
        plan = uniform_plan(shape, density, sink=sink, static_length=n)
    except PlanError as exc:  # only when even span 1 is over budget
        assert exc.problems[0][0] == "density"
        assert Fraction(min(n, sink + 1), n) > Fraction(density)
        return
    s = plan.provenance["span"]
    assert plan.spans(n) == [[s] * shape.num_attention_heads] * shape.num_layers
    assert all(r.beta == 0 for layer in plan.rules() for r in layer)
    assert Fraction(semantics.attended_keys(s, sink, n), n) <= Fraction(density)
    if sink + s < n:  # one more token of span would exceed the budget
        assert Fraction(semantics.attended_keys(s + 1, sink, n), n) > Fraction(density)


def test_uniform_plan_known_values():
    """The issue's figures: density 0.5, sink 64 -> span 4032 at 8192 and still 0.5 at 2048."""
    plan = uniform_plan(SHAPE, 0.5)
    assert plan.spans(8192)[0][0] == 4032
    assert plan.density(8192) == 0.5
    assert abs(plan.density(2048) - 0.5) <= 1 / 2048
    assert plan.provenance["exact_from_length"] == 130
    assert uniform_plan(SHAPE, 0.5, static_length=8192).provenance["span"] == 4032
    assert uniform_plan(SHAPE, 1.0, sink=0, static_length=100).provenance["span"] == 100


@pytest.mark.parametrize(
    "kwargs, location",
    [
        (dict(density=0.0), "density"),
        (dict(density=1.5), "density"),
        (dict(density=float("nan")), "density"),
        (dict(density=0.5, static_length=0), "static_length"),
        (dict(density=0.001, static_length=8192), "density"),  # span 1 plus 64 sinks is already ~0.8%
        (dict(density=0.5, sink=-1), "sink"),
        (dict(density=0.5, block_size=0), "block_size"),
    ],
)
def test_uniform_plan_bad_arguments(kwargs, location):
    with pytest.raises(PlanError) as info:
        uniform_plan(SHAPE, **kwargs)
    assert info.value.problems[0][0] == location


def test_plan_strings_share_one_grammar():
    assert plan_from_spec("dense", SHAPE).density(777) == 1.0
    assert plan_from_spec("uniform:0.5", SHAPE) == uniform_plan(SHAPE, 0.5)
    assert plan_from_spec("uniform:0.25@4096", SHAPE) == uniform_plan(SHAPE, 0.25, static_length=4096)
    for bad in ("uniform:abc", "uniform:0.5@x", "uniform:2", "uniform:0.001@8192"):
        with pytest.raises(PlanError) as info:
            plan_from_spec(bad, SHAPE)
        assert info.value.problems[0][0] == "plan" and bad in info.value.problems[0][1]


def test_uniform_span_error_names_the_least_density():
    with pytest.raises(PlanError, match=r"span 1 already gives 0\.00793"):
        uniform_span(0.005, 8192, 64)


@settings(max_examples=50, deadline=None)
@given(plans(max_alpha=5000))
def test_moa_export_import_round_trip(plan):
    data = plan_to_moa(plan)
    assert len(data["alphas"]) == plan.model.num_layers
    assert all(len(row) == plan.model.num_attention_heads for row in data["alphas"] + data["betas"])
    back = plan_from_moa(data, plan.model, sink=plan.sink, block_size=plan.block_size)
    assert back.rules() == plan.rules()
    assert back.expanded().layers == plan.expanded().layers
    assert plan_to_moa(back) == data


def test_moa_import_of_a_published_style_file():
    data = {"alphas": [[-1024.0, 512.0, 0.0, 64.0]] * 3, "betas": [[0.5, 0.0, 1.0, 0.25]] * 3}
    plan = plan_from_moa(data, SHAPE)
    assert plan.sink == 64
    assert plan.spans(4096)[0] == [1024, 512, 4096, 1088]
    assert plan.provenance["method"].startswith("imported from the MoA reference format")


@pytest.mark.parametrize(
    "data, problem",
    [
        ([], ("", "a MoA plan must be a JSON object with 'alphas' and 'betas'")),
        ({"alphas": []}, ("betas", "required field is missing")),
        ({"alphas": {}, "betas": [[0] * 4] * 3}, ("alphas", "must be a list of per-layer lists")),
        ({"alphas": [[0] * 4] * 2, "betas": [[0] * 4] * 3}, ("alphas", "has 2 layers, the model has 3")),
        (
            {"alphas": [[0] * 4, [0] * 4, 5], "betas": [[0] * 4] * 3},
            ("alphas[2]", "must be a list of per-head numbers"),
        ),
        (
            {"alphas": [[0] * 4, [0] * 4, [0] * 3], "betas": [[0] * 4] * 3},
            ("alphas[2]", "has 3 heads, the model has 4"),
        ),
        (
            {"alphas": [[0] * 4, [0] * 4, [0, 0, 0, "x"]], "betas": [[0] * 4] * 3},
            ("alphas[2][3]", "must be a finite number, got 'x'"),
        ),
        (
            {"alphas": [[0] * 4] * 3, "betas": [[0] * 4, [0] * 4, [0, 1.5, 0, 0]]},
            ("betas[2][1]", "must be in [0, 1], got 1.5"),
        ),
        (
            {"alphas": [[0, True, 0, 0]] * 3, "betas": [[0] * 4] * 3},
            ("alphas[0][1]", "must be a finite number, got True"),
        ),
    ],
)
def test_moa_import_errors_are_located(data, problem):
    with pytest.raises(PlanError) as info:
        plan_from_moa(data, SHAPE)
    assert problem in info.value.problems, info.value.problems
