"""lm-eval integration: the .pth hook, the `moa` model class, and the real `lm_eval` executable offline."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from moa_plan.io import save_plan
from moa_plan.model_config import load_model_shape
from moa_plan.plan import Plan, Rule

pytest.importorskip("lm_eval")

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    shape = load_model_shape(folder)
    plan = Plan(format_version=1, model=shape, sink=4, block_size=16, default=Rule(alpha=24, beta=0.25))
    save_plan(plan, folder.parent / "plan.json")
    full = Plan(format_version=1, model=shape, sink=0, block_size=16, default=Rule(alpha=0, beta=1.0))
    save_plan(full, folder.parent / "full.json")
    return folder


def _env() -> dict[str, str]:
    return {**os.environ, **OFFLINE}


def test_pth_hook_is_installed_and_registers_lazily():
    dirs = site.getsitepackages() + [site.getusersitepackages()]
    assert any((Path(d) / "moa_plan_lm_eval.pth").is_file() for d in dirs), "pip install -e . (or .) first"
    code = (
        "import sys\n"
        "assert 'moa_plan.evals.lm_eval.model' not in sys.modules\n"
        "from lm_eval.api.registry import get_model, model_registry\n"
        "import lm_eval.models\n"
        "assert 'moa' in model_registry and 'hf' in model_registry\n"
        "assert 'torch' not in sys.modules, 'registration must not import torch'\n"
        "from lm_eval.tasks import TaskManager\n"
        "from moa_plan.evals.lm_eval.plugin import include_path\n"
        "tm = TaskManager(include_path=str(include_path()))\n"  # given twice: no duplicates
        "assert {'moa_passkey', 'moa_longeval_lines'} <= set(tm.all_tasks)\n"
        "print(get_model('moa').__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=600
    )  # a hang guard: 40 s alone, over 120 s beside the vLLM tests on 2 busy cores
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("MoALM")


def test_moa_model_batching_and_plan(tiny):
    from moa_plan.evals.lm_eval.model import MoALM

    dense = MoALM(pretrained=str(tiny), plan="dense", device="cpu", batch_size=4)
    assert dense.batch_size == 4 and dense.moa_plan is None
    planned = MoALM(pretrained=str(tiny), plan=str(tiny.parent / "plan.json"), device="cpu", batch_size=4)
    assert planned.batch_size == 1  # spans depend on each sequence's own length: no padding
    assert planned.moa_plan.sink == 4 and planned.get_model_info()["moa_plan"].endswith("plan.json")
    full = MoALM(pretrained=str(tiny), plan=str(tiny.parent / "full.json"), device="cpu")
    # a plan whose every span is the whole input scores exactly like the dense model
    reqs = [("line a-b: REGISTER_CONTENT is <123>\nThe pass key is", " 123"), ("The grass", " is green.")]
    from lm_eval.api.instance import Instance

    inst = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
    a = [x[0] for x in dense.loglikelihood(inst)]
    b = [x[0] for x in full.loglikelihood(inst)]
    c = [x[0] for x in planned.loglikelihood(inst)]
    assert a == pytest.approx(b, abs=1e-4)
    assert len(c) == 2
    with pytest.raises(ValueError, match="moa: plan="):
        MoALM(pretrained=str(tiny), plan="uniform:nope", device="cpu")


def test_moa_model_refuses_a_bad_plan_file_before_loading(tiny, tmp_path, monkeypatch):
    """plan= naming a FIFO or a link to /dev/zero used to hang; it is one error naming the file,
    raised before the model is loaded."""
    import os

    from lm_eval.models.huggingface import HFLM

    from moa_plan.evals.lm_eval.model import MoALM

    monkeypatch.setattr(HFLM, "__init__", lambda *a, **k: pytest.fail("model loaded before the plan was read"))
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "deep.json").write_text(
        '{"format_version": 1, "model": {"num_layers": 1, "num_attention_heads": 1, '
        '"num_key_value_heads": 1, "head_dim": 8}, "default": {"alpha": 1, "beta": 0}, '
        '"provenance": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}"
    )
    for name, message in [("fifo.json", "a FIFO"), ("zero.json", "a character device"), ("deep.json", "nested deeper")]:
        with pytest.raises(ValueError) as err:
            MoALM(pretrained=str(tiny), plan=str(tmp_path / name), device="cpu")
        assert str(err.value).startswith(f"moa: plan={tmp_path / name}: ") and message in str(err.value)


def test_a_bad_plan_is_one_line_before_the_model_loads(tiny, tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from moa_plan.evals.lm_eval.model import MoALM

    monkeypatch.setattr(HFLM, "__init__", lambda *a, **k: pytest.fail("the model loaded before the plan was checked"))
    missing = tmp_path / "missing.json"
    with pytest.raises(SystemExit) as exc:
        MoALM(pretrained=str(tiny), plan=str(missing), device="cpu")
    assert str(exc.value) == f"moa: plan={missing}: cannot read: No such file or directory"
    wrong = Plan(
        format_version=1,
        model=load_model_shape(tiny).model_copy(update={"num_layers": 3}),
        default=Rule(alpha=8, beta=0.5),
    )
    save_plan(wrong, tmp_path / "wrong.json")
    with pytest.raises(ValueError, match="model.num_layers: is 3, the model has 2"):
        MoALM(pretrained=str(tiny), plan=str(tmp_path / "wrong.json"), device="cpu")


def test_lm_eval_executable_says_a_missing_plan_in_one_line(tiny, tmp_path):
    exe = Path(sys.executable).with_name("lm_eval")
    cmd = [
        str(exe),
        "--model",
        "moa",
        "--model_args",
        f"pretrained={tiny},plan=missing.json",
        "--tasks",
        "moa_passkey",
        "--limit",
        "1",
        "--device",
        "cpu",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=240, cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith("moa: plan=missing.json: ")


def test_lm_eval_executable_runs_our_tasks_offline(tiny, tmp_path):
    exe = Path(sys.executable).with_name("lm_eval")
    out_dir = tmp_path / "out"
    cmd = [
        str(exe),
        "--model",
        "moa",
        "--model_args",
        f"pretrained={tiny},plan={tiny.parent / 'plan.json'}",
        "--tasks",
        "moa_longeval_lines,moa_passkey",
        "--limit",
        "2",
        "--device",
        "cpu",
        "--metadata",
        json.dumps({"lengths": [200], "positions": [0.0, 1.0]}),
        "--output_path",
        str(out_dir),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "|moa_longeval_lines|" in run.stdout and "|moa_passkey" in run.stdout and "exact_match" in run.stdout
    files = list(out_dir.rglob("results_*.json"))
    assert files
    data = json.loads(files[0].read_text())
    assert set(data["results"]) == {"moa_longeval_lines", "moa_passkey"}
    assert data["config"]["model"] == "moa"
