"""The plan-format subcommands of ``moa-plan``: exit codes, exact messages, no tracebacks."""

from __future__ import annotations

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
from plan_cli import EXAMPLES, ROOT, SMOLLM2_CONFIG, VALID, run, write
from strategies import plans

from moa_plan.build import plan_to_moa
from moa_plan.io import load_plan, plan_schema_json, plan_to_json, save_plan

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
