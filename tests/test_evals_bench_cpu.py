"""`moa-plan bench-cpu` on a tiny random model: the table and result files, the dense plan checked
against plain transformers, attention timed inside the forward, located errors. No time is asserted."""

from __future__ import annotations

import json

import pytest

from moa_plan.cli import main

pytest.importorskip("transformers")


@pytest.fixture
def tiny(tiny_bpe_dir):
    return tiny_bpe_dir


def test_bench_cpu_writes_table_and_results(tiny, tmp_path, capsys):
    out = tmp_path / "cpu"
    rc = main(
        [
            "bench-cpu",
            "--model",
            str(tiny),
            "--plan",
            "half=uniform:0.5",
            "--plan",
            "quarter=uniform:0.25",
            "--lengths",
            "160,2304",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--profile",
            "--out-dir",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    table = [ln for ln in printed.splitlines() if ln.startswith("| ")]
    assert [ln.split(" | ")[1] for ln in table[1:]] == ["transformers (SDPA)", "dense plan", "half", "quarter"] * 2
    data = json.loads((out / "bench-cpu.json").read_text())
    assert data["command"].startswith("moa-plan bench-cpu --model") and "--lengths 160,2304" in data["command"]
    assert len(data["load_average_start"]) == 3 and data["threads"] == 1
    rows = {(r["n"], r["variant"]): r for r in data["rows"]}
    for n in (160, 2304):
        assert rows[(n, "transformers (SDPA)")]["attention_fraction"] == 1.0
        assert rows[(n, "dense plan")]["target"] == "<= 1.1x transformers"
        assert 0 < rows[(n, "quarter")]["attention_fraction"] < rows[(n, "half")]["attention_fraction"] < 1
        assert data["checks"][f"dense plan vs transformers, max |logit diff| at {n}"] <= 1e-3
        for name in ("transformers (SDPA)", "dense plan", "half", "quarter"):
            r = rows[(n, name)]
            assert len(r["runs"]) == 2 and 0 < r["attention_seconds"] < r["seconds"]
            assert r["seconds"] == min(t for t, _ in r["runs"])
    assert rows[(160, "half")]["target"] == "<= transformers"
    assert rows[(2304, "half")]["target"].startswith(">= 90% of the ideal saving")  # beyond 2k: proportional
    assert "| 2304 | quarter | 0.4" in (out / "bench-cpu.md").read_text()
    assert "## quarter" in (out / "profile-2304.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lengths", "2k"], "--lengths: 2k: must be an integer, got '2k'"),
        (["--lengths", "1"], "--lengths: 1: must be >= 2, got 1"),
        (["--plan", "nothing"], "--plan: expected NAME=PLAN (a file, dense or uniform:<density>), got 'nothing'"),
        (["--plan", "a=dense", "--plan", "a=uniform:0.5"], "--plan: the name 'a' is used twice"),
        (["--repeats", "0"], "--repeats: must be in [1, 100], got 0"),
    ],
)
def test_bench_cpu_bad_options_exit_2(tiny, argv, message, capsys):
    try:
        code = main(["bench-cpu", "--model", str(tiny), *argv])
    except SystemExit as exc:  # argparse's own checks exit, the handler's return
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moa-plan bench-cpu: ") and message in err


def test_bench_cpu_bad_plan_file_is_located_before_loading(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["bench-cpu", "--model", str(tiny), "--plan", f"mine={bad}", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moa-plan: --plan mine") and not (tmp_path / "bench-cpu.json").exists()
