"""The plan file format: round trips, canonical expansion, located rejection of every invalid
field class, the generated JSON Schema and the example plans in spec/."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import plans

from moa_plan.io import load_plan, plan_from_data, plan_from_json, plan_schema_json, plan_to_json, save_plan
from moa_plan.plan import Plan, PlanError

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "spec"
EXAMPLES = sorted((SPEC / "examples").glob("*.json"))
SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(plans())
def test_save_load_round_trip(tmp_path_factory, plan):
    path = tmp_path_factory.mktemp("rt") / "plan.json"
    save_plan(plan, path)
    again = load_plan(path)
    assert again == plan
    assert again.rules() == plan.rules()
    assert plan_to_json(again) == path.read_text()
    assert not list(path.parent.glob(".*.tmp"))  # no temporary left behind


@SETTINGS
@given(plans(), st.integers(1, 10_000))
def test_expanded_is_canonical_and_preserves_every_span(plan, n):
    e = plan.expanded()
    assert e.default is None
    assert all(layer.heads is not None and layer.default is None and layer.overrides is None for layer in e.layers)
    assert e.spans(n) == plan.spans(n)
    assert e.density(n) == plan.density(n)
    assert e.expanded() == e
    assert plan_from_json(plan_to_json(e)) == e


@SETTINGS
@given(plans(forms=("heads",)))
def test_saved_json_is_plain_json_with_one_rule_per_line(plan):
    text = plan_to_json(plan)
    assert json.loads(text) == plan.model_dump(mode="json", exclude_none=True)
    rule_lines = [line for line in text.splitlines() if line.strip().startswith('{"alpha"')]
    assert len(rule_lines) == plan.model.num_layers * plan.model.num_attention_heads


BASE = {
    "format_version": 1,
    "model": {"num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
    "layers": [
        {
            "heads": [
                {"alpha": 1, "beta": 0.5},
                {"alpha": -64, "beta": 0.25},
                {"alpha": 0, "beta": 1},
                {"alpha": 16, "beta": 0},
            ]
        },
        {"default": {"alpha": 2, "beta": 0}, "overrides": {"3": {"alpha": 5, "beta": 1}}},
    ],
}


def _set(path, value):
    def edit(d):
        *head, last = path
        for key in head:
            d = d[key]
        d[last] = value

    return edit


def _pop(path):
    def edit(d):
        *head, last = path
        for key in head:
            d = d[key]
        del d[last]

    return edit


INVALID = [
    # (edit, location, message)
    (_set(["layers", 0, "heads", 2, "beta"], 1.5), "layers[0].heads[2].beta", "must be in [0, 1]"),
    (_set(["layers", 0, "heads", 1, "beta"], -0.01), "layers[0].heads[1].beta", "must be in [0, 1]"),
    (_set(["layers", 1, "overrides", "3", "beta"], 2), "layers[1].overrides.3.beta", "must be in [0, 1]"),
    (_set(["layers", 1, "default", "beta"], 7), "layers[1].default.beta", "must be in [0, 1]"),
    (_set(["layers", 0, "heads", 3, "alpha"], "16"), "layers[0].heads[3].alpha", "must be a number"),
    (_set(["layers", 0, "heads", 3, "alpha"], True), "layers[0].heads[3].alpha", "must be a number"),
    (_set(["layers", 0, "heads", 3, "alpha"], float("nan")), "layers[0].heads[3].alpha", "must be a finite number"),
    (_set(["layers", 0, "heads", 3, "alpha"], float("inf")), "layers[0].heads[3].alpha", "must be a finite number"),
    (_pop(["layers", 0, "heads", 0, "alpha"]), "layers[0].heads[0].alpha", "required field is missing"),
    (_set(["layers", 0, "heads", 0, "gamma"], 1), "layers[0].heads[0].gamma", "unknown field"),
    (_set(["format_version"], 2), "format_version", "unsupported version 2; this moa-plan reads 1"),
    (_pop(["format_version"]), "format_version", "required field is missing"),
    (_set(["format_version"], True), "format_version", "unsupported version True; this moa-plan reads 1"),
    (_set(["format_version"], 1.0), "format_version", "unsupported version 1.0; this moa-plan reads 1"),
    (_pop(["model"]), "model", "required field is missing"),
    (_set(["model", "num_layers"], 0), "model.num_layers", "must be >= 1"),
    (_set(["model", "num_layers"], 5000), "model.num_layers", "must be <= 1024"),
    (_set(["model", "head_dim"], 8.0), "model.head_dim", "must be an integer"),
    (_set(["model", "num_key_value_heads"], 3), "model.num_key_value_heads", "must divide num_attention_heads (4)"),
    (_set(["model", "num_layers"], 3), "layers", "has 2 entries, model.num_layers is 3"),
    (_set(["model", "num_attention_heads"], 6), "layers[0].heads", "has 4 entries, model.num_attention_heads is 6"),
    (
        _set(["layers", 0, "default"], {"alpha": 1, "beta": 0}),
        "layers[0]",
        "give either 'heads' or 'default'/'overrides', not both",
    ),
    (
        _set(["layers", 1, "overrides", "4"], {"alpha": 1, "beta": 0}),
        "layers[1].overrides.4",
        "must be a head index in 0..3",
    ),
    (
        _set(["layers", 1, "overrides", "01"], {"alpha": 1, "beta": 0}),
        "layers[1].overrides.01",
        "must be a head index in 0..3",
    ),
    (_pop(["layers", 1, "default"]), "layers[1]", "needs 'heads', a 'default' rule, or a global 'default'"),
    (_pop(["layers"]), "layers", "required unless a global 'default' rule is given"),
    (_set(["layers"], {}), "layers", "must be a list"),
    (_set(["layers", 0], []), "layers[0]", "must be an object"),
    (_set(["sink"], -1), "sink", "must be >= 0"),
    (_set(["sink"], 64.0), "sink", "must be an integer"),
    (_set(["block_size"], 0), "block_size", "must be >= 1"),
    (_set(["provenance"], []), "provenance", "must be an object"),
    (_set(["default"], {"alpha": 1, "beta": 3}), "default.beta", "must be in [0, 1]"),
]


def test_base_example_is_valid():
    plan = plan_from_data(copy.deepcopy(BASE))
    assert plan.spans(100) == [[51, 1, 100, 16], [2, 2, 2, 100]]


@pytest.mark.parametrize("edit, location, message", INVALID, ids=[loc + ":" + msg[:20] for _, loc, msg in INVALID])
def test_every_invalid_field_class_is_rejected_with_its_location(edit, location, message):
    data = copy.deepcopy(BASE)
    edit(data)
    with pytest.raises(PlanError) as info:
        plan_from_data(data)
    assert (location, message) in info.value.problems, info.value.problems


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", ("", "file is empty")),
        ("  \n", ("", "file is empty")),
        ('{"format_version": 1,\n "model": ', ("line 2, column 11", "invalid JSON: Expecting value")),
        ("[1, 2]", ("", "a plan must be a JSON object")),
        (
            '{"format_version": 1, "default": {"alpha": NaN, "beta": 0}}',
            ("default.alpha", "NaN is not valid JSON; must be a finite number"),
        ),
        ('{"x": [1, -Infinity]}', ("x[1]", "-Infinity is not valid JSON; must be a finite number")),
    ],
)
def test_text_level_problems_are_located(tmp_path, text, problem):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert info.value.problems[0] == problem


def test_oversized_and_binary_files_are_refused(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(64 * 1024 * 1024 + 1)  # sparse: refused from its size, never read
    with pytest.raises(PlanError, match="larger than the 67108864-byte limit"):
        load_plan(big)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(PlanError, match="not UTF-8"):
        load_plan(binary)


def test_schema_file_matches_the_models():
    """spec/plan.schema.json is generated: `moa-plan schema --out spec/plan.schema.json`."""
    assert (SPEC / "plan.schema.json").read_text() == plan_schema_json()


def test_schema_agrees_with_the_models_on_the_examples():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(plan_schema_json())
    for path in EXAMPLES:
        jsonschema.validate(json.loads(path.read_text()), schema)
    bad = copy.deepcopy(BASE)
    bad["layers"][0]["heads"][0]["beta"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_examples_exist_for_the_required_shapes():
    names = {p.name for p in EXAMPLES}
    for model in ("smollm2-135m", "llama-3-8b"):
        assert f"{model}-uniform-50.json" in names and f"{model}-illustrative-50.json" in names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_plan_is_valid(path):
    plan = load_plan(path)
    shape = (plan.model.num_layers, plan.model.num_attention_heads, plan.model.num_key_value_heads, plan.model.head_dim)
    assert shape in {(30, 9, 3, 64), (32, 32, 8, 128)}
    n = plan.model.max_position_embeddings or 8192
    assert 0 < plan.density(n) <= 1


def test_generated_examples_are_reproducible(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_examples", SPEC / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(str(tmp_path))
    made = sorted(tmp_path.glob("*.json"))
    assert made
    for path in made:
        assert path.read_text() == (SPEC / "examples" / path.name).read_text(), path.name
        plan = load_plan(path)
        assert plan.density(8192) <= 0.5
    hetero = load_plan(tmp_path / "smollm2-135m-illustrative-50.json")
    assert len({r for layer in hetero.rules() for r in map(lambda r: (r.alpha, r.beta), layer)}) > 5


def test_plan_models_reject_direct_construction_errors():
    with pytest.raises(PlanError):
        Plan(
            format_version=1, model={"num_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}
        )


def _readme_block(marker: str) -> str:
    text = (SPEC / "README.md").read_text()
    after = text[text.index(f"<!-- {marker} -->") :]
    body = after[after.index("```json\n") + len("```json\n") :]
    return body[: body.index("\n```")]


def test_spec_readme_compact_example_expands_as_documented():
    compact = plan_from_json(_readme_block("compact-example"))
    assert plan_to_json(compact.expanded()) == _readme_block("expanded-example") + "\n"
    assert compact.spans(100) == [[89, 96, 89, 89], [50, 50, 50, 100]]
    assert compact.kv_spans(100) == [[96, 89], [50, 100]]
    assert compact.kv_slots(100) == [[98, 91], [52, 100]]
    assert compact.density(100) == 0.78375
    assert compact.layer_densities(100) == [0.9275, 0.64]
