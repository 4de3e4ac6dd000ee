"""The plan-format subcommands of ``moa-plan``: exit codes, exact messages, no tracebacks."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import plans

from moa_plan.build import plan_to_moa
from moa_plan.cli import main
from moa_plan.io import load_plan, plan_schema_json, plan_to_json, save_plan

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "spec" / "examples").glob("*.json"))
SMOLLM2_CONFIG = {
    "_name_or_path": "HuggingFaceTB/SmolLM2-135M",
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
    "max_position_embeddings": 8192,
}
VALID = {
    "format_version": 1,
    "model": {"num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
    "sink": 2,
    "default": {"alpha": 3, "beta": 0.25},
    "layers": [{"overrides": {"1": {"alpha": -4, "beta": 1}}}, {"heads": [{"alpha": 0, "beta": 0.5}] * 4}],
}


def run(*argv: str) -> tuple[int, str, str]:
    """main(argv) in-process with stdout / stderr captured (usable inside hypothesis tests)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "model" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(SMOLLM2_CONFIG))
    return path


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# ---- validate --------------------------------------------------------------------------------


def test_validate_examples_ok():
    code, out, err = run("validate", *EXAMPLES)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == len(EXAMPLES)
    assert all(
        re.fullmatch(
            r".+: ok \(\d+ layers x \d+ heads, \d+ KV heads, density [01]\.\d{4} at N=\d+"
            r"(, [01]\.\d{4} at N=\d+)*\)",
            l,
        )
        for l in lines
    )


def test_validate_ok_line_is_exact(tmp_path):
    path = write(tmp_path / "p.json", json.dumps(VALID))
    code, out, _ = run("validate", path, "--length", 16)
    assert code == 0
    plan = load_plan(path)
    assert out == f"{path}: ok (2 layers x 4 heads, 2 KV heads, density {plan.density(16):.4f} at N=16)\n"


BAD_FILES = [
    # (file text, expected stderr line after "FILE: ")
    (
        json.dumps({**VALID, "model": {**VALID["model"], "num_attention_heads": 6}}),
        "layers[1].heads: has 4 entries, model.num_attention_heads is 6",
    ),
    (json.dumps({**VALID, "default": {"alpha": 3, "beta": 1.5}}), "default.beta: must be in [0, 1]"),
    (
        json.dumps(VALID).replace('"alpha": 3', '"alpha": NaN'),
        "default.alpha: NaN is not valid JSON; must be a finite number",
    ),
    (json.dumps({k: v for k, v in VALID.items() if k != "model"}), "model: required field is missing"),
    (json.dumps({**VALID, "format_version": 2}), "format_version: unsupported version 2; this moa-plan reads 1"),
    ('{"format_version": 1,\n "model": ', "line 2, column 11: invalid JSON: Expecting value"),
    ("", "file is empty"),
    ("[]", "a plan must be a JSON object"),
    (b"\x89PNG\r\n\x1a\n", "not UTF-8 text (byte 0)"),
]


@pytest.mark.parametrize("text, line", BAD_FILES, ids=[l.split(":")[0] for _, l in BAD_FILES])
def test_validate_bad_file_one_located_line(tmp_path, text, line):
    path = write(tmp_path / "plan.json", text)
    code, out, err = run("validate", path)
    assert code == 1 and out == ""
    assert err == f"{path}: {line}\n"


def test_validate_reports_every_file_and_fails_if_any_fails(tmp_path):
    good = write(tmp_path / "good.json", json.dumps(VALID))
    missing = tmp_path / "missing.json"
    code, out, err = run("validate", good, missing, tmp_path)
    assert code == 1
    assert out.startswith(f"{good}: ok (")
    assert (
        err
        == f"{missing}: cannot read: No such file or directory\n{tmp_path}: cannot read: a folder, not a regular file\n"
    )


def test_validate_caps_the_problem_lines(tmp_path):
    bad = {
        **VALID,
        "layers": [{"heads": [{"alpha": 0, "beta": 2}] * 4}] * 20,
        "model": {**VALID["model"], "num_layers": 20},
    }
    code, _, err = run("validate", write(tmp_path / "p.json", json.dumps(bad)))
    lines = err.splitlines()
    assert code == 1 and len(lines) == 51
    assert lines[-1] == f"{tmp_path / 'p.json'}: ... and 30 more problems"


def test_validate_oversized_file(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(64 * 1024 * 1024 + 1)
    code, _, err = run("validate", big)
    assert code == 1 and err == f"{big}: file is 67108865 bytes, larger than the 67108864-byte limit\n"


def test_validate_against_a_model(tmp_path, config):
    smol = [p for p in EXAMPLES if p.name.startswith("smollm2-135m")]
    llama = ROOT / "spec" / "examples" / "llama-3-8b-uniform-50.json"
    assert run("validate", "--model", config.parent, *smol)[0] == 0
    assert run("validate", "--model", config, *smol)[0] == 0
    code, _, err = run("validate", "--model", config.parent, llama)
    assert code == 1
    assert err.splitlines() == [
        f"{llama}: model.num_layers: is 32, the model has 30",
        f"{llama}: model.num_attention_heads: is 32, the model has 9",
        f"{llama}: model.num_key_value_heads: is 8, the model has 3",
        f"{llama}: model.head_dim: is 128, the model has 64",
    ]
    code, _, err = run("validate", "--model", tmp_path, llama)
    assert code == 1 and err == f"{tmp_path / 'config.json'}: cannot read: No such file or directory\n"
    broken = write(tmp_path / "broken.json", '{"num_hidden_layers": 2}')
    code, _, err = run("validate", "--model", broken, llama)
    assert code == 1 and err.startswith(f"{broken}: model config lacks a usable attention shape")


# ---- show / density --------------------------------------------------------------------------


def test_show_table(tmp_path):
    path = write(tmp_path / "p.json", json.dumps(VALID))
    code, out, err = run("show", path, "--length", 8, 64)
    assert code == 0 and err == ""
    plan = load_plan(path)
    assert "  shape       2 layers x 4 heads, 2 KV heads, head_dim 8, max_position_embeddings unknown" in out
    assert "  sink        2" in out
    assert f"  {8:>8}  {plan.density(8):>8.4f}" in out
    assert f"  {64:>8}  {plan.density(64):>8.4f}" in out
    last = out.splitlines()[-1]  # layer 1's mean span at N=8 and N=64
    assert last == f"  {1:>5}  {sum(plan.spans(8)[1]) / 4:>9.1f}  {sum(plan.spans(64)[1]) / 4:>9.1f}"


def test_show_default_lengths_include_max_positions():
    code, out, _ = run("show", EXAMPLES[0])
    assert code == 0
    assert all(f"N={n}" in out for n in (1024, 4096, 8192))


def test_show_expanded_prints_the_canonical_json(tmp_path):
    path = write(tmp_path / "p.json", json.dumps(VALID))
    code, out, _ = run("show", path, "--expanded")
    assert code == 0
    assert out == plan_to_json(load_plan(path).expanded())


def test_show_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "out" / "spans.png"
    code, out, _ = run("show", EXAMPLES[0], "--plot", png, "--plot-length", 2048)
    assert code == 0 and f"wrote {png} (span map at N=2048)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(png.parent.glob(".*.tmp"))
    blocker = write(tmp_path / "file", "x")
    code, _, err = run("show", EXAMPLES[0], "--plot", blocker / "spans.png")
    assert code == 1 and err.startswith(f"{blocker / 'spans.png'}: cannot write: ")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans(max_layers=3, max_heads=4, max_alpha=40, max_sink=8), st.lists(st.integers(1, 24), min_size=1, max_size=3))
def test_density_command_equals_brute_force_count(plan, lengths):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.json"
        save_plan(plan, path)
        code, out, err = run("density", path, "--length", *lengths, "--per-layer")
    assert code == 0 and err == ""
    lines = iter(out.splitlines())
    for n in dict.fromkeys(lengths):
        spans = plan.spans(n)
        counts = [sum(1 for s in layer for j in range(n) if j < plan.sink or n - 1 - j < s) for layer in spans]
        heads = plan.model.num_attention_heads
        assert next(lines) == f"density at N={n}: {sum(counts) / (len(spans) * heads * n):.6g}"
        for layer, count in enumerate(counts):
            assert next(lines) == f"  layer {layer}: {count / (heads * n):.6g}"
    assert next(lines, None) is None


def test_density_needs_a_positive_length(tmp_path):
    path = write(tmp_path / "p.json", json.dumps(VALID))
    with pytest.raises(SystemExit) as info:
        run("density", path, "--length", 0)
    assert info.value.code == 2


# ---- uniform / import-moa / export-moa / schema ----------------------------------------------


def test_uniform_command(tmp_path, config):
    out_path = tmp_path / "u.json"
    code, out, err = run("uniform", "--model", config.parent, "--density", 0.25, "--out", out_path)
    assert code == 0 and err == ""
    plan = load_plan(out_path)
    assert out.splitlines() == [
        f"wrote {out_path}: alpha -64, beta 0.25 for every head; density 0.2500 at N=1024, 0.2500 at N=4096, "
        "0.2500 at N=8192",
        "density is 0.25 (within 1/N) at every N >= 260; below that the window is one token and the density "
        "is (sink + 1) / N",
    ]
    assert plan.model.num_layers == 30 and plan.model.name == "HuggingFaceTB/SmolLM2-135M"
    assert plan.density(8192) == plan.density(2048) == 0.25
    code, out, err = run(
        "uniform", "--model", config, "--density", 0.25, "--static-length", 8192, "--out", tmp_path / "v.json"
    )
    assert code == 0 and load_plan(tmp_path / "v.json").spans(100_000)[0][0] == 2048 - 64
    assert "density 0.2500 at N=8192" in out


def test_uniform_impossible_budget_and_bad_arguments(tmp_path, config):
    out_path = tmp_path / "u.json"
    code, _, err = run("uniform", "--model", config, "--density", 0.001, "--static-length", 8192, "--out", out_path)
    assert code == 1 and not out_path.exists()
    assert err == (
        "moa-plan: density: 0.001 is below the least density a head can have at N=8192 with "
        "sink=64: span 1 already gives 0.00793457\n"
    )
    for bad in (["--density", "2"], ["--density", "x"], ["--density", "0.5", "--sink", "-1"]):
        with pytest.raises(SystemExit) as info:
            run("uniform", "--model", config, "--out", out_path, *bad)
        assert info.value.code == 2


def test_moa_export_import_round_trip_via_cli(tmp_path, config):
    plan_path = ROOT / "spec" / "examples" / "smollm2-135m-illustrative-50.json"
    moa = tmp_path / "moa.json"
    code, out, err = run("export-moa", plan_path, "--out", moa)
    assert code == 0 and err == "" and out == f"wrote {moa} (30 layers x 9 heads, 3 KV heads)\n"
    assert json.loads(moa.read_text()) == plan_to_moa(load_plan(plan_path))
    back = tmp_path / "back.json"
    code, out, err = run("import-moa", moa, "--model", config.parent, "--out", back)
    assert code == 0 and err == ""
    assert load_plan(back).rules() == load_plan(plan_path).rules()
    assert load_plan(back).provenance["source"] == "moa.json"


def test_export_moa_notes_a_non_reference_sink(tmp_path):
    path = write(tmp_path / "p.json", json.dumps(VALID))
    code, _, err = run("export-moa", path, "--out", tmp_path / "m.json")
    assert code == 0
    assert err == "note: the MoA format has no sink field (its runtime uses 64); this plan's sink is 2\n"


def test_import_moa_errors_are_located(tmp_path, config):
    bad = write(
        tmp_path / "m.json", json.dumps({"alphas": [[0] * 9] * 30, "betas": [[0] * 9] * 29 + [[0] * 8 + [1.5]]})
    )
    code, _, err = run("import-moa", bad, "--model", config, "--out", tmp_path / "p.json")
    assert code == 1 and err == f"{bad}: betas[29][8]: must be in [0, 1], got 1.5\n"
    assert not (tmp_path / "p.json").exists()
    trunc = write(tmp_path / "t.json", '{"alphas": [[1, 2]')
    code, _, err = run("import-moa", trunc, "--model", config, "--out", tmp_path / "p.json")
    assert code == 1 and err == f"{trunc}: line 1, column 19: invalid JSON: Expecting ',' delimiter\n"


def test_schema_command(tmp_path):
    code, out, _ = run("schema")
    assert code == 0 and out == plan_schema_json()
    assert run("schema", "--out", tmp_path / "s.json")[0] == 0
    assert (tmp_path / "s.json").read_text() == plan_schema_json()


# ---- fuzzing: never a traceback --------------------------------------------------------------


def _validate_text(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.json"
        path.write_bytes(data)
        code, out, err = run("validate", path)
    assert "Traceback" not in err and "Traceback" not in out
    if code == 0:
        assert out.startswith(f"{path}: ok (")
    else:
        assert code == 1 and err and all(line.startswith(f"{path}: ") for line in err.splitlines())


VALID_TEXT = plan_to_json(load_plan(EXAMPLES[0])) if EXAMPLES else json.dumps(VALID)
FUZZ = settings(max_examples=int(os.environ.get("MOA_FUZZ_EXAMPLES", "60")), deadline=None)  # raise to hunt
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    _validate_text(data)


@FUZZ
@given(st.integers(0, len(VALID_TEXT)))
def test_fuzz_truncations_of_a_valid_plan(cut):
    _validate_text(VALID_TEXT[:cut].encode())


@FUZZ
@given(json_values)
def test_fuzz_random_json_values(value):
    _validate_text(json.dumps(value).encode())  # NaN / Infinity included via st.floats()


@FUZZ
@given(
    st.sampled_from(["format_version", "model", "sink", "block_size", "default", "layers", "provenance"]), json_values
)
def test_fuzz_one_field_replaced(key, value):
    data = json.loads(json.dumps(VALID))
    data[key] = value
    _validate_text(json.dumps(data).encode())


@FUZZ
@given(
    st.sampled_from(
        ["num_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "name"]
    ),
    json_values,
)
def test_fuzz_model_field_replaced(key, value):
    data = json.loads(json.dumps(VALID))
    data["model"][key] = value
    _validate_text(json.dumps(data).encode())


@FUZZ
@given(st.sampled_from(sorted(SMOLLM2_CONFIG) + ["text_config", "head_dim"]), json_values)
def test_fuzz_model_config_field_replaced(key, value):
    config = {**SMOLLM2_CONFIG, key: value}
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "config.json", json.dumps(config))
        code, out, err = run("validate", "--model", path, EXAMPLES[0])
    assert "Traceback" not in err and code in (0, 1)
    assert code == 0 or all(
        line.startswith(f"{path}: ") or line.startswith(f"{EXAMPLES[0]}: ") for line in err.splitlines()
    )


def test_deeply_nested_json_is_a_located_error(tmp_path):
    path = write(tmp_path / "deep.json", "[" * 100_000 + "]" * 100_000)
    code, _, err = run("validate", path)
    assert code == 1 and err == f"{path}: JSON nested too deeply\n"
    path = write(tmp_path / "deep2.json", '{"format_version": 1, "provenance": ' + "[" * 900 + "]" * 900 + "}")
    code, _, err = run("validate", path)
    assert code == 1 and "Traceback" not in err


# ---- the installed console script ------------------------------------------------------------


def test_installed_console_script():
    exe = Path(sys.executable).with_name("moa-plan")
    exe = str(exe) if exe.exists() else shutil.which("moa-plan")
    if exe is None:
        pytest.skip("moa-plan console script not installed (pip install -e .)")
    ok = subprocess.run([exe, "validate", *map(str, EXAMPLES)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(": ok (") == len(EXAMPLES)
    bad = subprocess.run([exe, "validate", "/nonexistent/plan.json"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr == "/nonexistent/plan.json: cannot read: No such file or directory\n"


def test_plan_commands_need_no_heavy_modules(tmp_path):
    """The format-only install has pydantic and nothing else: block torch & co and run the CLI."""
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'triton', 'numpy', 'matplotlib', 'pyomo', 'tqdm'):\n"
        "    sys.modules[name] = None\n"
        "from moa_plan.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "u.json"
    config = write(tmp_path / "config.json", json.dumps(SMOLLM2_CONFIG))
    for argv in (
        ["validate", *map(str, EXAMPLES)],
        ["uniform", "--model", str(config), "--density", "0.5", "--out", str(out)],
        ["show", str(out)],
        ["density", str(out), "--length", "100"],
        ["schema"],
    ):
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (argv, done.stderr)


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
