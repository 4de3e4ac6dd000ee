"""Hostile-input harness: malformed plan files (and MoA files, and options) against every command
that reads a plan. A run fails on a traceback, a hang (a call over ``HANG_SECONDS``), an exit
code other than 0 / 1 / 2, an error line that does not name the file (or, for an option, the
command), more than ``MAX_REPORTED`` + 1 lines for one file, or output a UTF-8 terminal cannot
print.

``tests/test_fuzz.py`` runs a small seeded version; the nightly-size run is

    .venv/bin/python tests/fuzz_cli.py --cases 2000 --seed 1

which prints one line of figures per target and exits 1 on any failure. Every case comes from
``random.Random(seed)``, so a failing (seed, case) pair is reproduced by ``--only CASE``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fuzz_cases import VALID, moa_bytes, plan_bytes, special_path

from moa_plan.cli import main
from moa_plan.errors import MAX_REPORTED, printable
from moa_plan.plan import PlanError

HANG_SECONDS = 10


class Hang(Exception):
    pass


# ---- targets -------------------------------------------------------------------------------------


@dataclass
class Tally:
    runs: int = 0
    ok: int = 0
    refused: int = 0
    slowest: float = 0.0
    failures: list[str] = field(default_factory=list)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def _line_problem(lines: list[str], prefixes: tuple[str, ...]) -> str | None:
    if len(lines) > MAX_REPORTED + 1:
        return f"{len(lines)} error lines"
    for line in lines:
        if not line.startswith(prefixes):
            return f"line does not name the file: {line[:120]!r}"
        if re.search(r"[\x00-\x1f\x7f]", line):
            return f"control character in {line[:120]!r}"
    return None


def check_cli(argv: list[str], file: str) -> tuple[bool, str | None]:
    """(refused, problem) of one command run on a hostile file."""
    code, out, err = _cli(argv)
    for text in (out, err):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return True, f"output not printable: {exc}"
    if code not in (0, 1, 2):
        return True, f"exit code {code}"
    if code == 0:
        return False, None
    return True, _line_problem(err.splitlines(), (f"{printable(file)}: ", f"moa-plan {argv[0]}: "))


def check_api(call: Callable[[], object], file: str, prefix: str = "") -> tuple[bool, str | None]:
    """(refused, problem) of a Python entry point: PlanError / ValueError naming the file, or success."""
    try:
        call()
    except (PlanError, ValueError) as exc:
        text = str(exc)
        if not text.startswith(prefix + printable(file) + ": ") or "\n" in text:
            return True, f"{type(exc).__name__} does not name the file in one line: {text[:160]!r}"
        return True, None
    return False, None


def _timed(tally: Tally, name: str, case: int, run: Callable[[], tuple[bool, str | None]]) -> None:
    def alarm(*_):
        raise Hang()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_SECONDS)
    t0 = time.perf_counter()
    try:
        refused, problem = run()
    except Hang:
        refused, problem = True, f"hang (> {HANG_SECONDS} s)"
    except BaseException as exc:  # noqa: BLE001 - a traceback is exactly what we count
        refused, problem = True, f"traceback: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    tally.slowest = max(tally.slowest, time.perf_counter() - t0)
    tally.runs += 1
    tally.refused += refused
    tally.ok += not refused
    if problem:
        tally.failures.append(f"{name} case {case}: {problem}")


def run(
    cases: int, seed: int = 0, heavy_every: int = 1, only: int | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Tally]:
    """Run ``cases`` hostile files through every target; ``heavy_every`` > 1 thins the targets that
    load a model (load_model, the lm-eval model) to every k-th case."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from conftest import make_tiny_model

    from moa_plan.evals.lm_eval.model import MoALM
    from moa_plan.runtime import load_model

    tallies: dict[str, Tally] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "model", layers=2, heads=4, kv_heads=2, head_dim=8)
        config = model / "config.json"
        targets = {
            "validate": lambda f: check_cli(["validate", f], f),
            "show": lambda f: check_cli(["show", f], f),
            "show --expanded": lambda f: check_cli(["show", "--expanded", f], f),
            "density": lambda f: check_cli(
                ["density", f, "--length", "1", "1000", "1000000", "--all", "--per-layer"], f
            ),
            "export-moa": lambda f: check_cli(["export-moa", f, "--out", str(root / "out" / "moa.json")], f),
            "load_model": lambda f: check_api(lambda: load_model(model, f), f),
            "lm-eval moa": lambda f: check_api(
                lambda: MoALM(pretrained=str(model), plan=f, device="cpu"), f, prefix="moa: plan="
            ),
        }
        heavy = {"load_model", "lm-eval moa"}
        for case in range(cases):
            if only is not None and case != only:
                continue
            rng = random.Random(f"{seed}:{case}")
            folder = root / f"case{case}"
            folder.mkdir()
            path = special_path(rng, folder)
            if path is None:
                path = folder / rng.choice(["plan.json", "-h", "--all", "é plan.json", "a\nb.json"])
                path.write_bytes(plan_bytes(rng))
            f = str(path) if not path.name.startswith("-") else str(path)  # absolute: never read as an option
            for name, target in targets.items():
                if name in heavy and case % heavy_every:
                    continue
                _timed(tallies.setdefault(name, Tally()), name, case, lambda: target(f))
            moa = folder / "moa_alpha_beta.json"
            moa.write_bytes(moa_bytes(rng))
            _timed(
                tallies.setdefault("import-moa", Tally()),
                "import-moa",
                case,
                lambda: check_cli(
                    ["import-moa", str(moa), "--model", str(config), "--out", str(root / "out" / "imported.json")],
                    str(moa),
                ),
            )
            if log and (case + 1) % 100 == 0:
                log(f"{case + 1} cases")
        bad = tallies.setdefault("bad options", Tally())
        for i, argv in enumerate(bad_options(root, str(config))):
            _timed(bad, "bad options", i, lambda argv=argv: _option_check(argv))
    return tallies


def bad_options(root: Path, config: str) -> list[list[str]]:
    """Option errors of every command: each must be one line 'moa-plan CMD: ...' and exit 2."""
    plan = root / "ok.json"
    plan.write_text(json.dumps(VALID))
    p = str(plan)
    return [
        ["show", p, "--length", "0"],
        ["show", p, "--length", "x"],
        ["density", p, "--length", "-5"],
        ["density", p],
        ["validate", p, "--length", "1e3"],
        ["show", p, "--plot-length", "0"],
        ["uniform", "--model", config, "--density", "0", "--out", str(root / "u.json")],
        ["uniform", "--model", config, "--density", "nan", "--out", str(root / "u.json")],
        ["uniform", "--model", config, "--density", "0.5", "--sink", "-1", "--out", str(root / "u.json")],
        ["import-moa", p, "--model", config, "--block-size", "0", "--out", str(root / "i.json")],
        ["calibrate", "--model", str(root), "--lengths", "100", "--samples", "0", "--out", str(root / "c.jsonl")],
        ["calibrate", "--model", str(root), "--lengths", "0", "--out", str(root / "c.jsonl")],
        ["calibrate", "--model", str(root), "--lengths", "100", "--device", "bogus", "--out", str(root / "c")],
        ["calibrate", "--model", str(root), "--lengths", "100", "--out", str(root)],
        ["profile", "--model", str(root), "--data", "x", "--chunk", "0", "--out", str(root / "p")],
        ["profile", "--model", str(root), "--data", "x", "--out", p],
        ["optimize", "--profile", str(root), "--density", "0.5", "--time-limit", "-1", "--out", str(root / "o")],
        ["optimize", "--profile", str(root), "--density", "2", "--out", str(root / "o.json")],
        ["optimize", "--profile", str(root), "--density", "0.5", "--mip-gap", "1", "--out", str(root / "o")],
        ["optimize", "--profile", str(root), "--density", "0.5", "--beta-step", "0", "--out", str(root / "o")],
        ["optimize", "--profile", str(root), "--density", "0.5", "--out", "/proc/o.json"],
        ["optimize", "--profile", str(root), "--density", "0.5", "--device", "cuda:7x", "--out", str(root / "o")],
        ["eval", "retrieval", "--model", str(root), "--plan", "dense", "--samples", "0"],
        ["eval", "retrieval", "--model", str(root / "model"), "--plan", "dense", "--out", str(root)],
        ["eval", "retrieval", "--model", str(root / "model"), "--plan", "dense", "--out", "/proc/x.json"],
        ["eval", "retrieval", "--model", str(root / "model"), "--plan", "dense", "--device", "bogus"],
        ["eval", "retrieval", "--model", str(root / "model"), "--plan", "dense", "--dtype", "int"],
        ["eval", "retrieval", "--model", str(root / "model"), "--plan", "uniform:2"],
        ["eval", "context", "--model", str(root / "model"), "--plan", p, "--threshold", "0", "--out-dir", "x"],
        ["eval", "context", "--model", str(root / "model"), "--plan", p, "--out-dir", p],
        ["eval", "perplexity", "--model", str(root / "model"), "--plan", "dense", "--kinds", "nope"],
        ["eval", "perplexity", "--model", str(root / "model"), "--plan", "dense", "--windows", "0"],
    ]


def _option_check(argv: list[str]) -> tuple[bool, str | None]:
    code, out, err = _cli(argv)
    prog = "moa-plan " + " ".join(argv[:2] if argv[0] == "eval" else argv[:1])
    lines = err.splitlines()
    if code != 2:
        return True, f"{argv}: exit {code}, {err[:200]!r}"
    if len(lines) != 1 or not lines[0].startswith(prog + ": "):
        return True, f"{argv}: not one line naming the command: {err[:200]!r}"
    return True, None


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--heavy-every", type=int, default=1, help="run load_model / lm-eval on every k-th case")
    parser.add_argument("--only", type=int, help="run one case (reproduce a failure)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    tallies = run(
        args.cases, args.seed, args.heavy_every, args.only, log=lambda m: print(m, file=sys.stderr, flush=True)
    )
    failed = False
    for name, t in tallies.items():
        print(
            f"{name:16s} runs {t.runs:6d}  ok {t.ok:6d}  refused {t.refused:6d}  failures {len(t.failures):4d}  "
            f"slowest {t.slowest:6.2f} s"
        )
        for line in t.failures[:20]:
            print("   ", line)
        failed |= bool(t.failures)
    total = sum(t.runs for t in tallies.values())
    print(
        f"total runs {total}, failures {sum(len(t.failures) for t in tallies.values())}, "
        f"{time.perf_counter() - t0:.0f} s (seed {args.seed}, {args.cases} cases)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main_())
