"""The run layer under every long job: kill mid-run, rerun, the same final file, no cell computed twice;
a changed setting is refused with one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moa_plan.cli import main
from moa_plan.errors import OptionError
from moa_plan.run import Progress, Run

TIMES = {"seconds", "elapsed_s", "optimize_seconds", "build_seconds", "solve_seconds_total", "command"}


class Stop(BaseException):
    """The injected kill (not an Exception: like KeyboardInterrupt, no handler may swallow it)."""


@pytest.fixture
def cells(monkeypatch):
    """Every cell key stored by ``Run.put`` / ``put_many`` in this test; ``cells.stop_after = k``
    interrupts a run after its k-th stored cell (the checkpoint is on disk by then)."""
    log: list[str] = []
    state = {"stop": None, "n": 0}
    put, put_many = Run.put, Run.put_many

    def counted(keys):
        log.extend(keys)
        state["n"] += len(keys)
        if state["stop"] is not None and state["n"] >= state["stop"]:
            state["stop"] = None
            raise Stop

    monkeypatch.setattr(Run, "put", lambda self, key, value: (put(self, key, value), counted([key])))
    monkeypatch.setattr(Run, "put_many", lambda self, items: (put_many(self, items), counted(list(items))))

    class Log(list):
        def stop_after(self, k):
            state["stop"], state["n"] = k, 0

    out = Log()
    out.keys = log
    return out


def plain(value):
    """A result without its wall times (the only part two runs may differ in)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def read(path: Path):
    return plain(json.loads(Path(path).read_text()))


def killed_then_resumed(cells, job, k: int = 1) -> None:
    """Run ``job`` with a kill after k cells, then again to the end: every cell stored once."""
    cells.stop_after(k)
    with pytest.raises(Stop):
        job()
    job()
    assert len(cells.keys) == len(set(cells.keys)), "a cell was computed twice"


# ---- calibrate, profile, optimise --------------------------------------------------------------

SEARCH = ["--sink", "16", "--block-size", "16", "--quiet"]


def calibrate(model, out):
    from moa_plan.search import calibration
    from moa_plan.search.settings import CalibrateSettings

    return calibration.build(
        CalibrateSettings(
            model=model,
            out=out,
            lengths=[300, 400],
            samples=2,
            tasks=["kv", "copy"],
            seed=1,
            max_answer_tokens=3,
            quiet=True,
            batch_size=1,
        )
    )


def test_calibrate_resumes(tiny_char_dir, tmp_path, cells):
    calibrate(tiny_char_dir, tmp_path / "ref.json")
    cells.keys.clear()
    killed_then_resumed(cells, lambda: calibrate(tiny_char_dir, tmp_path / "c.json"), k=2)
    assert sorted(cells.keys) == ["n300-0", "n300-1", "n400-0", "n400-1"]
    assert read(tmp_path / "c.json") == read(tmp_path / "ref.json")


@pytest.fixture(scope="module")
def calib(tiny_char_dir, tmp_path_factory):
    from moa_plan.search import calibration
    from moa_plan.search.settings import CalibrateSettings

    return calibration.build(
        CalibrateSettings(
            model=tiny_char_dir,
            out=tmp_path_factory.mktemp("calib") / "c.json",
            lengths=[300, 400, 500],
            samples=1,
            tasks=["kv"],
            seed=1,
            max_answer_tokens=3,
            keep_wrong_answers=True,  # a random model answers none right
            quiet=True,
        )
    )


def test_profile_resumes(tiny_char_dir, calib, tmp_path, cells):
    args = ["profile", "--model", str(tiny_char_dir), "--data", str(calib), "--chunk", "64", *SEARCH[:4], "--quiet"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    cells.keys.clear()
    killed_then_resumed(cells, lambda: main([*args, "--out", str(tmp_path / "p")]), k=2)
    assert len(cells.keys) == 3
    assert read(tmp_path / "p" / "profile.json") == read(tmp_path / "ref" / "profile.json")
    for f in (tmp_path / "ref" / "influence").iterdir():
        assert (tmp_path / "p" / "influence" / f.name).read_bytes() == f.read_bytes()
    assert main([*args[:-1], "--sink", "8", "--out", str(tmp_path / "p")]) == 2  # another sink: refused


def test_optimize_resumes_its_measured_validation(tiny_char_dir, calib, tmp_path, cells):
    pytest.importorskip("pyomo")
    prof = tmp_path / "prof"
    assert (
        main(
            [
                "profile",
                "--model",
                str(tiny_char_dir),
                "--data",
                str(calib),
                "--chunk",
                "64",
                *SEARCH,
                "--out",
                str(prof),
            ]
        )
        == 0
    )
    cells.keys.clear()
    args = [
        "optimize",
        "--profile",
        str(prof),
        "--lengths",
        "300,400",
        "--validation-length",
        "500",
        "--density",
        "0.6",
        "--model",
        str(tiny_char_dir),
        "--data",
        str(calib),
        "--solver",
        "highs",
        "--weight-steps",
        "2",
        "--quiet",
    ]
    assert main([*args, "--out", str(tmp_path / "ref" / "plan.json")]) == 0
    n_plans = len(cells.keys)
    cells.keys.clear()
    if n_plans < 2:
        pytest.skip("a single Pareto plan: nothing to interrupt between")
    killed_then_resumed(cells, lambda: main([*args, "--out", str(tmp_path / "o" / "plan.json")]))
    assert len(cells.keys) == n_plans
    for name in ("plan.json", "plan.validation.json"):
        assert read(tmp_path / "o" / name) == read(tmp_path / "ref" / name)


# ---- retrieval, perplexity, context ------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe(tiny_bpe_dir):
    from moa_plan.io import save_plan
    from moa_plan.model_config import load_model_shape
    from moa_plan.plan import Layer, Plan, Rule

    shape = load_model_shape(tiny_bpe_dir)
    layers = [Layer(heads=[Rule(alpha=16, beta=0.25)] * shape.num_attention_heads) for _ in range(shape.num_layers)]
    save_plan(Plan(format_version=1, model=shape, sink=8, block_size=16, layers=layers), tiny_bpe_dir.parent / "p.json")
    return tiny_bpe_dir


@pytest.mark.parametrize(
    "command",
    [
        [
            "retrieval",
            "--task",
            "passkey",
            "--lengths",
            "120,160",
            "--positions",
            "0,1",
            "--samples",
            "1",
            "--max-new-tokens",
            "2",
            "--out",
            "{out}/r.json",
        ],
        ["perplexity", "--lengths", "64,96", "--windows", "1", "--out", "{out}/r.json"],
        [
            "context",
            "--task",
            "passkey",
            "--lengths",
            "120,160",
            "--positions",
            "0",
            "--samples",
            "1",
            "--max-new-tokens",
            "2",
            "--baselines",
            "dense",
            "--out-dir",
            "{out}",
        ],
    ],
    ids=["retrieval", "perplexity", "context"],
)
def test_evaluations_resume(bpe, command, tmp_path, cells, capsys):
    def job(out):
        argv = [
            "eval",
            command[0],
            "--model",
            str(bpe),
            "--plan",
            f"p={bpe.parent / 'p.json'}",
            *[a.replace("{out}", str(out)) for a in command[1:]],
            "--quiet",
        ]
        assert main(argv) == 0

    job(tmp_path / "ref")
    total = len(cells.keys)
    cells.keys.clear()
    killed_then_resumed(cells, lambda: job(tmp_path / "run"))
    assert len(cells.keys) == total >= 2
    for f in (tmp_path / "ref").glob("*.json"):
        assert read(tmp_path / "run" / f.name) == read(f)
    first = sorted((tmp_path / "run").glob("*.json"))[0] if command[0] == "context" else tmp_path / "run" / "r.json"
    assert json.loads(first.read_text())["fingerprint"]
    capsys.readouterr()
    changed = ["--windows", "2"] if command[0] == "perplexity" else ["--samples", "2"]
    argv = [
        "eval",
        command[0],
        "--model",
        str(bpe),
        "--plan",
        f"p={bpe.parent / 'p.json'}",
        *[a.replace("{out}", str(tmp_path / "run")) for a in command[1:]],
        *changed,
        "--quiet",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made with other settings: " in err and f"{changed[0][2:]} is 1 there, 2 now" in err


# ---- bench --------------------------------------------------------------------------------------


class FakeKernels:
    """The bench's GPU measurements, replaced by deterministic numbers (the run layer is under test)."""

    def __init__(self, s, over_budget, ceil=None):
        self.s = s

    def ceilings(self):
        return {"copy_GBps": 1000.0, "matmul_bf16_TFLOPs": 500.0}

    def decode_group(self, shape, n, batch):
        key = f"decode/{shape}/n{n}/b{batch}"
        return {
            "kernels": {
                f"{key}/sdpa": {"ms": n * batch / 1e6},
                **{f"{key}/moa{d:g}": {"ms": d, "sink": self.s.sink} for d in self.s.densities},
            },
            "guard": {},
            "skipped": [],
        }

    def prefill_group(self, shape, n):
        return {"kernels": {f"prefill/{shape}/n{n}/sdpa": {"ms": n / 1e5}}, "guard": {}, "skipped": []}

    def e2e(self, shape, density=0.5, kind="synthetic"):
        return {"shape": shape, "density": density, "plan_kind": kind, "dense": {"tok_s": 1.0}, "moa": {"tok_s": 2.0}}


@pytest.fixture
def fake_gpu(monkeypatch):
    import torch

    from moa_plan.evals.bench import kernels, timing

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(kernels, "Kernels", FakeKernels)
    monkeypatch.setattr(
        timing,
        "device_info",
        lambda: {"device": "NVIDIA H200", "torch": "t", "triton": "t", "cuda": "c", "python": "p", "sms": 132},
    )


BENCH = [
    "bench",
    "--shapes",
    "llama3-8b",
    "--densities",
    "0.5,0.25",
    "--prefill-lens",
    "4096",
    "--decode-lens",
    "4096,8192",
    "--batches",
    "1,8",
    "--quiet",
]


def test_bench_resumes(fake_gpu, tmp_path, cells, capsys):
    assert main([*BENCH, "--out", str(tmp_path / "ref")]) == 0
    total = len(cells.keys)
    cells.keys.clear()
    killed_then_resumed(cells, lambda: main([*BENCH, "--out", str(tmp_path / "run")]), k=3)
    assert len(cells.keys) == total == 1 + 4 + 1 + 4  # ceilings, decode n x b, prefill, e2e (2 densities x 2 kinds)
    assert read(tmp_path / "run" / "bench-h200.json") == read(tmp_path / "ref" / "bench-h200.json")
    assert (tmp_path / "run" / "bench-h200.md").read_text().count("| llama3-8b |") == 4 * 2  # a row per decode case


@pytest.mark.parametrize(
    "changed",
    [["--sink", "0"], ["--densities", "0.5"], ["--no-flex"], ["--e2e-context", "8192"], ["--flex-batches", "8"]],
)
def test_bench_resume_refuses_a_changed_setting(fake_gpu, tmp_path, capsys, changed):
    assert main([*BENCH, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main([*BENCH, "--resume", *changed, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    name = changed[0][2:].replace("-", "_")
    assert err.count("\n") == 1 and err.startswith(
        f"moa-plan bench: {tmp_path / 'bench-h200.json'}: made with other settings: {name} is "
    )
    assert main([*BENCH, *changed, "--overwrite", "--out", str(tmp_path)]) == 0


# ---- the layer itself ---------------------------------------------------------------------------


def test_a_growing_setting_accepts_new_names_and_refuses_changed_ones(tmp_path):
    path = tmp_path / "r.json"
    grows = ("methods",)
    with Run(path, "job", {"a": 1, "methods": {"x": "f1"}}, grows=grows) as run:
        run.put("x|1", 1.0)
        run.finish(["x|1"], prune=False)
    with Run(path, "job", {"a": 1, "methods": {"y": "f2"}}, grows=grows) as run:  # a new method: resumed, x kept
        assert run.settings["methods"] == {"x": "f1", "y": "f2"} and run.todo(["x|1", "y|1"]) == ["y|1"]
    with pytest.raises(OptionError, match="methods x differs"):
        Run(path, "job", {"a": 1, "methods": {"x": "f3"}}, grows=grows).__enter__()
    with pytest.raises(OptionError, match="a is 1 there, 2 now"):
        Run(path, "job", {"a": 2, "methods": {}}, grows=grows).__enter__()
    with Run(path, "job", {"a": 2}, overwrite=True) as run:
        assert run.cells == {}


def test_progress_shows_an_eta(capsys):
    import io

    stream = io.StringIO()
    bar = Progress(4, "job", stream=stream)
    bar.update(4)
    bar.close()
    assert stream.getvalue().splitlines()[-1].startswith("job: 4/4 cells [0:00 elapsed")
    quiet = io.StringIO()
    Progress(4, "job", quiet=True, stream=quiet).update(4)
    assert quiet.getvalue() == ""
