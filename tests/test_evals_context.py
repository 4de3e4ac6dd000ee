"""Methods (plans per length), effective context, summaries, tables and heatmaps (no model needed)."""

from __future__ import annotations

import pytest

from moa_plan.errors import Problems
from moa_plan.evals.quality.context import accuracy_by_length, effective_context, heatmap, markdown_table, summarize
from moa_plan.evals.quality.methods import comparison, parse_method, parse_methods
from moa_plan.evals.quality.retrieval import Results, cell_key
from moa_plan.io import save_plan
from moa_plan.plan import Layer, ModelShape, Plan, Rule

SHAPE = ModelShape(num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@pytest.fixture
def plan_file(tmp_path):
    layers = [
        Layer(
            heads=[
                Rule(alpha=64, beta=0.25),
                Rule(alpha=0, beta=1.0),
                Rule(alpha=128, beta=0.0),
                Rule(alpha=32, beta=0.5),
            ]
        )
        for _ in range(2)
    ]
    path = tmp_path / "p.json"
    save_plan(Plan(format_version=1, model=SHAPE, sink=16, block_size=16, layers=layers), path)
    return path


def test_parse_methods(plan_file):
    dense = parse_method("dense", SHAPE)
    assert dense.plan_at(SHAPE, 1000) is None
    assert dense.stats(SHAPE, 1000) == {
        "density": 1.0,
        "attention_fraction": 1.0,
        "kv_cache_fraction": 1.0,
        "avg_span": 1000.0,
        "sink": 0,
    }
    named = parse_method(f"moa={plan_file}", SHAPE)
    assert named.name == "moa" and named.plan_at(SHAPE, 1000) == named.plan
    assert named.stats(SHAPE, 1000)["avg_span"] == sum(sum(r) for r in named.plan.spans(1000)) / 8
    assert parse_method(str(plan_file), SHAPE).name == "p"
    fixed = parse_method("uniform:0.5", SHAPE)
    for n in (1000, 4000):  # density 0.5 at every evaluated length
        assert fixed.plan_at(SHAPE, n).density(n) == 0.5
    sized = parse_method("uniform:0.5@1000", SHAPE)
    assert sized.plan_at(SHAPE, 4000).spans(4000) == sized.plan_at(SHAPE, 1000).spans(4000)
    with pytest.raises(Problems):
        parse_methods([str(plan_file), str(plan_file)], SHAPE)
    with pytest.raises(Problems, match="density"):
        parse_method("uniform:abc", SHAPE)
    with pytest.raises(Problems, match="missing.json"):
        parse_method("missing.json", SHAPE)


def test_uniform_matches_the_plan_density(plan_file):
    methods = comparison(str(plan_file), SHAPE, ["dense", "uniform"])
    assert [m.name for m in methods] == ["dense", "uniform", "p"]
    uniform, plan = methods[1], methods[2]
    for n in (512, 1024, 4096):
        target = plan.plan.density(n)
        got = uniform.plan_at(SHAPE, n)
        assert got.density(n) <= target
        assert len({s for layer in got.spans(n) for s in layer}) == 1  # one window for every head
        assert got.sink == plan.plan.sink
        wider = got.model_copy(update={"default": Rule(alpha=got.spans(n)[0][0] + 1, beta=0.0)})
        assert wider.density(n) > target  # the largest window within the budget
    assert len({m.fingerprint() for m in methods}) == 3
    with pytest.raises(Problems, match="baseline"):
        comparison(str(plan_file), SHAPE, ["h2o"])


def _results(acc: dict[tuple[str, int, float], list[float]]) -> Results:
    res = Results({"task": "lines"})
    for (m, n, p), correct in acc.items():
        res.cells[cell_key(m, "lines", n, p)] = {
            "accuracy": sum(correct) / len(correct),
            "samples": [{"correct": c} for c in correct],
        }
    return res


def test_effective_context_and_summary(tmp_path):
    lengths, positions = [1000, 2000, 4000], [0.0, 1.0]
    acc = {}
    for n, (a, b) in zip(lengths, [([1, 1], [1, 1]), ([1, 1], [1, 0]), ([1, 1], [1, 1])]):
        acc[("m", n, 0.0)] = a
        acc[("m", n, 1.0)] = b
    res = _results(acc)
    res.methods["m"] = {
        "kind": "plan",
        "spec": "x",
        "stats": {str(n): {"density": 0.5, "avg_span": n / 4, "sink": 16} for n in lengths},
    }
    by_len = accuracy_by_length(res, "m", "lines", lengths, positions)
    assert by_len == {1000: 1.0, 2000: 0.75, 4000: 1.0}
    assert effective_context(by_len) == 4000  # the largest length at >= 90%
    assert effective_context({1000: 0.5, 2000: None}) is None
    assert effective_context(by_len, threshold=1.0) == 4000
    assert accuracy_by_length(res, "m", "lines", [8000], positions) == {8000: None}
    s = summarize(res, "lines", lengths, positions)
    m = s["methods"]["m"]
    assert m["effective_context"] == 4000 and m["avg_span_at_effective"] == 1000 and m["ratio"] == 4.0
    assert m["grid"] == [[1.0, 1.0, 1.0], [1.0, 0.5, 1.0]]
    table = markdown_table(s)
    assert "| m | 1.00 | 0.75 | 1.00 |" in table and "| 4000 | 1000 | 4.00 |" in table
    png = tmp_path / "h.png"
    heatmap(s, png, "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
