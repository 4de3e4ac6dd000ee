"""CPU checks of the benchmark's bookkeeping: plans hit their density, the decode byte count is the
number of slots some head of the group sees, the CLI refuses bad input, results render."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_plan.cli import main
from moa_plan.evals.bench.cases import SHAPES, bench_plan, decode_tokens_read
from moa_plan.evals.bench.report import render_markdown
from moa_plan.plan import FORMAT_VERSION, Layer, ModelShape, Plan, Rule
from moa_plan.runtime.cache import LayerLayout, slot_positions


def test_bench_plans_hit_density_and_are_heterogeneous():
    for name in SHAPES:
        for dens in (0.25, 0.5, 1.0):
            plan = bench_plan(SHAPES[name], dens, 4096, 64)
            assert abs(plan.density(4096) - dens) < 1e-3
            spans = plan.spans(4096)[0]
            if dens < 1:
                assert max(spans) >= 2.5 * min(spans)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 2, 4]), st.integers(1, 200), st.integers(0, 20), st.data())
def test_decode_bytes_are_the_visible_slots(hkv, group, n_max, sink, data):
    hq = hkv * group
    rules = [
        Rule(alpha=float(data.draw(st.integers(1, n_max))), beta=data.draw(st.sampled_from([0.0, 0.1, 1.0])))
        for _ in range(hq)
    ]
    shape = ModelShape(num_layers=1, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=16)
    plan = Plan(format_version=FORMAT_VERSION, model=shape, sink=sink, layers=[Layer(heads=rules)])
    n = data.draw(st.integers(1, n_max))
    layout = LayerLayout.from_plan(plan, 0, n_max)
    spans = plan.spans(n)[0]
    pos = slot_positions(layout, n)
    for k in range(hkv):
        off, cap = int(layout.offset[k]), layout.caps[k]
        p = pos[off : off + cap]
        w = max(spans[k * group : (k + 1) * group])
        seen = (p >= 0) & ((p < sink) | (n - 1 - p < w))
        assert decode_tokens_read(spans, list(layout.caps), sink, n, group)[k] == int(seen.sum())


def test_bench_cli_refuses_bad_input(capsys):
    for argv, message in (
        (["--shapes", "nope"], "--shapes: nope: choose from llama3-8b, mha-7b"),
        (["--densities", "0.5,2"], "--densities: 2: must be in (0, 1], got 2"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["bench", *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench"]) == 1
        assert "CUDA" in capsys.readouterr().err


def test_results_render():
    path = Path(__file__).resolve().parents[1] / "evals" / "results" / "bench-h100.json"
    if not path.exists():
        return
    md = render_markdown(json.loads(path.read_text()))
    assert "## Decode attention" in md and "## Prefill attention" in md and "tokens/s" in md
