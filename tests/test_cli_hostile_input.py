"""Hostile and careless input to the plan commands: special files, huge or deep values, names
like options, orphaned temporaries: always one located line and a clean exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from plan_cli import EXAMPLES, VALID, run, write
from strategies import plans

from moa_plan.cli import main

# ---- issue 15: hostile and careless input ------------------------------------------------------


def _subprocess(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI in a child process with a timeout: a hang fails the test instead of stopping it."""
    return subprocess.run(
        [sys.executable, "-m", "moa_plan.cli", *map(str, argv)], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("target", ["fifo", "/dev/zero", "/dev/urandom", "folder"])
@pytest.mark.parametrize(
    "command",
    [["validate"], ["show"], ["show", "--expanded"], ["density", "--length", "9"], ["export-moa", "--out", "x.json"]],
)
def test_non_regular_plan_files_are_refused_at_once(tmp_path, target, command):
    """A FIFO or a link to /dev/zero used to hang (st_size is 0 for them): refused before any read."""
    path = tmp_path / "plan.json"
    if target == "fifo":
        os.mkfifo(path)
    elif target == "folder":
        path.mkdir()
    else:
        path.symlink_to(target)
    kind = {"fifo": "a FIFO", "folder": "a folder"}.get(target, "a character device")
    cmd, *rest = command
    done = _subprocess(cmd, path, *rest)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"{path}: cannot read: {kind}, not a regular file\n"


def test_model_config_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    done = _subprocess("validate", "--model", tmp_path, EXAMPLES[0])
    assert (
        done.returncode == 1 and done.stderr == f"{tmp_path / 'config.json'}: cannot read: a FIFO, not a regular file\n"
    )


def _plan_with(**fields) -> dict:
    data = json.loads(json.dumps(VALID))
    for key, value in fields.items():
        if key in ("name", "revision"):
            data["model"][key] = value
        else:
            data[key] = value
    return data


def _nested(depth: int):
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    "fields, location, message",
    [
        ({"name": "\ud800"}, "model.name", "holds a lone surrogate (not valid Unicode text)"),
        ({"revision": "x\udfffy"}, "model.revision", "holds a lone surrogate (not valid Unicode text)"),
        ({"provenance": {"method": "\ud800"}}, "provenance.method", "holds a lone surrogate (not valid Unicode text)"),
        ({"provenance": {"\ud800": 1}}, "provenance", "key '\\ud800' is not a valid Unicode string"),
        ({"provenance": _nested(300)}, "provenance" + ".a" * 32, "nested deeper than 32 levels"),
        ({"name": "a\x1b[31mred"}, "model.name", "must be one line without control characters"),
        ({"name": "n" * 257}, "model.name", "must be at most 256 characters"),
        ({"sink": 2**40 + 1}, "sink", "must be <= 1099511627776"),
        ({"sink": 10**3000}, "sink", "must be <= 1099511627776"),
        ({"block_size": 2**41}, "block_size", "must be <= 1099511627776"),
        ({"default": {"alpha": 1e300, "beta": 0.5}}, "default.alpha", "must be <= 1099511627776"),
    ],
)
def test_what_later_commands_cannot_handle_does_not_validate(tmp_path, fields, location, message):
    """Each of these used to validate and then crash show, show --expanded, eval or load_model."""
    path = write(tmp_path / "p.json", json.dumps(_plan_with(**fields)))
    for argv in (["validate", path], ["show", path], ["show", "--expanded", path]):
        code, out, err = run(*argv)
        assert code == 1 and out == "" and err == f"{path}: {location}: {message}\n", argv


def test_the_deepest_allowed_provenance_works_everywhere(tmp_path):
    path = write(tmp_path / "p.json", json.dumps(_plan_with(provenance={"x": _nested(31), "method": "m\x1b[0m"})))
    assert run("validate", path)[0] == 0
    code, out, _ = run("show", path)
    assert code == 0 and "provenance  m\\u001b[0m" in out  # escaped, never sent raw to the terminal
    code, out, _ = run("show", "--expanded", path)
    assert code == 0 and json.loads(out)["provenance"]["x"] == _nested(31)
    assert run("export-moa", path, "--out", tmp_path / "m.json")[0] == 0


def test_model_shape_limits(tmp_path):
    huge = {
        **VALID,
        "model": {**VALID["model"], "num_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1},
    }
    huge.pop("layers")
    path = write(tmp_path / "huge.json", json.dumps(huge))
    code, _, err = run("show", path)
    assert code == 1 and err == (
        f"{path}: model: num_layers * num_attention_heads is 1048576, more than the 65536 query heads a plan may have\n"
    )
    big = {**huge, "model": {**huge["model"], "num_attention_heads": 64}}  # 65536 heads: allowed
    assert run("show", write(tmp_path / "big.json", json.dumps(big)))[0] == 0


def test_summaries_cost_one_span_per_distinct_rule(monkeypatch):
    """show / density of a compact plan of a big model are linear in the plan's size: every figure
    evaluates each distinct rule once per length, never layers x heads times."""
    from moa_plan import semantics
    from moa_plan.plan import Plan

    plan = Plan.model_validate(
        {
            **VALID,
            "model": {**VALID["model"], "num_layers": 1024, "num_attention_heads": 64, "num_key_value_heads": 8},
            "layers": None,
            "default": {"alpha": 5, "beta": 0.5},
        }
    )
    calls = []
    real = semantics.span
    monkeypatch.setattr(semantics, "span", lambda *a: calls.append(a) or real(*a))
    for figure in (
        plan.density,
        plan.attention_fraction,
        plan.kv_cache_fraction,
        plan.mean_span,
        plan.layer_densities,
        plan.mean_spans,
    ):
        calls.clear()
        figure(4096)
        assert len(calls) == 1, figure.__name__


@settings(max_examples=60, deadline=None)
@given(plans(), st.integers(1, 5000))
def test_counted_figures_equal_the_per_head_ones(plan, n):
    spans = plan.spans(n)
    g = plan.model.group_size
    kv = [[max(layer[k * g : (k + 1) * g]) for k in range(plan.model.num_key_value_heads)] for layer in spans]
    assert plan.kv_spans(n) == kv
    slots = sum(min(n, plan.sink + s) for layer in kv for s in layer)
    assert plan.kv_cache_fraction(n) == slots / (n * plan.model.num_layers * plan.model.num_key_value_heads)
    assert plan.mean_spans(n) == [sum(layer) / len(layer) for layer in spans]
    assert plan.mean_span(n) == sum(map(sum, spans)) / sum(map(len, spans))


@pytest.mark.parametrize("command", [["show"], ["density", "--length", "10"], ["export-moa", "--out", "m.json"]])
def test_problem_lines_are_capped_in_every_command(tmp_path, command):
    """One bad 22 MB plan used to print 1,048,577 lines from show / density."""
    bad = {**VALID, "layers": [{"overrides": {f"0{i}": {"alpha": 0, "beta": 0} for i in range(5000)}}] * 2}
    path = write(tmp_path / "p.json", json.dumps(bad))
    cmd, *rest = command
    code, _, err = run(cmd, path, *rest)
    lines = err.splitlines()
    assert code == 1 and len(lines) == 51 and lines[-1] == f"{path}: ... and 9950 more problems"


def test_duplicate_keys_are_refused_and_a_bom_accepted(tmp_path):
    text = json.dumps(VALID)
    dup = write(tmp_path / "dup.json", text.replace('"sink": 2', '"sink": 2, "sink": 3'))
    assert run("validate", dup)[2] == f"{dup}: sink: duplicate key (a JSON object names each key once)\n"
    dup2 = write(tmp_path / "dup2.json", text.replace('"alpha": -4', '"alpha": -4, "alpha": 5'))
    assert run("validate", dup2)[2] == (
        f"{dup2}: layers[0].overrides.1.alpha: duplicate key (a JSON object names each key once)\n"
    )
    bom = write(tmp_path / "bom.json", b"\xef\xbb\xbf" + text.encode())
    assert run("validate", bom)[0] == 0


def test_a_plan_named_like_an_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "-h", json.dumps(VALID))
    code, out, _ = run("validate", "--", "-h")
    assert code == 0 and out.startswith("-h: ok (")


def test_import_moa_huge_numbers_are_located(tmp_path, config):
    moa = write(tmp_path / "m.json", '{"alphas": [[1' + "0" * 400 + ']], "betas": [[1e400]]}')
    code, _, err = run("import-moa", moa, "--model", config, "--out", tmp_path / "o.json")
    assert code == 1 and "Traceback" not in err
    assert f"{moa}: alphas[0][0]: must be a finite number, got an integer of 401 digits\n" in err
    assert f"{moa}: betas[0][0]: must be a finite number, got inf\n" in err
    assert not (tmp_path / "o.json").exists()


def test_orphaned_temporaries_are_cleaned_and_special_targets_refused(tmp_path):
    from moa_plan.files import STALE_TMP_SECONDS, write_atomic

    target = tmp_path / "plan.json"
    old, fresh, other = tmp_path / ".plan.json.abc.tmp", tmp_path / ".plan.json.def.tmp", tmp_path / ".x.json.a.tmp"
    for p in (old, fresh, other):
        p.write_text("half")
    past = os.stat(old).st_mtime - STALE_TMP_SECONDS - 5
    os.utime(old, (past, past))
    os.utime(other, (past, past))
    write_atomic(target, "x")
    assert target.read_text() == "x" and not old.exists()
    assert fresh.exists() and other.exists()  # a writer may still be renaming it; another file's
    os.mkfifo(tmp_path / "fifo.json")
    code, _, err = run("export-moa", EXAMPLES[0], "--out", tmp_path / "fifo.json")
    assert code == 1 and err == f"{tmp_path / 'fifo.json'}: cannot write: a FIFO, not a regular file\n"


def test_option_errors_are_one_line_and_exit_2(capsys):
    for argv, line in [
        (
            ["show", "p.json", "--length", "0"],
            "moa-plan show: --length: must be in [1, 2^40], got 0 (see moa-plan show --help)",
        ),
        (
            ["show", "p.json", "--lengths", "8,0"],
            "moa-plan show: --lengths: 0: must be in [1, 2^40], got 0 (see moa-plan show --help)",
        ),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and capsys.readouterr().err == line + "\n"
    assert main(["density", "p.json"]) == 2
    assert (
        capsys.readouterr().err
        == "moa-plan density: --lengths: required: the input lengths, e.g. --lengths 1024,4096\n"
    )
