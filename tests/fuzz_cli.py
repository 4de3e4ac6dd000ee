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

from moa_plan.cli import main
from moa_plan.errors import MAX_REPORTED, printable
from moa_plan.plan import PlanError

HANG_SECONDS = 10
SHAPE = {"num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
VALID = {
    "format_version": 1,
    "model": dict(SHAPE, max_position_embeddings=4096),
    "sink": 2,
    "default": {"alpha": 3, "beta": 0.25},
    "layers": [
        {"overrides": {"1": {"alpha": -4, "beta": 1}}},
        {
            "heads": [
                {"alpha": 0, "beta": 0.5},
                {"alpha": 8, "beta": 0},
                {"alpha": 1, "beta": 1},
                {"alpha": -64, "beta": 0.75},
            ]
        },
    ],
    "provenance": {"method": "fuzz seed"},
}
FIELDS = {
    "": ["format_version", "model", "sink", "block_size", "default", "layers", "provenance"],
    "model": [
        "num_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "name",
        "revision",
        "max_position_embeddings",
    ],
}


class Hang(Exception):
    pass


# ---- cases ---------------------------------------------------------------------------------------


def _value(rng: random.Random, depth: int = 0):
    """A random JSON value, hostile leaning: huge / negative / fractional numbers, odd strings."""
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 2**31, 2**40, 2**40 + 1, 2**53 + 1, 2**63, -(2**63), 10 ** rng.randrange(1, 400)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e-300, 1e300, 2.5, -7.25, 1.0, 64.0])
    if kind == 4:
        return rng.choice(
            [
                "",
                "64",
                "\ud800",
                "\udfff x",
                "a\x1b[31mred",
                "line\nbreak",
                "\u202e",
                "x" * 5000,
                "é",
                "\x00",
                "dense",
                "uniform:0.5",
            ]
        )
    if kind in (5, 6, 7):
        return rng.randrange(-3, 70)
    if kind in (8, 9):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {
        rng.choice(["alpha", "beta", "heads", "default", "overrides", "0", "1", "\ud800", "x"]): _value(rng, depth + 1)
        for _ in range(rng.randrange(0, 4))
    }


def _nested(depth: int, rng: random.Random):
    value: object = rng.choice([1, "x", []])
    for _ in range(depth):
        value = {"a": value} if rng.random() < 0.5 else [value]
    return value


def _mutated(rng: random.Random) -> dict:
    data = json.loads(json.dumps(VALID))
    for _ in range(rng.randrange(1, 4)):
        where = rng.choice(["", "model", "layer", "rule"])
        if where == "":
            data[rng.choice(FIELDS[""])] = _value(rng)
        elif where == "model" and isinstance(data.get("model"), dict):
            data["model"][rng.choice(FIELDS["model"])] = _value(rng)
        elif where == "layer" and isinstance(data.get("layers"), list) and data["layers"]:
            data["layers"][rng.randrange(len(data["layers"]))] = _value(rng)
        elif isinstance(data.get("default"), dict):
            data["default"][rng.choice(["alpha", "beta", "gamma"])] = _value(rng)
        if rng.random() < 0.1:
            data.pop(rng.choice(FIELDS[""]), None)
    return data


def _special(rng: random.Random) -> dict:
    """The shapes of the issue-15 findings, with random sizes."""
    data = json.loads(json.dumps(VALID))
    kind = rng.randrange(10)
    if kind == 0:  # a huge model in a few bytes
        data["model"] = {
            "num_layers": rng.choice([64, 512, 1024]),
            "num_attention_heads": rng.choice([128, 1024]),
            "num_key_value_heads": 1,
            "head_dim": 64,
        }
        data.pop("layers")
    elif kind == 1:
        data["provenance"] = {"deep": _nested(rng.randrange(20, 800), rng)}  # json.dumps recurses
    elif kind == 2:
        data["model"][rng.choice(["name", "revision"])] = rng.choice(["\ud800", "a\udc80b", "\x1b]0;title\x07"])
    elif kind == 3:
        data["provenance"] = {rng.choice(["\ud800", "ok"]): rng.choice(["\udfff", "ok", 1])}
    elif kind == 4:
        data["sink"] = rng.choice([2**40, 2**40 + 1, 10 ** rng.randrange(12, 4000)])
    elif kind == 5:
        data["default"]["alpha"] = rng.choice([1e300, -1e300, 2**40, -(2**40) - 1, 10 ** rng.randrange(20, 300)])
    elif kind == 6:  # very many bad overrides: one problem each
        data["layers"][0] = {"overrides": {f"0{i}": {"alpha": 1, "beta": 0} for i in range(rng.randrange(60, 20000))}}
    elif kind == 7:
        data["model"]["head_dim"] = rng.choice([65536, 65537, 10**30])
    elif kind == 8:
        data["model"]["num_layers"] = rng.choice([1024, 1025])
        data["model"]["num_attention_heads"] = rng.choice([64, 65, 1024])
        data.pop("layers")
    else:
        data["block_size"] = rng.choice([2**40, 2**41, 0])
    return data


def plan_bytes(rng: random.Random) -> bytes:
    """One hostile plan file's content."""
    kind = rng.randrange(10)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
    text = json.dumps(_mutated(rng) if kind < 5 else _special(rng) if kind < 8 else VALID)
    if kind == 8:  # textual damage: truncation, a duplicated key, NaN, a BOM, a stray byte
        choice = rng.randrange(5)
        if choice == 0:
            text = text[: rng.randrange(len(text))]
        elif choice == 1:
            text = text.replace('"sink": 2', '"sink": 2, "sink": 3')
        elif choice == 2:
            text = text.replace('"alpha": 3', '"alpha": NaN')
        elif choice == 3:
            text = "\ufeff" + text
        else:
            i = rng.randrange(len(text))
            text = text[:i] + rng.choice(["\x00", "\\", '"', "{", "\udcff"]) + text[i + 1 :]
    return text.encode("utf-8", "surrogatepass")


def moa_bytes(rng: random.Random) -> bytes:
    """One hostile MoA reference file ({"alphas", "betas"} for the 2 x 4 fuzz model)."""
    data = {
        "alphas": [[rng.randrange(-64, 4096) for _ in range(4)] for _ in range(2)],
        "betas": [[rng.random() for _ in range(4)] for _ in range(2)],
    }
    for _ in range(rng.randrange(0, 3)):
        key = rng.choice(["alphas", "betas"])
        if rng.random() < 0.3:
            data[key] = _value(rng)
        elif isinstance(data[key], list) and data[key]:
            row = data[key][rng.randrange(len(data[key]))]
            if isinstance(row, list) and row:
                row[rng.randrange(len(row))] = _value(rng)
    text = json.dumps(data)
    return (text[: rng.randrange(len(text))] if rng.random() < 0.05 else text).encode("utf-8", "surrogatepass")


def special_path(rng: random.Random, folder: Path) -> Path | None:
    """Sometimes not a regular file at all: a FIFO, a link to a device, a folder, nothing."""
    kind = rng.randrange(40)
    path = folder / f"special{kind}.json"
    if kind == 0:
        os.mkfifo(path)
    elif kind == 1:
        path.symlink_to(rng.choice(["/dev/zero", "/dev/urandom", "/dev/null"]))
    elif kind == 2:
        path.mkdir()
    elif kind == 3:
        pass  # missing
    else:
        return None
    return path


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
