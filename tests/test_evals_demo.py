"""`moa-plan demo` on a tiny random model: step lines from the start, the table, result files,
identical spans measured once, located errors."""

from __future__ import annotations

import json

import pytest

from moa_plan.cli import main
from moa_plan.io import save_plan
from moa_plan.model_config import load_model_shape
from moa_plan.plan import Layer, Plan, Rule

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    shape = load_model_shape(folder)
    layers = [
        Layer(
            heads=[
                Rule(alpha=16, beta=0.25),
                Rule(alpha=0, beta=1.0),
                Rule(alpha=48, beta=0.0),
                Rule(alpha=8, beta=0.5),
            ]
        )
        for _ in range(shape.num_layers)
    ]
    save_plan(Plan(format_version=1, model=shape, sink=8, block_size=16, layers=layers), folder.parent / "moa.json")
    return folder


def test_demo_prints_steps_table_and_writes_results(tiny, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(
        [
            "demo",
            "--model",
            str(tiny / "config.json"),
            "--plan",
            f"mine={tiny.parent / 'moa.json'}",
            "--plan",
            "uniform:0.5",
            "--length",
            "160",
            "--out-dir",
            str(out),
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[   0 s] moa-plan demo: dense vs StreamingLLM vs MoA at 160 tokens")
    steps = [ln for ln in lines if ln.startswith("[")]
    assert any("1/5 dense: perplexity on 160 tokens" in ln for ln in steps)
    # 'uniform~uniform:0.5' is StreamingLLM at the density of 'uniform:0.5': the very same spans
    assert any("5/5 uniform:0.5: the same spans at 160 tokens as uniform~uniform:0.5" in ln for ln in steps)
    table = [ln for ln in lines if ln.startswith("| ")]
    assert [row.split(" | ")[0] for row in table] == [
        "| method",
        "| dense",
        "| uniform~mine",
        "| mine",
        "| uniform~uniform:0.5",
        "| uniform:0.5 (= uniform~uniform:0.5)",
    ]
    data = json.loads((out / "demo.json").read_text())
    rows = {r["method"]: r for r in data["methods"]}
    assert rows["dense"]["density"] == 1.0 and rows["mine"]["density"] < 1
    for r in rows.values():
        assert r["text_ppl"] > 1 and r["copy_ppl"] > 1
        assert set(r["passkey"]) == {"0.5", "0.75"} and all(isinstance(v, bool) for v in r["passkey"].values())
    assert rows["uniform:0.5"]["copy_ppl"] == rows["uniform~uniform:0.5"]["copy_ppl"]
    assert (out / "demo.md").read_text().startswith("| method | density@160 |")


def test_demo_with_another_model_needs_a_plan(tiny, capsys):
    assert main(["demo", "--model", str(tiny)]) == 2
    assert capsys.readouterr().err.strip() == (
        "moa-plan demo: --plan: the shipped plans are for SmolLM2: with another --model, pass --plan"
    )


def test_demo_rejects_a_bad_length(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--length", "8"])
    assert exc.value.code == 2
    assert "--length: must be in [64, 2^20], got 8" in capsys.readouterr().err
