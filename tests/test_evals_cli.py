"""`moa-plan eval ...` on a tiny random model: outputs, resume, located errors without tracebacks."""

from __future__ import annotations

import json

import pytest

from moa_plan.cli import main
from moa_plan.io import save_plan
from moa_plan.model_config import load_model_shape
from moa_plan.plan import Layer, Plan, Rule


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


def test_print_include_path(capsys):
    assert main(["eval", "--print-include-path"]) == 0
    path = capsys.readouterr().out.strip()
    assert path.endswith("tasks")
    from pathlib import Path

    names = {p.name for p in Path(path).iterdir()}
    assert {"moa_longeval_lines.yaml", "moa_passkey.yaml", "moa_tasks.py"} <= names


def test_retrieval_writes_results_and_resumes(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    args = [
        "eval",
        "retrieval",
        "--model",
        str(tiny),
        "--plan",
        "dense",
        "--plan",
        str(tiny.parent / "moa.json"),
        "--task",
        "passkey",
        "--lengths",
        "160,240",
        "--positions",
        "0,1",
        "--samples",
        "1",
        "--max-new-tokens",
        "3",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "dense (dense) - passkey accuracy" in text and "moa (" in text
    data = json.loads(out.read_text())
    assert len(data["cells"]) == 2 * 2 * 2
    cell = data["cells"]["moa|passkey|240|1"]
    assert cell["samples"][0]["answer"].isdigit() and abs(cell["samples"][0]["prompt_tokens"] - 240) <= 12
    assert data["methods"]["moa"]["stats"]["240"]["avg_span"] < 240

    import moa_plan.evals.quality.retrieval as retrieval

    def no_generation(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(retrieval, "generate", no_generation)
    assert main(args) == 0  # every cell is in the result file already
    renamed = [a if a != str(tiny.parent / "moa.json") else f"other={tiny.parent / 'moa.json'}" for a in args]
    assert main(renamed) == 0  # same plan under another name: its cells are reused
    assert "other|passkey|240|1" in json.loads(out.read_text())["cells"]
    with pytest.raises(AssertionError, match="recomputed"):  # a new length is computed
        main(args[: args.index("--lengths") + 1] + ["160,320"] + args[args.index("--lengths") + 2 :])


def test_context_writes_json_heatmap_and_table(tiny, tmp_path, capsys):
    out = tmp_path / "ctx"
    assert (
        main(
            [
                "eval",
                "context",
                "--model",
                str(tiny),
                "--plan",
                str(tiny.parent / "moa.json"),
                "--lengths",
                "200",
                "--positions",
                "0.5",
                "--samples",
                "1",
                "--max-new-tokens",
                "2",
                "--out-dir",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "| dense |" in text and "| uniform |" in text and "| moa |" in text
    summary = json.loads((out / "lines-summary.json").read_text())
    assert list(summary["methods"]) == ["dense", "uniform", "moa"]
    moa, uniform = summary["methods"]["moa"], summary["methods"]["uniform"]
    assert uniform["density_by_length"]["200"] <= moa["density_by_length"]["200"]
    assert (out / "lines-heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "lines-table.md").read_text().startswith("| method |")


def test_perplexity(tiny, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert (
        main(
            [
                "eval",
                "perplexity",
                "--model",
                str(tiny),
                "--plan",
                "dense",
                "--plan",
                str(tiny.parent / "moa.json"),
                "--lengths",
                "96",
                "--windows",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    for name in ("dense", "moa"):
        for kind in ("text", "repeat"):
            cell = data["methods"][name]["perplexity"][kind]["96"]
            assert cell["ppl"] > 1 and cell["tokens"] == (95 if kind == "text" else 48)
    assert "text ppl@96" in capsys.readouterr().out
    import moa_plan.evals.quality.perplexity as perplexity

    def no_forward(*a, **k):
        raise AssertionError("a finished perplexity cell was recomputed")

    monkey = pytest.MonkeyPatch()
    monkey.setattr(perplexity, "window_nll", no_forward)
    try:  # resumed from the result file
        assert (
            main(
                [
                    "eval",
                    "perplexity",
                    "--model",
                    str(tiny),
                    "--plan",
                    "dense",
                    "--lengths",
                    "96",
                    "--windows",
                    "1",
                    "--out",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
    finally:
        monkey.undo()
    assert (
        json.loads(out.read_text())["methods"]["moa"]["perplexity"]["repeat"]["96"]
        == data["methods"]["moa"]["perplexity"]["repeat"]["96"]
    )


def test_perplexity_windows():
    from moa_plan.evals.quality.perplexity import windows

    ids = list(range(100))
    ((w, start),) = windows(ids, 10, 1, "repeat")
    assert w == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4] and start == 5
    assert [s for _, s in windows(ids, 10, 3, "text")] == [1, 1, 1]
    assert windows(ids, 10, 2, "text")[1][0] == list(range(10, 20))
    with pytest.raises(ValueError, match="too few"):
        windows(ids, 60, 2, "text")


@pytest.mark.parametrize(
    "argv, message, code",
    [
        (
            ["--plan", "dense", "--model", "/nonexistent"],
            "moa-plan eval retrieval: --model: /nonexistent: not a model folder or its config.json",
            2,
        ),
        (["--plan", "missing.json"], "moa-plan: --plan missing.json: cannot read: No such file or directory", 1),
        (["--plan", "uniform:2"], "moa-plan eval retrieval: --plan: 'uniform:2': density: must be in (0, 1]", 2),
        (["--plan", "dense", "--device", "bogus"], "moa-plan eval retrieval: --device: not a torch device: 'bogus'", 2),
        (["--plan", "dense", "--device", "cuda:99"], "moa-plan eval retrieval: --device: cuda:99: ", 2),
        (
            ["--plan", "dense", "--dtype", "float33"],
            "moa-plan eval retrieval: --dtype: not a floating-point torch dtype",
            2,
        ),
        (["--plan", "dense", "--out", "/proc/x.json"], "moa-plan eval retrieval: --out: cannot write in /proc", 2),
        (["--plan", "dense", "--out", "/"], "moa-plan eval retrieval: --out: / is a folder; give a file name", 2),
        (
            ["--plan", "dense", "--out", "/dev/null"],
            "moa-plan eval retrieval: --out: /dev/null is not a regular file",
            2,
        ),
    ],
)
def test_bad_input_is_one_located_line(tiny, argv, message, code, capsys, monkeypatch):
    import moa_plan.runtime.load as loader

    monkeypatch.setattr(loader, "load", lambda *a: pytest.fail("work started before the check"))
    args = ["eval", "retrieval", "--model", str(tiny), *argv, "--lengths", "100", "--no-progress"]
    assert main(args) == code
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_out_is_checked_before_the_first_cell(tiny, tmp_path, capsys, monkeypatch):
    """--out naming a folder used to fail (IsADirectoryError) only after the first cell was computed."""
    import moa_plan.runtime.load as loader

    monkeypatch.setattr(loader, "load", lambda *a: pytest.fail("work started before the check"))
    assert (
        main(
            [
                "eval",
                "retrieval",
                "--model",
                str(tiny),
                "--plan",
                "dense",
                "--out",
                str(tmp_path),
                "--lengths",
                "100",
                "--no-progress",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err == (f"moa-plan eval retrieval: --out: {tmp_path} is a folder; give a file name\n")


def _one_dense_retrieval(tiny, out) -> list[str]:
    """The smallest retrieval run: one dense document of 100 tokens into ``out``."""
    return [
        "eval",
        "retrieval",
        "--model",
        str(tiny),
        "--plan",
        "dense",
        "--out",
        str(out),
        "--lengths",
        "100",
        "--positions",
        "0",
        "--samples",
        "1",
        "--no-progress",
    ]


def test_a_result_file_is_written_by_one_run_at_a_time(tiny, tmp_path, capsys):
    from moa_plan.files import exclusive

    out = tmp_path / "r.json"
    with exclusive(out):  # as if another run were resuming the same file
        assert main(_one_dense_retrieval(tiny, out)) == 1
    assert (
        capsys.readouterr().err
        == f"{out}: another moa-plan run is writing this file now; wait for it or choose another output\n"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2]",
        '{"version": 1, "settings": {}, "methods": {}, "cells": [1]}',
        '{"version": 1, "settings": {}, "methods": {}, "cells": {"a": 3}}',
        "{",
    ],
)
def test_a_malformed_result_file_is_one_line(tiny, tmp_path, capsys, text):
    out = tmp_path / "r.json"
    out.write_text(text)
    assert main(_one_dense_retrieval(tiny, out)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{out}: ") and err.count("\n") == 1 and "--overwrite" in err


def test_plan_for_another_model_is_refused(tiny, tmp_path, capsys):
    shape = load_model_shape(tiny).model_copy(update={"num_layers": 3})
    save_plan(Plan(format_version=1, model=shape, default=Rule(alpha=8, beta=0.5)), tmp_path / "other.json")
    assert (
        main(
            [
                "eval",
                "context",
                "--model",
                str(tiny),
                "--plan",
                str(tmp_path / "other.json"),
                "--out-dir",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "model.num_layers" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_grid_arguments_exit_2(tiny, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "retrieval", "--model", str(tiny), "--plan", "dense", "--positions", "0,2"])
    assert exc.value.code == 2
    assert "--positions: 2: must be in [0, 1], got 2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [["eval", "retrieval"], ["eval", "perplexity"], ["eval", "context", "--out-dir", "o"]]
)
def test_missing_plan_is_found_before_the_model(command, tmp_path, capsys, monkeypatch):
    import moa_plan.evals.cli as cli

    monkeypatch.setattr(cli, "resolve_model", lambda *a: pytest.fail("model resolved before the plans were read"))
    missing = tmp_path / "missing.json"
    assert main([*command, "--model", "smollm2", "--plan", "dense", "--plan", f"m={missing}"]) == 1
    assert capsys.readouterr().err == f"moa-plan: --plan m={missing}: cannot read: No such file or directory\n"
