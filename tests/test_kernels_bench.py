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
        (
            ["--gen-compile", "nosuchbackend", "--generate"],
            "--gen-compile: nosuchbackend: unknown torch.compile backend 'nosuchbackend'",
        ),
        (
            ["--gen-compile", "inductor,:max-autotune", "--generate"],
            "--gen-compile: :max-autotune: MOA_GRAPH_COMPILE=':max-autotune': must be BACKEND, BACKEND:MODE or none",
        ),
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


def test_searched_plans_have_few_rules_of_very_different_spans():
    from moa_plan.evals.bench.cases import label_density, plan_label, plan_of_kind

    for dens in (0.5, 0.25):
        plan = plan_of_kind("searched", SHAPES["llama3-8b"], dens, 16384, 64)
        assert abs(plan.density(16384) - dens) < 0.01
        for spans in plan.spans(16384):
            assert len(set(spans)) <= 3 and max(spans) >= 8 * min(spans)
        assert len({tuple(s) for s in plan.spans(16384)}) > 1  # proportions differ between layers
    assert plan_label(0.5, "synthetic") == "moa0.5" and plan_label(0.25, "searched") == "moa0.25-searched"
    assert label_density("decode/x/n4096/b1/moa0.25-searched") == 0.25


def test_grouped_plans_read_the_density():
    from moa_plan.evals.bench.cases import plan_of_kind

    shape = SHAPES["llama3-8b"]
    group = shape["hq"] // shape["hkv"]
    for dens in (0.5, 0.25):
        plan = plan_of_kind("grouped", shape, dens, 16384, 64)
        assert abs(plan.density(16384) - dens) < 0.01
        for spans in plan.spans(16384):
            assert all(len(set(spans[i : i + group])) == 1 for i in range(0, len(spans), group))
            assert max(spans) >= 2 * min(spans)
        kv = plan.kv_spans(16384)
        slots = sum(min(16384, 64 + s) for layer in kv for s in layer)
        assert abs(slots / (len(kv) * shape["hkv"] * 16384) - plan.density(16384)) < 1e-9  # KV fraction = density


def test_bench_grid_has_plan_kinds_e2e_rows_and_generate():
    from moa_plan.evals.bench.cli import BenchSettings, grid

    s = BenchSettings(shapes=["llama3-8b"], densities=[0.5], prefill_lens=[4096], decode_lens=[4096], batches=[1])
    s.generate = True
    keys = [k for k, _ in grid(s)]
    assert "e2e/llama3-8b/moa0.5-searched" in keys and "e2e/llama3-8b/moa0.25" in keys
    assert keys[-1] == "generate/llama3-8b"
    assert "gen_compile" in s.fixed()  # compiled rows change the generate cell: a resumed run must not mix them


def test_generate_rows_stop_growing_past_out_of_memory():
    from moa_plan.evals.bench.generation import _largest

    tried = []

    def run(b):
        tried.append(b)
        return {"batch": b, "error": "out of memory: x"} if b >= 32 else {"batch": b}

    rows = _largest(run, [8, 32, 48, 16])
    assert tried == [8, 32, 16] and [r["batch"] for r in rows] == [8, 32, 16]


def test_step_bytes_counts_weights_and_the_kv_the_plan_reads():
    from conftest import tiny_config
    from transformers import LlamaForCausalLM

    from moa_plan.build import dense_plan
    from moa_plan.evals.bench.generation import step_bytes
    from moa_plan.runtime.hf_apply import model_shape

    model = LlamaForCausalLM(tiny_config(vocab_size=50, hidden_size=32, intermediate_size=64)).to(torch.bfloat16)
    shape = model_shape(model)
    dense = dense_plan(shape).model_copy(update={"provenance": {"dense": True}})
    b = step_bytes(model, dense, 3, 100)
    params = sum(p.numel() for p in model.parameters()) * 2
    assert b["weights"] == params - 50 * 32 * 2 + 3 * 32 * 2
    assert b["kv"] == 2 * 2 * 100 * 2 * 8 * 2 * 3  # layers x KV heads x n x (K, V) x D x bf16 x batch
    rules = [[Rule(alpha=10, beta=0.0)] * 4] * 2
    plan = Plan(format_version=FORMAT_VERSION, model=shape, sink=4, layers=[Layer(heads=r) for r in rules])
    assert step_bytes(model, plan, 3, 100)["kv"] == 2 * 2 * 14 * 2 * 8 * 2 * 3


def test_new_rows_render():
    res = {
        "meta": {"device": "GPU"},
        "ceilings": {"copy_GBps": 4000.0},
        "kernels": {
            "decode/llama3-8b/n4096/b1/sdpa": {"ms": 0.02, "best_ms": 0.015},
            "decode/llama3-8b/n4096/b1/moa0.5-searched": {
                "density": 0.5,
                "attention_fraction": 0.58,
                "read_fraction": 0.8,
                "bytes_read": 8e6,
                "ms": 0.008,
                "merge": "fused",
                "ms_kernel_merge": 0.01,
                "GBps": 1000,
                "copy_frac": 0.25,
                "speedup_vs_sdpa": 2.5,
            },
        },
        "e2e": [
            {
                "shape": "llama3-8b",
                "context": 16384,
                "density": 0.5,
                "plan_kind": "searched",
                "attention_fraction": 0.6,
                "weights_bytes": 4e9,
                "dense": {"batch": 32, "ms_per_step": 40.0, "tok_s": 800, "kv_read_bytes": 8e9},
                "moa": {"batch": 64, "ms_per_step": 30.0, "tok_s": 2100, "kv_read_bytes": 6e9},
                "speedup": 2.6,
            }
        ],
        "generate": [
            {
                "layers": 8,
                "shape": "llama3-8b",
                "context": 16384,
                "new_tokens": 64,
                "rows": [
                    {
                        "variant": "moa graph moa0.5",
                        "batch": 8,
                        "density": 0.5,
                        "attention_fraction": 0.7,
                        "ms_per_step": 3.0,
                        "tok_per_s": 2666.7,
                        "prefill_ms": 900.0,
                        "peak_GB": 40.0,
                        "floor": "(4 GB weights + 2 GB KV) / 4000 GB/s = 1.5 ms",
                        "x_floor": 2.0,
                    },
                    {"variant": "dense static+compile", "batch": 32, "error": "out of memory: x"},
                ],
            }
        ],
    }
    md = render_markdown(res)
    assert "moa0.5-searched" in md and "0.800, 8.0 |" in md
    assert "0.008 (fused; kernel 0.01)" in md and "x floor" in md and "**2.0**" in md and "out of memory" in md
    assert "| searched 0.500 |" in md and "| 12.00 |" in md  # moa: 30 ms / ((4 + 6) GB / 4000 GB/s = 2.5 ms)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 20), st.sampled_from("abc")), min_size=1, max_size=12))
def test_kernel_trace_summary_is_the_union_of_intervals(records):
    """The trace summary's busy time is the union of the kernels' intervals (overlaps on other streams
    counted once, gaps not at all), its span first start to last end, and each name's time the sum."""
    from moa_plan.evals.bench.timing import summarise_kernels

    span, busy, by_name = summarise_kernels([(float(t), float(d), n) for t, d, n in records])
    t0 = min(t for t, _, _ in records)
    covered = {u for t, d, _ in records for u in range(t, t + d)}  # unit cells [u, u + 1)
    assert busy == len(covered)
    assert span == max(t + d for t, d, _ in records) - t0
    for name in {n for _, _, n in records}:
        mine = [(t, d) for t, d, n in records if n == name]
        assert by_name[name]["us"] == sum(d for _, d in mine)
        assert by_name[name]["count"] == len(mine)
        assert by_name[name]["first_start_us"] == min(t for t, _ in mine) - t0
        assert by_name[name]["last_end_us"] == max(t + d for t, d in mine) - t0


def test_kernel_records_fall_back_to_the_exported_trace():
    """Where the profiler lists no device events of its own, the GPU records (kernels, memsets,
    copies) come from its exported Chrome trace; host ops and metadata are not GPU records."""
    from moa_plan.evals.bench.timing import kernel_records

    class Profile:
        def events(self):
            return []

        def export_chrome_trace(self, path):
            events = [
                {"ph": "X", "cat": "kernel", "name": "_decode_kernel", "ts": 10.5, "dur": 7.0},
                {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "ts": 20.0, "dur": 0.5},
                {"ph": "X", "cat": "cpu_op", "name": "aten::empty", "ts": 1.0, "dur": 2.0},
                {"ph": "M", "cat": "kernel", "name": "process_name", "ts": 0.0},
            ]
            Path(path).write_text(json.dumps({"traceEvents": events}))

    assert kernel_records(Profile()) == [(10.5, 7.0, "_decode_kernel"), (20.0, 0.5, "Memset (Device)")]
